"""Tasks beyond classification, through the same loop: MSE on scikit-learn's diabetes data and bits
per character of a character-level Transformer on the Python standard library's source.

    .venv/bin/python experiments/tasks_table.py [--seeds 5] [--lm-seeds 1]

Each run trains its shipped config (configs/diabetes_mlp.py, configs/python_text_lm.py) for half
its steps, then reruns the same config on the same workdir to finish: every number here comes from
a run that was checkpointed and resumed. Beside them, baselines computed on the same splits:
predicting the training mean and ordinary least squares (diabetes), and a unigram byte model
(text). Writes results/tasks.md, results/tasks.json and results/tasks.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
from pathlib import Path

import jax
import matplotlib
import numpy as np

from jaxopt_lab import load_config, train_and_evaluate
from jaxopt_lab.core.metrics import read_metrics
from jaxopt_lab.data.sources import load_dataset

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from jaxopt_lab.host import cpu_model

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # name: (config, the metric reported, its direction)
    "diabetes": ("configs/diabetes_mlp.py", "mse"),
    "python_text": ("configs/python_text_lm.py", "bits_per_char"),
}


def train_resumed(config_file: str, seed: int, workdir: Path) -> dict:
    """Half the steps, then the same config again on the same workdir: it resumes."""
    shutil.rmtree(workdir, ignore_errors=True)
    full = load_config(str(ROOT / config_file), [f"--config.seed={seed}",
                                                 "--config.train.progress=False"])
    half = load_config(str(ROOT / config_file), [f"--config.seed={seed}",
                                                 "--config.train.progress=False",
                                                 f"--config.train.steps={full.train.steps // 2}"])
    first = train_and_evaluate(half, str(workdir))
    summary = train_and_evaluate(full, str(workdir))
    assert summary["resumed_from"] == full.train.steps // 2, summary["resumed_from"]
    return {**summary, "train_wall_s": first["train_wall_s"] + summary["train_wall_s"]}


def diabetes_baselines() -> dict:
    """Test MSE (standardized targets) of the training mean and of least squares on all 353
    training patients (the network trains on 318; 35 are its validation split)."""
    data = load_dataset("diabetes")
    x, y = data.train["x"], data.train["label"]
    xt, yt = data.test["x"], data.test["label"]
    design = np.c_[x, np.ones(len(x))]
    weights, *_ = np.linalg.lstsq(design, y, rcond=None)
    return {"predict the training mean": float(np.mean((yt - y.mean()) ** 2)),
            "least squares (linear)": float(np.mean((np.c_[xt, np.ones(len(xt))] @ weights - yt)
                                                    ** 2))}


def text_baselines() -> dict:
    """Test bits per character of a unigram byte model fit on train (add-one smoothing), and of
    a uniform one over the 128-symbol vocabulary."""
    data = load_dataset("python_text")
    counts = np.bincount(data.train["label"].ravel(), minlength=data.num_classes) + 1.0
    log2p = np.log2(counts / counts.sum())
    return {"uniform over 128 bytes": math.log2(data.num_classes),
            "unigram byte frequencies": float(-np.mean(log2p[data.test["label"].ravel()]))}


def plot(results: dict, curves: dict, path: Path) -> None:
    """Seed 0's validation and test curves per task, the baselines as labelled dashed lines."""
    fig, axes = plt.subplots(1, len(TASKS), figsize=(10, 3.5))
    for ax, (task, (_, metric)) in zip(axes, TASKS.items()):
        records = curves[task]
        for split in ("validation", "test"):
            ax.plot([r["step"] for r in records], [r[f"{split}_{metric}"] for r in records],
                    "o-", label=split)
        for (name, value), style in zip(results[task]["baselines"].items(), ("--", ":")):
            ax.axhline(value, ls=style, lw=1, color="gray", label=f"{name} (test)")
        ax.set_title(f"{task} (seed 0)")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _curves(workdir: Path) -> dict:
    return {task: [r for r in read_metrics(str(workdir / f"{task}_seed0"))
                   if f"validation_{metric}" in r] for task, (_, metric) in TASKS.items()}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds for the diabetes MLP")
    parser.add_argument("--lm-seeds", type=int, default=1, help="seeds for the language model")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "tasks_table"))
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw tasks.png from tasks.json and the runs under --workdir")
    args = parser.parse_args()
    if args.plot_only:
        results = json.loads((Path(args.out) / "tasks.json").read_text())
        plot(results, _curves(Path(args.workdir)), Path(args.out) / "tasks.png")
        return

    seeds = {"diabetes": args.seeds, "python_text": args.lm_seeds}
    results = {}
    for task, (config_file, metric) in TASKS.items():
        runs = []
        for seed in range(seeds[task]):
            workdir = Path(args.workdir) / f"{task}_seed{seed}"
            summary = train_resumed(config_file, seed, workdir)
            runs.append({"seed": seed, **{k: summary[k] for k in (
                f"validation_{metric}", f"test_{metric}", "steps", "train_wall_s",
                "num_params", "resumed_from")}})
            print(f"{task} seed {seed}: test_{metric}={summary[f'test_{metric}']:.4f}", flush=True)
        results[task] = {"config": config_file, "metric": metric, "runs": runs}
    results["diabetes"]["baselines"] = diabetes_baselines()
    results["python_text"]["baselines"] = text_baselines()
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, "
               f"{jax.default_backend()}, jax {jax.__version__}, "
               f"Python {platform.python_version()}")
    results["machine"] = machine

    lines = ["# Tasks beyond classification", "",
             ("`experiments/tasks_table.py`: each run trained half its config's steps, was "
             "rerun on the same workdir and resumed from its checkpoint to the end. "
             f"Machine: {machine}."), "",
             ("| task | config | metric | seeds | validation | test | parameters | "
             "train time, both halves (s) |"), "|---|---|---|---|---|---|---|---|"]
    for task, (config_file, metric) in TASKS.items():
        runs = results[task]["runs"]
        lines.append(
            f"| {task} | `{config_file}` | {metric} | {len(runs)} | "
            f"{_mean_std([r[f'validation_{metric}'] for r in runs])} | "
            f"{_mean_std([r[f'test_{metric}'] for r in runs])} | {runs[0]['num_params']:,} | "
            f"{statistics.mean(r['train_wall_s'] for r in runs):.0f} |")
    lines += ["", "Baselines on the same test splits (lower is better):", ""]
    for task, (_, metric) in TASKS.items():
        for name, value in results[task]["baselines"].items():
            lines.append(f"- {task}, {name}: test {metric} {value:.4f}")
    lines += ["", ("Diabetes targets are standardized with the training split's mean and std, so "
              "an MSE of 1 is about what predicting the mean scores. Bits per character are the "
              "model's mean next-byte cross-entropy over the test files, in bits. Mean ± std "
              "over seeds where there are several."), "", "![learning curves](tasks.png)", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks.md").write_text("\n".join(lines))
    (out / "tasks.json").write_text(json.dumps(results, indent=2))

    plot(results, _curves(Path(args.workdir)), out / "tasks.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
