"""Quantization on the MNIST-1D CNN (25 and 128 channels) and the digits CNN: float vs int8 QAT
(forward-only and fully quantized) vs int8 PTQ vs int4 QAT vs fp8 QAT, paired by seed, and the
serving forms' size, latency and bit-identity.

    .venv/bin/python experiments/quantize_accuracy.py [--seeds 5] [--models mnist1d_cnn,...]

Each variant trains all seeds as one population (one vmapped program; member i has seed i, so
the float and quantized members with the same index share initialisation and data order). PTQ
quantizes each float member after training: int8 weights and activations, static activation
scales from 10 training batches. Serving: each model's float member 0 converted with `skip=()`
(every layer) and with the default skip, in both schemes (w8: int8 weights, float arithmetic;
w8a8: int8 × int8), timed against the float model on this CPU. Each model holds out validation
(MNIST-1D: 1000 fresh generator examples, the paper's train and test untouched; digits: 10 % of
train, its config's default); rows carry each split's accuracy and paired difference.

Writes results/quantize_accuracy.{md,json,png} and results/quantize_summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
from common import (
    SPLITS,
    machine,
    paired,
    plot_paired_differences,
    shown,
    split_accuracies,
    stats,
)

from jaxopt_lab import load_config, load_run, train_and_evaluate
from jaxopt_lab.core.measure import latency_ms, model_bytes
from jaxopt_lab.core.state import sample_input
from jaxopt_lab.core.tasks import inference
from jaxopt_lab.techniques import quantize
from jaxopt_lab.workflows.convert import (
    evaluate_serving,
    outputs_identical,
    post_training,
)

ROOT = Path(__file__).resolve().parents[1]
# name: (config file, overrides). Steps are shortened from the configs' own (6000 and 2000) to
# keep the whole script within about an hour on 2 CPU cores; the comparison is paired. MNIST-1D's
# validation split is 1000 fresh generator examples; digits holds out 10 % of train.
VALIDATION = "--config.data.generated_validation=1000"
MODELS = {
    "mnist1d_cnn": ("mnist1d_cnn.py", ["--config.train.steps=3000", VALIDATION]),
    # 128 channels at a constant 1e-2 end noisy (final accuracies of one config spread over 5
    # points across seeds); a cosine decay settles them, so a paired difference means something.
    "mnist1d_cnn128": ("mnist1d_cnn.py", ["--config.model.channels=128",
                                          "--config.train.steps=2000",
                                          "--config.optim.schedule=cosine", VALIDATION]),
    "digits_cnn": ("digits_cnn.py", ["--config.train.steps=2000"]),
}
Q = "--config.techniques.quantize"
VARIANTS = {
    "float": [],
    "int8_qat": [f"{Q}.method=qat"],  # w8a8: int8 weights and activations
    "int8_qat_w8": [f"{Q}.method=qat", f"{Q}.activations=False"],  # int8 weights only
    # Fully quantized training reaches matmuls (AQT's dlhs/drhs; convs keep a float backward),
    # and these CNNs' one matmul is the logits layer the default skip keeps: so every layer here.
    "int8_qat_full": [f"{Q}.method=qat", f"{Q}.backward=quantized", f"{Q}.skip=()"],
    "int4_qat": [f"{Q}.method=qat", f"{Q}.bits=4"],
    "fp8_qat": [f"{Q}.method=qat", f"{Q}.numerics=fp8_e4m3"],
}
CALIBRATION_BATCHES = 10


def member(tree, i: int):
    return jax.tree.map(lambda a: np.asarray(a[i]), tree)


def train_variants(name: str, seeds: int, workroot: Path, fresh: bool,
                   variants: list[str]) -> dict[str, Path]:
    config_file, overrides = MODELS[name]
    workdirs = {}
    for variant in variants:
        extra = VARIANTS[variant]
        workdir = workroot / name / variant
        if fresh:
            shutil.rmtree(workdir, ignore_errors=True)
        config = load_config(str(ROOT / "configs" / config_file), [
            *overrides, *extra, f"--config.population=(('seed', {tuple(range(seeds))}),)",
            "--config.train.progress=False", "--config.train.measure=False",
            "--config.train.steps_per_call=1"])
        summary = train_and_evaluate(config, str(workdir))
        accuracies = [m["test_accuracy"] for m in summary["members"]]
        print(f"{name} {variant}: {np.mean(accuracies):.4f} ({summary['steps_per_s']:.1f} "
              "steps/s)", flush=True)
        workdirs[variant] = workdir
    return workdirs


def ptq_accuracies(float_run, seeds: int) -> dict[str, list[float]]:
    """{split: each PTQ member's accuracy} on every split the float run has."""
    dataset, sample_x = float_run.dataset, sample_input(float_run.dataset)
    arrays = {"validation": dataset.validation, "test": dataset.test}
    accuracies = {split: [] for split in SPLITS if arrays[split] is not None}
    for i in range(seeds):
        variables = {"params": member(float_run.state.params, i),
                     **member(float_run.state.model_state, i)}
        model, variables = post_training(
            float_run.experiment.model, variables, dataset.train["x"], sample_x,
            batches=CALIBRATION_BATCHES, batch_size=float_run.config.data.batch_size,
            activations=True)
        serving = quantize.convert(model, variables, sample_x)
        for split, values in accuracies.items():
            values.append(evaluate_serving(model, serving, arrays[split], dataset.task, 1000,
                                           split)[f"{split}_accuracy"])
    return accuracies


ROUNDS = 7  # latency rounds; each times every form once, so a busy spell hits them all alike


def latencies(timed: dict, sample_x) -> dict:
    """{form: {"latency_ms_batch{b}": best over ROUNDS of the median of 20 calls}}, the forms
    interleaved within each round."""
    best = {form: {} for form in timed}
    for _ in range(ROUNDS):
        for form, (fn, variables) in timed.items():
            for b in (1, 256):
                ms = latency_ms(fn, sample_x, b, variables=variables, runs=20)
                key = f"latency_ms_batch{b}"
                best[form][key] = min(best[form].get(key, ms), ms)
    return best


def serving_forms(float_run, qat_run) -> dict:
    """Sizes, latencies and bit-identity of both schemes, with every layer and the default."""
    dataset, sample_x = float_run.dataset, sample_input(float_run.dataset)
    float_model = float_run.experiment.model
    variables = {"params": member(float_run.state.params, 0),
                 **member(float_run.state.model_state, 0)}

    forms = {"float": {"model_bytes": model_bytes(variables)}}
    timed = {"float": (inference(float_model), variables)}
    # Per-tensor scales too: on a model as small as the 25-channel CNN, per-channel float32
    # scales and biases are 13 % of the int8 form.
    for skip_name, skip, per_channel in (("all_layers", (), True), ("default_skip", None, True),
                                         ("all_layers_per_tensor", (), False)):
        for scheme, activations in (("w8", False), ("w8a8", True)):
            model = quantize.wrap(float_model, sample_x=sample_x, skip=skip,
                                  activations=activations, per_channel=per_channel)
            serving = quantize.convert(model, variables, sample_x)
            serve = jax.jit(quantize.serve_fn(model))
            forms[f"{scheme}_{skip_name}"] = {
                "model_bytes": model_bytes(serving),
                "size_ratio": forms["float"]["model_bytes"] / model_bytes(serving),
                "bit_identical": outputs_identical(model, variables, serving, serve,
                                                   dataset.test, 1000),
            }
            timed[f"{scheme}_{skip_name}"] = (serve, serving)
    for form, measured in latencies(timed, sample_x).items():
        forms[form].update(measured)
    # The QAT-trained model itself: its serving form against its own evaluation.
    qat_model = qat_run.experiment.model
    qat_variables = {"params": member(qat_run.state.params, 0),
                     **member(qat_run.state.model_state, 0)}
    options, skip = quantize.quantization_of(qat_model)
    for scheme, activations in (("w8", False), ("w8a8", True)):
        model = quantize.wrap(qat_model, **{**dataclasses.asdict(options), "skip": skip,
                                            "activations": activations})
        serving = quantize.convert(model, qat_variables, sample_x)
        forms[f"qat_{scheme}_bit_identical"] = outputs_identical(
            model, qat_variables, serving, jax.jit(quantize.serve_fn(model)), dataset.test, 1000)
    return forms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "quantize_accuracy"))
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="QAT variants to train (float and int8_qat always are)")
    parser.add_argument("--name", default="quantize_accuracy",
                        help="results/<name>.{md,json,png}; quantize_summary.json is written "
                             "only under the default name")
    parser.add_argument("--fresh", action="store_true",
                        help="delete earlier runs first (otherwise a finished run is reused: "
                             "rerunning train on it restores its last checkpoint)")
    args = parser.parse_args()
    results = {}
    for name in args.models.split(","):
        workdirs = train_variants(name, args.seeds, Path(args.workdir), args.fresh,
                                  ["float", "int8_qat", *[v for v in args.variants.split(",")
                                                         if v not in ("float", "int8_qat")]])
        runs = {variant: load_run(str(workdir)) for variant, workdir in workdirs.items()}
        members = {variant: json.loads((workdir / "summary.json").read_text())["members"]
                   for variant, workdir in workdirs.items()}
        results[name] = {**accuracy_rows(name, runs, members, args.seeds),
                         "serving": serving_forms(runs["float"], runs["int8_qat"]),
                         "steps": runs["float"].config.train.steps,
                         "schedule": runs["float"].config.optim.schedule}
    write(results, Path(args.out), args.seeds, args.name)


