"""What the experiment scripts share: the machine's name, mean ± std, and results files that
several scripts fill in part by part."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """The machine a table was measured on, as its header names it."""
    return (f"{platform.machine()} {platform.processor() or ''} ({jax.default_backend()}, "
            f"{jax.device_count()} device(s), jax {jax.__version__})").replace("  ", " ")


def stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values}


def update_summary(path: Path, fields: dict) -> None:
    """Sets `fields` in the JSON object at `path`, keeping the keys other scripts wrote."""
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(fields)
    path.write_text(json.dumps(summary, indent=2) + "\n")


def plot_paired_differences(results: dict, path: Path, baseline: str,
                            goal_points: float | None = None) -> None:
    """A bar per model and variant: its mean paired difference to `baseline`, in points, ± std
    (`results[model]["paired_difference"][variant]` holds fractions); the goal as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    variants = list(next(iter(results.values()))["paired_difference"])
    fig, ax = plt.subplots(figsize=(4 + 1.5 * len(names), 3.5))
    width = 0.8 / max(1, len(variants))
    for j, variant in enumerate(variants):
        means = [100 * results[n]["paired_difference"][variant]["mean"] for n in names]
        stds = [100 * results[n]["paired_difference"][variant]["std"] for n in names]
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
