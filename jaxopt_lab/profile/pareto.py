"""The trade-off report of `jaxopt-lab optimize`: which candidates are Pareto-optimal, which one is
best under the user's accuracy constraint, as report.json, report.md and pareto.png.

A candidate is on the Pareto set when no other candidate is at least as good in all of validation
accuracy, batch-256 latency and bytes and better in one. The best is the admissible candidate
(validation accuracy at most `max_accuracy_drop` points below the baseline's) that does best on
the objective: "size_latency" maximizes (size ratio × speedup) against the baseline, "latency"
the speedup, "size" the size ratio.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from jaxopt_lab.selection import choose

# Lower is better for these, higher for accuracy.
_COSTS = ("latency_ms_batch256", "model_bytes")


def non_dominated(points: Sequence[Sequence[float]],
                  maximize: Sequence[bool] = ()) -> list[bool]:
    """Whether each point is on the Pareto front of `points`.

    A point is dominated when another is at least as good on every axis and better on one. Axes
    are lower-is-better except those `maximize` marks (by position; missing entries: False).
    Equal points do not dominate each other, so ties all stay on the front; a NaN coordinate
    compares false, so its point neither dominates nor is dominated. O(n^2), for reports.

    >>> non_dominated([(1, 5), (2, 4), (2, 6), (1, 5)])
    [True, True, False, True]
    >>> non_dominated([(0.9, 5), (0.8, 4), (0.8, 6)], maximize=(True, False))
    [True, True, False]
    """
    flip = tuple(maximize)
    signed = [tuple(-v if i < len(flip) and flip[i] else v for i, v in enumerate(p))
              for p in points]

    def dominates(a: tuple, b: tuple) -> bool:
        return (all(x <= y for x, y in zip(a, b, strict=True))
                and any(x < y for x, y in zip(a, b, strict=True)))

    return [not any(dominates(other, p) for other in signed) for p in signed]


def pareto_flags(rows: list[dict]) -> list[bool]:
    """Whether each row is on the Pareto set of (validation accuracy, latency, bytes)."""
    points = [(row["validation_accuracy"], *(row[k] for k in _COSTS)) for row in rows]
    return non_dominated(points, maximize=(True, False, False))


def best_candidate(baseline: dict, rows: list[dict], max_drop: float,
                   objective: str) -> str | None:
    """The name of the best row within `max_drop` points of the baseline's validation accuracy,
    or None where none keeps it."""

    def score(row: dict) -> float:
        size = row["size_ratio"]
        speed = row["speedup_batch256"]
        return {"size_latency": size * speed, "latency": speed, "size": size}[objective]

    best = choose(rows, "validation_accuracy",
                  at_least=baseline["validation_accuracy"] - max_drop / 100, prefer=score)
    return None if best is None else best["name"]


def write_report(workdir: str, baseline: dict, rows: list[dict], failures: dict[str, str],
                 block, recipes: dict[str, list[str]], profile: dict,
                 served: dict | None = None) -> dict:
    """report.json, report.md and pareto.png in `workdir`; returns the report.

    `served`: where the candidates were measured in an ONNX runtime, {"runtime": its name,
    version, threads..., "baseline": the baseline's row in the runtime's float32}; the rows'
    accuracies are then the runtime's own outputs' and every speed-up is against `baseline`, the
    XLA float32 one.
    """
    import jax

    served = served or {"runtime": {"name": "xla", "version": f"jax {jax.__version__}",
                                    "backend": jax.default_backend()}}
    extra = [served["baseline"]] if "baseline" in served else []
    for row in (baseline, *extra, *rows):
        row["size_ratio"] = baseline["model_bytes"] / row["model_bytes"]
        for b in (1, 256):
            row[f"speedup_batch{b}"] = (baseline[f"latency_ms_batch{b}"]
                                        / row[f"latency_ms_batch{b}"])
            rounds = f"latency_ms_batch{b}_rounds"
            if rounds in row and rounds in baseline:  # the speed-up of each round: its range
                ratios = [x / y for x, y in zip(baseline[rounds], row[rounds], strict=True)]
                row[f"speedup_batch{b}_range"] = [min(ratios), max(ratios)]
    for row, flag in zip(rows, pareto_flags(rows), strict=True):
        row["pareto"] = flag
    report = {
        "baseline": baseline,
        "candidates": rows,
        "best": best_candidate(baseline, rows, block.max_accuracy_drop, block.objective),
        "max_accuracy_drop": block.max_accuracy_drop,
        "objective": block.objective,
        "failed": failures,
        "recipes": recipes,
        "profile": profile,
        "runtime": served["runtime"],
        "runtime_baseline": served.get("baseline"),
    }
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(markdown(report))
    plot(report, os.path.join(workdir, "pareto.png"))
    return report


def _speedup(row: dict, batch: int) -> str:
    """The best rounds' ratio, and the range of the per-round ratios where they were kept."""
    text = f"{row[f'speedup_batch{batch}']:.2f}×"
    if f"speedup_batch{batch}_range" in row:
        low, high = row[f"speedup_batch{batch}_range"]
        text += f" ({low:.2f}–{high:.2f})"
    return text


