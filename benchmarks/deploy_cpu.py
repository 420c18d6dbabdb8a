"""Serving on this CPU: float32 and the static int8 form in XLA, ONNX Runtime and OpenVINO.

    .venv/bin/python benchmarks/deploy_cpu.py [--rounds 10] [--models wide_cnn,digits_cnn,...]

Per model: an int8 QAT run (w8a8, the default skip; reused where it finished), its activation
scales made static (`quantize --scheme w8a8 --calibrate 10`), then `serve-bench`
(`jaxopt_lab/export/bench.py`): every form checked against the framework's own outputs on the
test split, then timed at batch 1 and 256 in interleaved rounds beside XLA float32. Models: the
wide MNIST-1D CNN (128 channels), the digits CNN, ResNet-20 and the registry ViT (dim 64, depth
2, attention left float) on synthetic 32×32 inputs (their accuracy means nothing; agreement
does).

Writes the deploy-cpu section of benchmarks/RESULTS.md, benchmarks/deploy_cpu.json (every round)
and results/deploy_summary.json. A model whose run already holds a serve-bench result with the
same number of rounds is not timed again, and models not named keep their entry in the JSON, so
one model can be rerun alone (`--models vit --rounds 3`: the ViT's rounds take minutes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from results_file import write_section

from jaxopt_lab import load_config, model_config, train_and_evaluate
from jaxopt_lab.export.bench import serve_bench, table, versions_line
from jaxopt_lab.workflows.convert import quantize_run

ROOT = Path(__file__).resolve().parents[1]
QAT = ["--config.techniques.quantize.method=qat", "--config.train.progress=False"]
MODELS = {  # name: (config file, overrides, model hyperparameters replacing the config's)
    "wide_cnn": ("mnist1d_cnn.py", ["--config.model.channels=128", "--config.train.steps=2000",
                                    "--config.optim.schedule=cosine",
                                    "--config.data.generated_validation=1000"], None),
    "digits_cnn": ("digits_cnn.py", ["--config.train.steps=2000"], None),
    "resnet20": ("synthetic_resnet.py", ["--config.train.steps=100"], None),
    "vit": ("synthetic_resnet.py", ["--config.train.steps=100", "--config.optim.name=adam",
                                    "--config.optim.lr=1e-3",
                                    "--config.techniques.quantize.attention=False"],
            {"name": "vit", "dim": 64, "depth": 2}),
}
CALIBRATION_BATCHES = 10


def prepared(name: str, workroot: Path) -> str:
    """The model's QAT run with its static int8 form, trained and converted where missing."""
    config_file, overrides, model = MODELS[name]
    workdir = workroot / name
    if not (workdir / "summary.json").exists():
        config = load_config(str(ROOT / "configs" / config_file), [*overrides, *QAT])
        if model is not None:
            config.model = model_config(model["name"], **{k: v for k, v in model.items()
                                                          if k != "name"})
        train_and_evaluate(config, str(workdir))
    if not (workdir / "quantized" / "summary.json").exists():
        quantize_run(str(workdir), calibrate_batches=CALIBRATION_BATCHES, scheme="w8a8")
    return str(workdir)


def timed(workdir: str, rounds: int) -> dict:
    """serve-bench's result for the run: its earlier one where it was timed with `rounds`."""
    earlier = Path(workdir) / "deploy" / "serve_bench.json"
    if earlier.exists():
        result = json.loads(earlier.read_text())
        if result["rounds"] == rounds:
            return result
    return serve_bench(workdir, rounds=rounds)


def best_int8(result: dict, batch: int) -> tuple[str, dict]:
    """The int8 ONNX form with the highest median speed-up at `batch`."""
    rows = {k: v for k, v in result["forms"].items() if " int8 " in k}
    name = max(rows, key=lambda k: rows[k][f"speedup_batch{batch}"])  # reported, not chosen
    return name, rows[name]


def summary(results: dict) -> dict:
    """results/deploy_summary.json: the wide CNN's fastest int8 form at each batch size against
    XLA float32 (the form named), and the batch-256 one's agreement and accuracy."""
    name, row = best_int8(results["wide_cnn"], 256)
    name_1, row_1 = best_int8(results["wide_cnn"], 1)
    return {"runtime": name, "wide_cnn_int8_speedup_batch256": row["speedup_batch256"],
            "wide_cnn_int8_speedup_batch256_range": row["speedup_batch256_range"],
            "runtime_batch1": name_1, "wide_cnn_int8_speedup_batch1": row_1["speedup_batch1"],
            "wide_cnn_int8_speedup_batch1_range": row_1["speedup_batch1_range"],
            "int8_argmax_agreement": row["argmax_agreement"],
            "int8_test_accuracy_delta": row["test_accuracy"] - row["reference_test_accuracy"],
            "source": "benchmarks/deploy_cpu.py"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "deploy_cpu"))
    args = parser.parse_args()
    path = ROOT / "benchmarks" / "deploy_cpu.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.models.split(","):
        results[name] = timed(prepared(name, Path(args.workdir)), args.rounds)
        print(name, "\n" + table(results[name]), flush=True)
    results = {name: results[name] for name in MODELS if name in results}
    path.write_text(json.dumps(results, indent=2))
    lines = ["## Serving on this CPU: XLA, ONNX Runtime, OpenVINO (float32 and static int8)", "",
             f"`benchmarks/deploy_cpu.py`: {versions_line(results[name]).rsplit(';', 1)[0]}.",
             ("Each model is an int8 QAT run (w8a8, first and last layers float) whose activation "
             f"scales `quantize --calibrate {CALIBRATION_BATCHES}` made static. Agreement: argmax "
             "equal to the framework's own outputs of the same form (float model; AQT serving of "
             "the int8 form) on the test split (resnet20, vit: random 32×32 inputs and labels, 100 "
             "steps: their accuracy means nothing, agreement does). Latency: median over "
             "interleaved rounds; × vs "
             "XLA f32: the speed-up taken within each round, median (lowest–highest). Every "
             "round in `benchmarks/deploy_cpu.json`.")]
    for name, result in results.items():
        lines += ["", f"**{name}** ({result['rounds']} rounds of {result['calls']} calls)", "",
                  table(result)]
    write_section(ROOT / "benchmarks" / "RESULTS.md", "deploy-cpu", lines)
    if "wide_cnn" in results:  # experiments/optimize_digits.py adds its keys to the same file
        out = ROOT / "results" / "deploy_summary.json"
        kept = json.loads(out.read_text()) if out.exists() else {}
        kept = {k: v for k, v in kept.items() if k.startswith("optimize_")}
        out.write_text(json.dumps({**summary(results), **kept}, indent=2) + "\n")


if __name__ == "__main__":
    main()
