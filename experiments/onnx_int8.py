"""The static int8 form of QAT runs, exported to ONNX and served in ONNX Runtime and OpenVINO:
what calibrating static activation scales costs against the QAT evaluation (per-example scales),
and whether the runtimes' int8 outputs agree with the framework's serving of the same form.

    .venv/bin/python experiments/onnx_int8.py [--seeds 3] [--models mnist1d_cnn128,digits_cnn]

Per model and seed: int8 QAT (w8a8, every layer but the first and last), then `jaxopt-lab
quantize --scheme w8a8 --calibrate 10` (static scales from 10 training batches), then `export
--to onnx` in both int8 forms (QDQ pairs, run in both runtimes; ONNX Runtime's own kernels,
run in it), each on the validation and test splits. Seeds pair the static and the dynamic figures (same weights).

Writes results/onnx_int8.{md,json}. A finished run is reused (pass --fresh to retrain).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
from pathlib import Path

import jax
import numpy as np
from common import SPLITS, machine, paired, shown, stats

from jaxopt_lab import load_config, load_run, train_and_evaluate
from jaxopt_lab.export import INT8_OPS, export_run
from jaxopt_lab.export.runtimes import RUNTIMES, load_onnx

SERVED = [(runtime, ops) for ops in INT8_OPS for runtime in RUNTIMES
          if ops not in RUNTIMES or ops == runtime]  # a runtime's own operators: only it loads them
from jaxopt_lab.techniques.quantize import serve_fn
from jaxopt_lab.workflows.convert import load_serving, quantize_run, serving_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # the configs' models and schedules; steps as in experiments/quantize_accuracy.py
    "mnist1d_cnn128": ("mnist1d_cnn.py", ["--config.model.channels=128",
                                          "--config.train.steps=2000",
                                          "--config.optim.schedule=cosine",
                                          "--config.data.generated_validation=1000"]),
    "digits_cnn": ("digits_cnn.py", ["--config.train.steps=2000"]),
}
CALIBRATION_BATCHES = 10


def train(name: str, seed: int, workroot: Path, fresh: bool) -> str:
    workdir = workroot / name / f"seed{seed}"
    if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    config_file, overrides = MODELS[name]
    config = load_config(str(ROOT / "configs" / config_file), [
        *overrides, f"--config.seed={seed}", "--config.train.progress=False",
        "--config.techniques.quantize.method=qat"])
    if not (workdir / "summary.json").exists():
        train_and_evaluate(config, str(workdir))
    return str(workdir)


def served(workdir: str, out: Path) -> dict:
    """Static vs dynamic accuracies, and each ONNX form's in each runtime, on both splits."""
    quantized = quantize_run(workdir, calibrate_batches=CALIBRATION_BATCHES, scheme="w8a8")
    run = load_run(workdir)
    serve = jax.jit(serve_fn(serving_model(run, quantized)))
    serving = load_serving(f"{workdir}/quantized/serving")
    row = {f"{kind}_{split}_accuracy": quantized[f"{prefix}{split}_accuracy"]
           for kind, prefix in (("dynamic", "dynamic_"), ("static", "")) for split in SPLITS}
    for ops in INT8_OPS:
        path = str(out / f"{Path(workdir).parent.name}_{Path(workdir).name}_{ops}.onnx")
        export_run(workdir, path, to="onnx", int8_ops=ops, check=())
        for runtime in [r for r, o in SERVED if o == ops]:
            predict = load_onnx(path, runtime)
            for split in SPLITS:
                arrays = getattr(run.dataset, split)
                want = np.concatenate([np.asarray(serve(serving, arrays["x"][i:i + 512]))
                                       for i in range(0, len(arrays["x"]), 512)])
                got = predict(arrays["x"])
                key = f"{runtime}_{ops}_{split}"
                row[f"{key}_accuracy"] = float((got.argmax(-1) == arrays["label"]).mean())
                row[f"{key}_agreement"] = float((got.argmax(-1) == want.argmax(-1)).mean())
    return row