def _measured_where(report: dict) -> str:
    """The sentence saying where latencies and accuracies were measured."""
    base, runtime = report["baseline"], report["runtime"]
    if runtime["name"] == "xla":
        return (f"Baseline: {base['run_dir']}. Latencies timed side by side in one process "
                f"({runtime['backend']}, {runtime['version']}): each model's best round of "
                "median calls, rounds taken in turn. Speed-up and size ratio are against the "
                "baseline (speed-up: the best rounds' ratio, in brackets the range of the ratios "
                "taken within each round); accuracy and bytes come from the summary.json of "
                "each candidate's run directory.")
    agreement = min(row.get("validation_agreement", 1.0) for row in report["candidates"])
    return (f"Baseline: {base['run_dir']}. Every candidate exported to ONNX and served by "
            f"**{runtime['version']}** ({runtime['threads']} threads; int8 as "
            f"`--int8-ops {runtime['int8_ops']}`): its validation and test accuracy are the "
            "runtime's own outputs' (argmax agreement with the framework's form on validation: "
            f"≥ {agreement:.2%}), its latencies timed in one process beside the baseline in XLA "
            "float32 (the row every speed-up is against: the best rounds' ratio, in brackets "
            "the range of the ratios taken within each round) and in the runtime's float32. "
            "Bytes come from the summary.json of each candidate's run directory.")


def markdown(report: dict) -> str:
    """The report as a Markdown table, the best named, each recipe's overrides listed."""
    base = report["baseline"]
    lines = [
        "# Optimization report", "",
        _measured_where(report), "",
        ("| candidate | techniques | val acc % | test acc % | bytes | × smaller | ms @1 "
         "| ms @256 | × faster @256 | FLOPs/ex | train s | Pareto |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    profile = report["profile"]
    shares = ", ".join(f"{layer} {100 * share:.0f} %" for layer, share in
                       sorted(profile["flops_share"].items(), key=lambda item: -item[1]))
    waits = ", ".join(f"{feed} {100 * share:.0f} %" for feed, share in
                      profile["data_wait_fraction"].items())
    lines[2:2] = [(f"Baseline profile ({profile['path']}): FLOPs by layer {shares}; "
                   f"training MFU {100 * profile['mfu']:.1f} %; step time waiting for data: "
                   f"{waits}."), ""]
    extra = [report["runtime_baseline"]] if report.get("runtime_baseline") else []
    for row in (base, *extra, *report["candidates"]):
        lines.append(
            f"| {row['name']} | {', '.join(row['techniques']) or '—'} "
            f"| {100 * row['validation_accuracy']:.2f} | {100 * row['test_accuracy']:.2f} "
            f"| {row['model_bytes']} | {row['size_ratio']:.1f}× "
            f"| {row['latency_ms_batch1']:.3f} | {row['latency_ms_batch256']:.3f} "
            f"| {_speedup(row, 256)} | {row['flops']} | {row['train_wall_s']:.0f} "
            f"| {'yes' if row.get('pareto') else ''} |")
    best = report["best"]
    drop = report["max_accuracy_drop"]
    lines.append("")
    if best is None:
        lines.append(f"No candidate is within {drop} points of the baseline's validation "
                     "accuracy.")
    else:
        row = next(r for r in report["candidates"] if r["name"] == best)
        lines.append(f"**Best within {drop} points of validation accuracy "
                     f"({report['objective']}): {best}** — {row['size_ratio']:.1f}× smaller, "
                     f"{_speedup(row, 256)} faster at batch 256, "
                     f"{100 * (row['validation_accuracy'] - base['validation_accuracy']):+.2f} "
                     f"points; deployable from {row['run_dir']}.")
    for name, error in report["failed"].items():
        lines.append(f"\n{name} failed: {error}")
    lines += ["", "Each candidate's run: `jaxopt-lab train` with the config and these overrides:",
              ""]
    lines += [f"- {name}: `{' '.join(overrides)}`" for name, overrides in
              report["recipes"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    """Validation accuracy against batch-256 latency; marker area ∝ bytes; Pareto set ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = report["baseline"]
    rows = report["candidates"]
    scale = 600 / base["model_bytes"]
    floor = 100 * base["validation_accuracy"] - report["max_accuracy_drop"]
    # Candidates far below the constraint would squash the ones that matter: they sit on the
    # bottom edge as triangles, their accuracy in the label.
    bottom = min(floor - 4, min(100 * r["validation_accuracy"] for r in (base, *rows)) - 0.5)
    bottom = max(bottom, floor - 10)
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in (base, *rows):
        accuracy = 100 * row["validation_accuracy"]
        clipped = accuracy < bottom
        y = bottom if clipped else accuracy
        ax.scatter(row["latency_ms_batch256"], y, s=max(12.0, scale * row["model_bytes"]),
                   alpha=0.6, marker="v" if clipped else "o",
                   color="black" if row is base else "tab:blue",
                   edgecolors="tab:red" if row.get("pareto") else "none", linewidths=2)
        label = (row["name"] + (" ★" if row["name"] == report["best"] else "")
                 + (f" ({accuracy:.1f} %)" if clipped else ""))
        ax.annotate(label, (row["latency_ms_batch256"], y), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.axhline(floor, color="gray", linestyle="--", linewidth=0.8,
               label=f"baseline − {report['max_accuracy_drop']} points")
    top = max(100 * r["validation_accuracy"] for r in (base, *rows))
    ax.set_ylim(bottom - 0.5, top + 0.8)
    ax.set_xlabel("latency at batch 256 (ms)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Candidates (area ∝ bytes; red ring: Pareto set; black: baseline)", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
