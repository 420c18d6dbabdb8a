"""The `jaxopt-lab` command: parses arguments and hands a config to the library.

Over 400 lines because it is one flat list, a short parser function and a short handler per
subcommand; split, the command line would be read across modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from jaxopt_lab.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every user error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The `jaxopt-lab` argument parser, one subparser per command.

    Parsing imports nothing beyond argparse and runs nothing: the command handlers import the
    library lazily, so tests (and the docs-drift check) may parse any documented command line.
    """
    parser = _Parser(prog="jaxopt-lab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add_command in (_add_train, _add_eval, _add_quantize, _add_shrink, _add_export,
                        _add_serve_bench, _add_report, _add_profile, _add_optimize, _add_sweep, _add_launch):
        add_command(commands)
    return parser


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train one run from a config",
                                epilog="override any config key with --config.KEY=VALUE, "
                                       "e.g. --config.optim.lr=3e-3")
    train.add_argument("--config", required=True, help="a configs/*.py file with get_config()")
    train.add_argument("--workdir", required=True,
                       help="run directory (rerunning on it resumes from its newest checkpoint)")


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a run's checkpoint; prints JSON metrics")
    evaluate.add_argument("--workdir", required=True, help="a run directory written by train")
    evaluate.add_argument("--step", type=int, default=None,
                          help="the checkpoint to evaluate (default: the newest)")
    evaluate.add_argument("--split", choices=("validation", "test"), default="test")


def _add_quantize(commands) -> None:
    quantize = commands.add_parser(
        "quantize", help="convert a finished run to its int8 serving form (QAT run: as trained; "
                         "float run: post-training quantization)",
        epilog="writes RUN/quantized/serving (the checkpoint) and RUN/quantized/summary.json")
    quantize.add_argument("--workdir", required=True, help="a run directory written by train")
    quantize.add_argument("--calibrate", type=int, default=0, metavar="N",
                          help="training batches that calibrate static activation scales: "
                               "needed for w8a8 of a float run; a QAT run's scales become static "
                               "(the form ONNX int8 exports)")
    quantize.add_argument("--scheme", default="auto", choices=("auto", "w8", "w8a8"),
                          help="w8: int8 weights, float arithmetic; w8a8: int8 x int8; auto: w8 "
                               "on CPU, w8a8 on accelerators")
    quantize.add_argument("--bits", type=int, choices=(8, 4), default=None,
                          help="float run: integer bits (default 8)")
    quantize.add_argument("--numerics", choices=("int", "fp8_e4m3", "fp8_e5m2"), default=None,
                          help="float run: number format (default int)")
    quantize.add_argument("--per-tensor", action="store_true",
                          help="float run: one scale per weight tensor, not per channel")
    quantize.add_argument("--skip", nargs="*", default=None, metavar="REGEX",
                          help="float run: parameter-path patterns left in float (none given: "
                               "quantize every layer; flag absent: first and last layers)")


def _add_shrink(commands) -> None:
    shrink = commands.add_parser(
        "shrink", help="cut the channels a structurally pruned run removed: a smaller dense "
                       "model, as the run directory RUN/shrunk",
        epilog="fine-tune it: jaxopt-lab train --config RUN/shrunk/config.py --workdir "
               "RUN/shrunk --config.train.steps=N")
    shrink.add_argument("--workdir", required=True, help="a run directory written by train")
    shrink.add_argument("--member", type=int, default=None, metavar="I",
                        help="population run: the member to shrink")


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export", help="write a run's inference as a file another program runs without "
                       "jaxopt_lab, any batch size: StableHLO (jax alone) or ONNX (ONNX Runtime, "
                       "OpenVINO)",
        epilog="writes FILE and FILE.json (input signature and preprocessing, the run's model, "
               "techniques and quantization); docs/deploy.md")
    export.add_argument("--workdir", required=True, help="a run directory written by train")
    export.add_argument("--out", required=True, metavar="FILE", help="the artifact to write")
    export.add_argument("--to", choices=("stablehlo", "onnx"), default="stablehlo",
                        help="a jax.export program, or an ONNX model (the [deploy] extra)")
    export.add_argument("--int8-ops", choices=("qdq", "onnxruntime"), default="qdq",
                        help="ONNX int8 layers as qdq (Quantize/DequantizeLinear pairs every "
                             "runtime fuses) or onnxruntime (its own int8 kernel, bias fused)")
    export.add_argument("--check", nargs="*", default=["onnxruntime"], metavar="RUNTIME",
                        help="ONNX: run it in onnxruntime/openvino on 256 test examples beside "
                             "the framework's outputs (bare --check: none)")
    export.add_argument("--platforms", nargs="*", default=(), metavar="P",
                        help="cpu, cuda, rocm, tpu: where it may run (default: this backend)")
    export.add_argument("--form", choices=("auto", "serving", "model"), default="auto",
                        help="serving: the int8 serving form `quantize` wrote; model: the run's "
                             "model as it evaluates; auto: serving where it exists")
    export.add_argument("--member", type=int, default=None, metavar="I",
                        help="population run: the member to export")