def accuracy_rows(name: str, runs: dict, members: dict[str, list[dict]], seeds: int) -> dict:
    """`<split>_accuracy` and `<split>_paired_difference` (to float, same seed) per variant, int8
    PTQ's included, for each split that every variant was evaluated on."""
    accuracy = {variant: split_accuracies(ms) for variant, ms in members.items()}
    accuracy["int8_ptq"] = ptq_accuracies(runs["float"], seeds)
    print(f"{name} int8_ptq: {np.mean(accuracy['int8_ptq']['test']):.4f}", flush=True)
    rows = {}
    for split in SPLITS:
        if all(split in a for a in accuracy.values()):
            values = {variant: a[split] for variant, a in accuracy.items()}
            rows[f"{split}_accuracy"] = {v: stats(a) for v, a in values.items()}
            rows[f"{split}_paired_difference"] = {v: paired(a, values["float"])
                                                  for v, a in values.items() if v != "float"}
    return rows


def summary_fields(results: dict) -> dict:
    """results/quantize_summary.json: mean test accuracies per model, each accuracy beside the
    size of a serving form with the same skip setting (`pairs` says which goes with which).
    Recomputed from the results file by tests/test_results.py."""
    summary = {}
    for model_name, r in results.items():
        if model_name == "mnist1d_cnn128":
            continue
        test = r["test_accuracy"]
        accuracy = {v: test[v]["mean"] for v in ("float", "int8_qat", "int8_ptq", "int4_qat",
                                                 "int8_qat_w8")
                    if v in test}  # reported, not chosen
        if "int8_qat_full" in test:
            accuracy["int8_qat_all_layers"] = test["int8_qat_full"]["mean"]
        summary[model_name] = {
            **accuracy,
            "int8_serving_size_ratio": r["serving"]["w8a8_all_layers"]["size_ratio"],
            "int8_serving_size_ratio_per_tensor":
                r["serving"]["w8a8_all_layers_per_tensor"]["size_ratio"],
            "int8_serving_size_ratio_default_skip":
                r["serving"]["w8a8_default_skip"]["size_ratio"],
            "pairs": {
                "int8_qat": ("int8_serving_size_ratio_default_skip (first and last layer float, "
                             "the default skip)"),
                "int8_qat_all_layers": ("int8_serving_size_ratio (every layer int8; this variant "
                                        "also trained with int8 backward matmuls)")},
            "serving_bit_identical": all(
                r["serving"][k]["bit_identical"] for k in r["serving"] if k != "float"
                and isinstance(r["serving"][k], dict)) and r["serving"]["qat_w8_bit_identical"]
            and r["serving"]["qat_w8a8_bit_identical"]}
    return summary