def summarize(rows: list[dict]) -> dict:
    """Means over seeds; the static form's paired difference to the dynamic evaluation."""
    keys = [k for k in rows[0] if k != "seed"]
    figures = {key: stats([row[key] for row in rows]) for key in keys}
    for split in SPLITS:
        figures[f"static_minus_dynamic_{split}"] = paired(
            [row[f"static_{split}_accuracy"] for row in rows],
            [row[f"dynamic_{split}_accuracy"] for row in rows])
    return figures


def write(results: dict, out: Path) -> None:
    header = (
        f"Written by `experiments/onnx_int8.py` on {results['machine']} ({results['runtimes']}). "
        f"Int8 QAT runs (w8a8, the default skip), {results['seeds']} seeds each; `quantize "
        f"--scheme w8a8 --calibrate {CALIBRATION_BATCHES}` makes their activation scales static; "
        "`export --to onnx` writes that form as QDQ pairs (both runtimes) and as ONNX Runtime's "
        "own int8 kernels (`--int8-ops onnxruntime`). Accuracy: mean ± std over seeds; the static − dynamic row is the paired "
        "difference (same weights) in points, with its range over seeds. Agreement: the share of "
        "examples whose argmax equals the framework's serving of the same static form (AQT).")
    lines = ["# The static int8 form in ONNX Runtime and OpenVINO", "", header, "",
             "| model | what | validation accuracy | test accuracy |", "|---|---|---|---|"]
    for name, figures in results["models"].items():
        for label, key in (("QAT, per-example scales (dynamic)", "dynamic"),
                           ("static scales, framework (AQT)", "static")):
            lines.append(f"| {name} | {label} | {shown(figures[f'{key}_validation_accuracy'])} "
                         f"| {shown(figures[f'{key}_test_accuracy'])} |")
        lines.append(f"| {name} | static − dynamic (points) | "
                     + " | ".join(_points(figures[f"static_minus_dynamic_{split}"])
                                  for split in SPLITS) + " |")
        for runtime, ops in SERVED:
            key = f"{runtime}_{ops}"
            cells = [f"{shown(figures[f'{key}_{split}_accuracy'])} (agreement "
                     f"{_minimum(figures[f'{key}_{split}_agreement'])})" for split in SPLITS]
            lines.append(f"| {name} | {runtime}, {ops} | " + " | ".join(cells) + " |")
    lines += ["", ("Agreement is given as its lowest value over seeds. Per-seed figures: "
                   "results/onnx_int8.json.")]
    (out / "onnx_int8.md").write_text("\n".join(lines) + "\n")


def _points(figure: dict) -> str:
    values = [100 * v for v in figure["per_seed"]]
    return f"{100 * figure['mean']:+.2f} (range {min(values):+.2f} to {max(values):+.2f})"


def _minimum(figure: dict) -> str:
    return f"≥ {min(figure['per_seed']):.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "onnx_int8"))
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    out = ROOT / "results"
    onnx_dir = Path(args.workdir) / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "seeds": args.seeds, "calibration_batches":
               CALIBRATION_BATCHES, "runtimes": ", ".join(
                   f"{r} {importlib.metadata.version(r)}" for r in RUNTIMES), "models": {},
               "per_seed": {}}
    for name in args.models.split(","):
        rows = []
        for seed in range(args.seeds):
            workdir = train(name, seed, Path(args.workdir), args.fresh)
            rows.append({"seed": seed, **served(workdir, onnx_dir)})
            print(name, seed, json.dumps(rows[-1]), flush=True)
        results["per_seed"][name] = rows
        results["models"][name] = summarize(rows)
    (out / "onnx_int8.json").write_text(json.dumps(results, indent=2))
    write(results, out)


if __name__ == "__main__":
    main()