def _add_serve_bench(commands) -> None:
    bench = commands.add_parser(
        "serve-bench", help="time what a run deploys in XLA, ONNX Runtime and OpenVINO, beside "
                            "the XLA float32 model, after checking each form's outputs",
        epilog="writes RUN/deploy/serve_bench.json (every round) and the ONNX files it timed")
    bench.add_argument("--workdir", required=True, help="a run directory written by train")
    bench.add_argument("--runtime", nargs="+", default=["onnxruntime", "openvino"],
                       choices=("xla", "onnxruntime", "openvino"),
                       help="ONNX runtimes to time (XLA is always timed)")
    bench.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    bench.add_argument("--threads", type=int, default=0,
                       help="ONNX runtimes' intra-op threads (default: this process's cores)")


def _add_report(commands) -> None:
    report = commands.add_parser(
        "report", help="finished runs side by side: their summary fields as a table, their "
                       "learning curves as one PNG")
    report.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    report.add_argument("--plot", default="runs_report.png", metavar="FILE",
                        help="where the curves go (default: runs_report.png; '' for none)")


def _add_profile(commands) -> None:
    profile = commands.add_parser(
        "profile", help="where a config's time, memory and size go: per-layer parameters and "
                        "FLOPs, step memory, data wait vs compute, MFU, latency, a trace",
        epilog="writes DIR/profile/profile.json, profile.md and trace/ (TensorBoard's profile "
               "plugin); override any config key with --config.KEY=VALUE")
    profile.add_argument("--config", required=True, help="a configs/*.py file with get_config()")
    profile.add_argument("--workdir", default=None,
                         help="where profile/ goes (default: runs/profile/<config name>)")
    profile.add_argument("--steps", type=int, default=30, help="timed steps per feed")


def _add_optimize(commands) -> None:
    optimize = commands.add_parser(
        "optimize", help="train a baseline and every compression candidate of the config's "
                         "optimize block; report them side by side with the Pareto front",
        epilog="writes DIR/report.md, DIR/report.json, DIR/pareto.png and a run directory per "
               "candidate (rerun to resume); override any config key with --config.KEY=VALUE")
    optimize.add_argument("--config", required=True, help="a configs/*.py file with get_config()")
    optimize.add_argument("--workdir", required=True, help="the pipeline's directory")
    optimize.add_argument("--baseline", default=None, metavar="RUN",
                          help="a finished run of the config to start from (default: train one "
                               "into DIR/baseline)")
    optimize.add_argument("--max-accuracy-drop", type=float, default=None, metavar="POINTS",
                          help="validation accuracy the best candidate may lose (default: "
                               "optimize.max_accuracy_drop, 1.0)")


def _add_sweep(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="search a config's sweep.space, or its model's widths (sweep.widths), "
                      "with an Optuna study (rerun to resume)",
        epilog="override any config key with --config.KEY=VALUE; live view: optuna-dashboard "
               "DIR/study.journal")
    sweep.add_argument("--config", help="a configs/sweeps/*.py file with a sweep block")
    sweep.add_argument("--workdir", help="the sweep's directory (one run directory per trial)")
    sweep.add_argument("--storage", default="",
                       help="an Optuna storage: postgresql://... shared by machines, "
                            "sqlite:///FILE, or a journal file (default: DIR/study.journal)")
    sweep.add_argument("--workers", type=int, default=None,
                       help="worker processes on this machine (default: sweep.workers)")
    sweep.add_argument("--status", metavar="DIR", default=None,
                       help="print the table of a sweep's top trials and exit, running nothing")


def _add_launch(commands) -> None:
    launch = commands.add_parser("launch", help="run a command in N local processes (loopback)")
    launch.add_argument("-n", "--num-processes", type=int, required=True)
    launch.add_argument("--devices-per-process", type=int, default=1,
                        help="simulated CPU devices in each process")
    launch.add_argument("rest", nargs=argparse.REMAINDER, help="-- train --config ... --workdir ...")


