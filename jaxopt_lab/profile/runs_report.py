"""`jaxopt-lab report RUN [RUN ...]`: finished runs side by side — their summary.json fields as
one table, their learning curves as one PNG.

Reads only what the loop wrote (summary.json, metrics.jsonl), so it works on any run directory,
from this machine or copied from another. A population shows its best member (chosen on
validation), named RUN[member i].
"""

from __future__ import annotations

import json
import math
import os

from jaxopt_lab.core.metrics import read_metrics
from jaxopt_lab.errors import UserError

# The columns, in order, where any run has them: quality, size, speed, cost.
FIELDS = ("validation_accuracy", "test_accuracy", "test_loss", "test_bits_per_char", "test_mse",
          "num_params", "nonzero_params", "sparsity", "model_bytes", "flops_per_example",
          "latency_ms_batch1", "latency_ms_batch256", "steps", "train_wall_s", "steps_per_s",
          "comm_ratio", "devices")
HEADERS = {"validation_accuracy": "val acc %", "test_accuracy": "test acc %",
           "test_bits_per_char": "test bpc", "nonzero_params": "nonzero", "model_bytes": "bytes",
           "flops_per_example": "FLOPs/ex", "latency_ms_batch1": "ms @1",
           "latency_ms_batch256": "ms @256", "train_wall_s": "train s", "steps_per_s": "steps/s",
           "comm_ratio": "comm ×"}


def load_summary(workdir: str) -> tuple[str, dict, int | None]:
    """(name, the fields of the run or of a population's best member, that member's index)."""
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        raise UserError(f"{workdir} holds no summary.json: not a finished run")
    with open(path) as f:
        summary = json.load(f)
    name = os.path.basename(os.path.normpath(workdir))
    best = summary.get("best_member")
    if summary.get("members"):
        best = best or 0
        return f"{name}[member {best}]", {**summary, **summary["members"][best]}, best
    return name, summary, None


def _cell(key: str, value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    if not math.isfinite(value):
        return str(value)
    if key.endswith("accuracy"):
        return f"{100 * value:.2f}"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    return f"{value:.4g}"


def table(rows: list[tuple[str, dict]]) -> str:
    """A markdown table: one row per run, the FIELDS any of them has as columns."""
    keys = [k for k in FIELDS if any(k in fields for _, fields in rows)]
    lines = ["| run | " + " | ".join(HEADERS.get(k, k) for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for name, fields in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(k, fields.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def plot_curves(workdirs: list[str], names: list[str], members: list[int | None],
                path: str) -> None:
    """Training loss and the evaluation metric (validation accuracy, else test) against steps,
    every run on the same two axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = [[r for r in read_metrics(w) if r.get("member", 0) == (m or 0)]
                 for w, m in zip(workdirs, members, strict=True)]
    candidates = ("validation_accuracy", "test_accuracy", "validation_loss", "test_loss")
    # The metric every run evaluated, else the first any did (the others then show no curve).
    metric = next((m for m in candidates if all(any(m in r for r in h) for h in histories)),
                  next((m for m in candidates if any(m in r for h in histories for r in h)),
                       None))
    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for records, name in zip(histories, names, strict=True):
        logged = [r for r in records if "loss" in r]  # reported, not chosen
        loss_ax.plot([r["step"] for r in logged], [r["loss"] for r in logged], label=name)
        evaluated = [r for r in records if metric in r]
        eval_ax.plot([r["step"] for r in evaluated], [r[metric] for r in evaluated], marker="o",
                     markersize=3, label=name)
    loss_ax.set(xlabel="step", ylabel="training loss", yscale="log")
    eval_ax.set(xlabel="step", ylabel=metric or "evaluation")
    for ax in (loss_ax, eval_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_runs(workdirs: list[str], plot: str | None) -> str:
    """The table (returned) and, where `plot` names a file, the curves PNG written there."""
    if not workdirs:
        raise UserError("report needs at least one run directory")
    loaded = [load_summary(w) for w in workdirs]
    names = [name for name, _, _ in loaded]
    if len(set(names)) < len(names):  # runs/a/seed0 and runs/b/seed0: name them by their path
        names = [os.path.normpath(w) for w in workdirs]
    text = table([(n, fields) for n, (_, fields, _) in zip(names, loaded, strict=True)])
    if plot:
        plot_curves(workdirs, names, [member for _, _, member in loaded], plot)
    return text
