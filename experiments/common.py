"""What the experiment scripts share: the machine's name, mean ± std, each split's figures, and
results files that several scripts fill in part by part."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import jax
import numpy as np

from jaxopt_lab.host import cpu_model

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("validation", "test")
NOT_MEASURED = "— (not measured)"  # a validation figure of a result that predates the split


def machine() -> str:
    """The machine a table was measured on, as its header names it."""
    return (f"{cpu_model()}, {platform.machine()} ({jax.default_backend()}, "
            f"{jax.device_count()} device(s), jax {jax.__version__})")


def stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values}


def paired(values: list[float], baseline: list[float]) -> dict:
    """`stats` of the per-seed differences `values - baseline` (members paired by seed)."""
    return stats([a - b for a, b in zip(values, baseline, strict=True)])


def split_accuracies(members: list[dict]) -> dict[str, list[float]]:
    """{split: each member's accuracy on it} for the splits every member was evaluated on: a run
    without a validation split (or that predates it) has test figures only."""
    return {split: [m[f"{split}_accuracy"] for m in members] for split in SPLITS
            if all(f"{split}_accuracy" in m for m in members)}


def shown(figure: dict | None, points: bool = False) -> str:
    """A `stats` dict as a table cell: an accuracy "mean ± std", or with `points` a difference
    in signed points; `NOT_MEASURED` where the figure is missing."""
    if figure is None:
        return NOT_MEASURED
    if points:
        return f"{100 * figure['mean']:+.2f} ± {100 * figure['std']:.2f}"
    return f"{figure['mean']:.4f} ± {figure['std']:.4f}"


def update_summary(path: Path, fields: dict) -> None:
    """Sets `fields` in the JSON object at `path`, keeping the keys other scripts wrote."""
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(fields)
    path.write_text(json.dumps(summary, indent=2) + "\n")


def plot_paired_differences(results: dict, path: Path, baseline: str,
                            goal_points: float | None = None) -> None:
    """A bar per model and variant: its mean paired test difference to `baseline`, in points,
    ± std (`results[model]["test_paired_difference"][variant]` holds fractions); the goal as a
    dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    variants = list(next(iter(results.values()))["test_paired_difference"])
    fig, ax = plt.subplots(figsize=(4 + 1.5 * len(names), 3.5))
    width = 0.8 / max(1, len(variants))
    for j, variant in enumerate(variants):
        means = [100 * results[n]["test_paired_difference"][variant]["mean"] for n in names]
        stds = [100 * results[n]["test_paired_difference"][variant]["std"] for n in names]
        ax.bar(np.arange(len(names)) + j * width, means, width, yerr=stds, label=variant)
    ax.axhline(0, color="black", linewidth=0.8)
    if goal_points is not None:
        ax.axhline(goal_points, color="red", linestyle="--", linewidth=0.8,
                   label=f"goal ({goal_points} points)")
    ax.set_xticks(np.arange(len(names)) + (len(variants) - 1) * width / 2, names)
    ax.set_ylabel(f"Δ test accuracy vs {baseline} (points)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