def _train(args, overrides: list[str]) -> int:
    from jaxopt_lab.compose.config import load_config

    config = load_config(args.config, overrides)  # before importing the loop: a typo costs 1 s
    from jaxopt_lab.core.interrupt import Preempted
    from jaxopt_lab.workflows.train import train_and_evaluate

    try:
        summary = train_and_evaluate(config, args.workdir)
    except Preempted as e:  # SIGTERM or Ctrl-C: a checkpoint was saved
        print(e, file=sys.stderr)
        return e.exit_code
    import jax

    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))
        print(f"run directory: {args.workdir} "
              "(summary.json, metrics.jsonl, tensorboard/, checkpoints/)")
    return 0


def _eval(args) -> int:
    """Restores a run's checkpoint and prints its metrics on `args.split` as one JSON line."""
    if not os.path.isdir(args.workdir):
        raise UserError(f"--workdir {args.workdir} is not a directory: no run there")
    if os.path.isfile(os.path.join(args.workdir, "config.json")) and not os.path.isdir(
            os.path.join(args.workdir, "checkpoints")):  # else restoring would create it
        raise UserError(f"{args.workdir} holds no checkpoint yet")
    from jaxopt_lab.run.build import evaluate_run, load_run

    run = load_run(args.workdir, args.step)
    metrics = evaluate_run(run, args.split)
    print(json.dumps({"step": run.step, "split": args.split, **metrics}))
    return 0


def _quantize(args) -> int:
    """Converts a run to its quantized serving form and prints the summary."""
    if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        raise UserError(f"--workdir {args.workdir} holds no trained run (no checkpoints/)")
    if args.calibrate < 0:
        raise UserError(f"--calibrate {args.calibrate} must be >= 0")
    from jaxopt_lab.workflows.convert import quantize_run

    options = {k: v for k, v in {"bits": args.bits, "numerics": args.numerics,
                                 "skip": None if args.skip is None else tuple(args.skip)}.items()
               if v is not None}
    if args.per_tensor:
        options["per_channel"] = False
    summary = quantize_run(args.workdir, calibrate_batches=args.calibrate, scheme=args.scheme,
                           options=options)
    print(json.dumps(summary, indent=2))
    print(f"{summary['method']} {summary['scheme']} serving form: "
          f"{args.workdir}/quantized/serving ({summary['size_ratio']:.2f}x smaller than float32; "
          f"scheme {args.scheme} -> {summary['options']['scheme']} on {summary['backend']})")
    if "dynamic_test_accuracy" in summary:
        print(f"static activation scales ({args.calibrate} batches): test accuracy "
              f"{summary['test_accuracy']:.4f}, per-example (QAT) scales "
              f"{summary['dynamic_test_accuracy']:.4f}")
    return 0


def _shrink(args) -> int:
    """Shrinks a channel-pruned run into RUN/shrunk and prints the summary."""
    if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        raise UserError(f"--workdir {args.workdir} holds no trained run (no checkpoints/)")
    from jaxopt_lab.workflows.shrink import shrink_run

    summary = shrink_run(args.workdir, args.member)
    out = os.path.join(args.workdir, "shrunk")
    print(json.dumps(summary, indent=2))
    print(f"shrunk run: {out} ({summary['original_num_params']} -> {summary['num_params']} "
          f"parameters); fine-tune: jaxopt-lab train --config {out}/config.py --workdir {out} "
          "--config.train.steps=N")
    return 0


def _export(args) -> int:
    from jaxopt_lab.export import export_run

    metadata = export_run(args.workdir, args.out, tuple(args.platforms), args.form,
                          args.member, to=args.to, int8_ops=args.int8_ops,
                          check=tuple(args.check))
    where = (f"platforms {', '.join(metadata['platforms'])}" if args.to == "stablehlo"
             else f"ONNX opset {metadata['opset']}")
    print(f"wrote {args.out} ({metadata['form']}, {metadata['bytes']} bytes; input "
          f"{metadata['input']['shape']} {metadata['input']['dtype']}; {where}) and "
          f"{args.out}.json")
    for check in metadata.get("checks", []):
        print(f"checked in {check['runtime']} on {check['examples']} test examples: max |Δ| "
              f"{check['max_abs_difference']:.2e} (outputs up to {check['max_abs_output']:.2f}), "
              f"argmax agreement {check['argmax_agreement']:.2%}")
    return 0


def _serve_bench(args) -> int:
    if args.rounds < 1 or args.threads < 0:
        raise UserError(f"--rounds {args.rounds} / --threads {args.threads}: need rounds >= 1, "
                        "threads >= 0")
    from jaxopt_lab.export.bench import serve_bench, table, versions_line

    result = serve_bench(args.workdir, tuple(args.runtime), rounds=args.rounds,
                         threads=args.threads)
    print(table(result))
    print(f"({versions_line(result)}; every round in {args.workdir}/deploy/serve_bench.json)")
    return 0