def write(results: dict, out: Path, seeds: int, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(
        {"machine": machine(), "seeds": seeds, "models": results}, indent=2) + "\n")
    summary = summary_fields(results)
    if name == "quantize_accuracy":
        (out / "quantize_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Quantization: accuracy, size and latency",
        "",
        (f"Written by `experiments/quantize_accuracy.py` on {machine()}. Accuracy, mean ± std "
        f"over {seeds} seeds; Δ is the mean paired difference in test accuracy to float (same "
        "seed), in points. Validation: MNIST-1D's is 1000 fresh generator examples (train and "
        "test are the paper's), digits' 10 % of train; \"not measured\": the run predates the "
        "validation split (adding one does not change training, so its test figures stand). "
        "int8_qat trains int8 weights and activations (w8a8), int8_qat_w8 int8 weights only "
        "(w8, what CPU serving uses). QAT variants quantize every layer but the first and last (the default "
        "`skip`), except "
         "int8_qat_full: every layer, with int8 backward matmuls (convs' backward stays float); int8 "
        f"PTQ quantizes the float runs after training (w8a8, static activation scales from "
        f"{CALIBRATION_BATCHES} training batches)."),
        "",
        ("| model | steps, schedule | variant | validation accuracy | test accuracy "
         "| Δ test vs float (points) |"),
        "|---|---|---|---|---|---|",
    ]
    for model_name, r in results.items():
        for variant, s in r["test_accuracy"].items():
            d = r["test_paired_difference"].get(variant)
            validation = r.get("validation_accuracy", {}).get(variant)
            lines.append(f"| {model_name} | {r['steps']}, {r['schedule']} | {variant} | "
                         f"{shown(validation)} | {shown(s)} | "
                         f"{shown(d, points=True) if d else '—'} |")
    lines += ["", "## Serving forms (float member 0 of each model, this CPU)", "",
              ("`size ratio` = float32 `model_bytes` / serving `model_bytes`; latency = the best "
               f"of {ROUNDS} rounds of the median of 20 calls, the forms interleaved in each "
               "round; `bit-identical`: serving outputs equal the quantized model's compiled "
               "evaluation on every test example."), "",
              ("| model | form | model_bytes | size ratio | latency b=1 (ms) | latency b=256 (ms) "
              "| b=256 vs float | bit-identical |"), "|---|---|---|---|---|---|---|---|"]
    for model_name, r in results.items():
        f = r["serving"]["float"]
        for form, s in r["serving"].items():
            if not isinstance(s, dict):
                continue
            ratio = s.get("size_ratio", 1.0)
            lines.append(
                f"| {model_name} | {form} | {s['model_bytes']} | {ratio:.2f}× | "
                f"{s['latency_ms_batch1']:.3f} | {s['latency_ms_batch256']:.3f} | "
                f"{s['latency_ms_batch256'] / f['latency_ms_batch256']:.2f}× | "
                f"{s.get('bit_identical', '—')} |")
        lines.append(f"| {model_name} | QAT int8 run, its own serving (w8 / w8a8) | | | | | | "
                     f"{r['serving']['qat_w8_bit_identical']} / "
                     f"{r['serving']['qat_w8a8_bit_identical']} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot_paired_differences(results, out / f"{name}.png", "float")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