def _report(args) -> int:
    from jaxopt_lab.profile.runs_report import report_runs

    print(report_runs(args.runs, args.plot or None))
    if args.plot:
        print(f"learning curves: {args.plot}")
    return 0


def _profile(args, overrides: list[str]) -> int:
    from jaxopt_lab.compose.config import load_config

    config = load_config(args.config, overrides)
    from jaxopt_lab.profile.profile_run import markdown, profile_config

    workdir = args.workdir or os.path.join(
        "runs", "profile", os.path.splitext(os.path.basename(args.config))[0])
    result = profile_config(config, workdir, args.steps)
    print(markdown(result))
    print(f"wrote {workdir}/profile/profile.json, profile.md and trace/")
    return 0


def _optimize(args, overrides: list[str]) -> int:
    """Runs (or resumes) the pipeline and prints its report."""
    from jaxopt_lab.compose.config import load_config

    load_config(args.config, overrides)  # a typo costs a second, not an import of the loop
    from jaxopt_lab.core.interrupt import Preempted
    from jaxopt_lab.optimize import optimize
    from jaxopt_lab.profile.pareto import markdown

    try:
        report = optimize(args.config, args.workdir, tuple(overrides), baseline=args.baseline,
                          max_accuracy_drop=args.max_accuracy_drop)
    except Preempted as e:  # SIGTERM or Ctrl-C: the run in training saved; a rerun resumes
        print(e, file=sys.stderr)
        return e.exit_code
    print(markdown(report))
    print(f"wrote {args.workdir}/report.md, report.json and pareto.png")
    return 0


def _sweep(args, overrides: list[str]) -> int:
    """Runs (or resumes) a sweep, then prints its top trials and writes its report and plots;
    with --status, only prints."""
    from jaxopt_lab.tune import report, sweep

    if args.status is not None:
        if args.config or overrides:
            raise UserError("--status DIR reads the sweep recorded in DIR: give no --config")
        print(report.format_report(sweep.load(args.status).study))
        return 0
    if not args.config or not args.workdir:
        raise UserError("sweep needs --config FILE and --workdir DIR (or --status DIR)")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers} must be >= 1")
    from jaxopt_lab.compose.config import load_config

    config = load_config(args.config, overrides)
    from jaxopt_lab.core.interrupt import Preempted

    try:
        study = sweep.run_sweep(config, args.workdir, storage=args.storage, workers=args.workers)
    except Preempted as e:  # SIGTERM or Ctrl-C: a trial's checkpoint was saved, or none ran
        print(e, file=sys.stderr)
        return e.exit_code
    print(report.format_report(study))
    written = report.write_report(study, args.workdir)
    for name, why in written["plots_skipped"].items():
        print(f"{name} not drawn: {why}")
    print(f"sweep directory: {args.workdir} (sweep_report.md, *.png, trials/ or populations/); "
          f"live view: optuna-dashboard {sweep.recorded(args.workdir)['storage']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Library start-up chatter (grain, orbax) would bury the lines users need; errors still show.
    logging.getLogger("absl").setLevel(logging.ERROR)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            return _train(args, extra)
        if args.command == "sweep":
            return _sweep(args, extra)
        if args.command == "optimize":
            return _optimize(args, extra)
        if args.command == "profile":
            return _profile(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "eval":
            return _eval(args)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "shrink":
            return _shrink(args)
        if args.command == "export":
            return _export(args)
        if args.command == "report":
            return _report(args)
        if args.command == "serve-bench":
            return _serve_bench(args)
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        if not rest or args.num_processes < 1:
            parser.error("usage: jaxopt-lab launch -n N -- train --config ... --workdir ...")
        from jaxopt_lab.core.launch import launch
        return launch(args.num_processes, rest, args.devices_per_process)
    except UserError as e:
        print(f"jaxopt-lab: error: {e}", file=sys.stderr)
        return _exit_now_if_distributed(2)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("\njaxopt-lab: interrupted; steps since the last checkpoint are lost",
              file=sys.stderr)
        return _exit_now_if_distributed(130)
    except Exception:  # noqa: BLE001 - a bug: show it, then exit without hanging peers
        traceback.print_exc()
        return _exit_now_if_distributed(1)


def _exit_now_if_distributed(code: int) -> int:
    """A process that joined a multi-process run must not wait at exit for peers it failed:
    JAX's shutdown barrier would hold it (and them) until a timeout."""
    import jax

    if jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
