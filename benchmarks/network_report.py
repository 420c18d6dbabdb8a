"""The tables of `network_compress.py`: time to the target accuracy per method, the step split into
compute and communication, and the cost model (`techniques/compress/cost.py`) beside the
measurements.

Conventions:
- a step's time is the median over its steps after the first POWERSGD_START_STEP + 1 (PowerSGD
  all-reduces before it; the first step of every method waits for the slowest process to join);
- the time to target counts the training steps only (evaluations are off the clock) and is the
  median over seeds; "× sooner" pairs each seed with the all-reduce's of the same seed;
- the cost model is asked twice: as shipped (the nominal link rate, 5 µs a message) and fitted:
  the link's measured TCP rate, and one per-message latency alpha (gloo's overhead per ring step,
  which the model cannot know) fitted by least squares to the measured communication times.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path

from results_file import write_section

from jaxopt_lab.host import cpu_model
from jaxopt_lab.techniques.compress import cost

SKIP_STEPS = 11  # PowerSGD's start_step (10) + 1
TOLERANCE = 0.25  # the done-when's: predicted within 25 % of measured
GOAL = 2.0  # at the lowest rate, the best compressor at least this many times sooner
TAG = "network-compress"
NAMES = {"allreduce": "none", "powersgd": "powersgd", "topk": "topk", "qsgd": "qsgd"}


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def method_name(label: str) -> str:
    return NAMES[label.split("_")[0]]


def steady_step_s(record: dict) -> float:
    steps = record["step_s"][SKIP_STEPS:] or record["step_s"]
    return statistics.median(steps)


def _median_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def groups(records: list[dict]) -> dict[tuple, list[dict]]:
    """(workers, rate_mbit, method) -> its records, one per seed, in the order measured."""
    out: dict[tuple, list[dict]] = {}
    for r in records:
        out.setdefault((r["workers"], r["rate_mbit"], r["method"]), []).append(r)
    return out


def summarize(records: list[dict]) -> list[dict]:
    """One row per (workers, rate, method): times, split, bytes, and × sooner than all-reduce."""
    by = groups(records)
    rows = []
    for (workers, rate, method), rs in by.items():
        base = {r["seed"]: r for r in by[(workers, rate, "allreduce")]}
        times = [r["time_to_target_s"] for r in rs]
        reached = [t for t in times if t is not None]
        sooner = [base[r["seed"]]["time_to_target_s"] / r["time_to_target_s"] for r in rs
                  if r["time_to_target_s"] and base[r["seed"]]["time_to_target_s"]]
        step = statistics.median(steady_step_s(r) for r in rs)
        compute = statistics.median(r["compute_s"] for r in rs)
        rows.append({
            "workers": workers, "rate_mbit": rate, "method": method,
            "link_mbit_measured": statistics.median(r["link_mbit_measured"] for r in rs),
            "seeds": [r["seed"] for r in rs], "steps_to_target": [r["steps_to_target"] for r in rs],
            "time_to_target_s": _median_range(reached) if len(reached) == len(rs) else None,
            "sooner": _median_range(sooner) if len(sooner) == len(rs) else None,
            "step_s": step, "compute_s": compute, "comm_s": max(step - compute, 0.0),
            "comm_bytes": rs[0]["comm_bytes"][-1], "plain_bytes": rs[0]["plain_bytes"]})
    return rows


def _gbps(mbit: float | None, measured: float) -> float:
    return (mbit if mbit is not None else measured) / 1000


def _messages(c: cost.Collectives, workers: int) -> int:
    """Ring steps per training step: what a per-message latency multiplies."""
    return (workers - 1) * (2 * c.allreduce_calls + c.allgather_calls)


def cost_check(rows: list[dict]) -> tuple[list[dict], float]:
    """Each row's predicted step time, as shipped and fitted; returns them and the fitted alpha."""
    compute_of = {(r["workers"], r["rate_mbit"]): r["compute_s"] for r in rows
                  if r["method"] == "allreduce"}
    parts = []
    for r in rows:
        w = r["workers"]
        c = cost.collectives(method_name(r["method"]), r["comm_bytes"],
                             plain_bytes=min(r["plain_bytes"], r["comm_bytes"]))
        compute = compute_of[(w, r["rate_mbit"])]
        costs = cost.StepCosts(compute, max(r["compute_s"] - compute, 0.0), c)
        measured_link = r["link_mbit_measured"] / 1000
        bandwidth_s = cost.comm_s(c, w, measured_link, latency_s=0.0)
        parts.append((r, costs, bandwidth_s, _messages(c, w)))
    # least squares of (measured comm - its bandwidth term) = alpha x messages, alpha >= 0
    num = sum(m * (r["comm_s"] - b) for r, _, b, m in parts)
    den = sum(m * m for *_, m in parts)
    alpha = max(num / den, 0.0) if den else 0.0
    checked = []
    for r, costs, bandwidth_s, messages in parts:
        shipped = cost.projected_step_s(costs, r["workers"], _gbps(r["rate_mbit"],
                                                                   r["link_mbit_measured"]))
        fitted = costs.compute_s + costs.overhead_s + bandwidth_s + alpha * messages
        checked.append({**r, "predicted_shipped_s": shipped, "predicted_fitted_s": fitted,
                        "error_shipped": shipped / r["step_s"] - 1,
                        "error_fitted": fitted / r["step_s"] - 1,
                        "bandwidth_term_s": bandwidth_s, "latency_term_s": alpha * messages,
                        "messages": messages, "overhead_s": costs.overhead_s})
    return checked, alpha


def measured_break_even(rows: list[dict], workers: int, method: str) -> str:
    """Where the measured step stops being faster than the all-reduce's, between the rates run."""
    points = sorted((r["rate_mbit"] or math.inf, _step_of(rows, workers, r["rate_mbit"],
                                                          "allreduce") / r["step_s"])
                    for r in rows if r["workers"] == workers and r["method"] == method)
    faster = [rate for rate, speedup in points if speedup > 1]
    slower = [rate for rate, speedup in points if speedup <= 1]
    if not slower:
        return f"faster at every rate run (to {_rate(points[-1][0])})"
    if not faster:
        return f"slower at every rate run (from {_rate(points[0][0])})"
    low, high = max(faster), min(slower)
    return (f"between {_rate(low)} and {_rate(high)}" if low < high
            else "faster and slower at rates that interleave (noise)")


def _step_of(rows: list[dict], workers: int, rate, method: str) -> float:
    return next(r["step_s"] for r in rows
                if (r["workers"], r["rate_mbit"], r["method"]) == (workers, rate, method))


def _rate(mbit: float) -> str:
    if math.isinf(mbit):
        return "unlimited"
    return f"{mbit / 1000:.3g} Gbit/s" if mbit >= 1000 else f"{mbit:.3g} Mbit/s"


def predicted_break_even(rows: list[dict], workers: int, method: str, alpha: float) -> str:
    def costs_of(label):
        r = next(x for x in rows if x["workers"] == workers and x["method"] == label)
        return cost.StepCosts(r["compute_s"] - r["overhead_s"], r["overhead_s"],
                              cost.collectives(method_name(label), r["comm_bytes"],
                                               plain_bytes=min(r["plain_bytes"],
                                                               r["comm_bytes"])))

    shipped = cost.break_even_gbps(costs_of(method), costs_of("allreduce"), workers)
    fitted = cost.break_even_gbps(costs_of(method), costs_of("allreduce"), workers,
                                  latency_s=alpha)
    return " / ".join("every rate" if math.isinf(g) else "none" if g == 0 else _rate(g * 1000)
                      for g in (shipped, fitted))


def _allreduce_bytes(rows: list[dict]) -> float:
    return next(r["comm_bytes"] for r in rows if r["method"] == "allreduce")


def plot(records: list[dict], target: float, path: Path) -> None:
    """Validation accuracy against training wall-clock at the lowest rate, seed 0, per W."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lowest = min(r["rate_mbit"] or math.inf for r in records)
    chosen = [r for r in records if (r["rate_mbit"] or math.inf) == lowest
              and r["seed"] == records[0]["seed"]]
    workers = sorted({r["workers"] for r in chosen})
    fig, axes = plt.subplots(1, len(workers), figsize=(5.5 * len(workers), 4), squeeze=False)
    for ax, w in zip(axes[0], workers):
        for r in (r for r in chosen if r["workers"] == w):
            clock = [sum(r["step_s"][:step]) for step, _ in r["validation_curve"]]
            ax.plot(clock, [a for _, a in r["validation_curve"]], label=r["method"])
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
        ax.set(title=f"{w} workers, {_rate(lowest)} links", xlabel="training wall-clock (s)",
               ylabel="validation accuracy", ylim=(0.5, 1.0))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_range(value: tuple | None, unit: str, digits: int = 1) -> str:
    if value is None:
        return "not reached"
    median, low, high = value
    return f"{median:.{digits}f}{unit} ({low:.{digits}f}–{high:.{digits}f})"


def _verdicts(rows: list[dict]) -> dict[int, tuple | None]:
    """Per worker count: the compressor soonest at the target at the lowest rate, and its ×."""
    lowest = min(r["rate_mbit"] or math.inf for r in rows)
    verdicts = {}
    for workers in sorted({r["workers"] for r in rows}):
        reached = [r for r in rows if r["workers"] == workers and r["method"] != "allreduce"
                   and (r["rate_mbit"] or math.inf) == lowest and r["sooner"]]
        top = max(reached, key=lambda r: r["sooner"][0], default=None)
        verdicts[workers] = (top["method"], top["sooner"]) if top else None
    return verdicts


def _verdict_line(verdicts: dict) -> str:
    said = [f"{w} workers: none reached it" if v is None else
            f"{w} workers: {v[0]} {_fmt_range(v[1], '×', 2)}, "
            f"{'met' if v[1][0] >= GOAL else 'not met'}" for w, v in verdicts.items()]
    return ("**Goal** (at the lowest rate the best compressor reaches the target ≥ 2× "
            "sooner than the all-reduce, median over seeds): " + "; ".join(said))


def _time_table(rows: list[dict], target: str) -> list[str]:
    lines = [(f"| workers | link (TCP measured) | method | steps to {target} (per seed) | "
              "time s, median (range) | × sooner than all-reduce | step ms | compute ms | "
              "comm ms | bytes/step |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = ", ".join("—" if s is None else str(s) for s in r["steps_to_target"])
        lines.append(
            f"| {r['workers']} | {_rate(r['rate_mbit'] or math.inf)} "
            f"({r['link_mbit_measured']:.0f} Mbit/s) | {r['method']} | {steps} | "
            f"{_fmt_range(r['time_to_target_s'], '')} | {_fmt_range(r['sooner'], '×', 2)} | "
            f"{r['step_s'] * 1e3:.0f} | {r['compute_s'] * 1e3:.0f} | {r['comm_s'] * 1e3:.0f} | "
            f"{r['comm_bytes']:,.0f} |")
    return lines


def _mark(error: float) -> str:
    return f"{error:+.0%} {'✓' if abs(error) <= TOLERANCE else '✗'}"


def _cost_table(rows: list[dict]) -> list[str]:
    lines = [("| workers | link | method | measured ms | shipped ms | error | fitted ms | error | "
              "bandwidth term ms | latency term ms | comm − bandwidth term, per message ms |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_message = (r["comm_s"] - r["bandwidth_term_s"]) / r["messages"]
        lines.append(
            f"| {r['workers']} | {_rate(r['rate_mbit'] or math.inf)} | {r['method']} | "
            f"{r['step_s'] * 1e3:.0f} | {r['predicted_shipped_s'] * 1e3:.0f} | "
            f"{_mark(r['error_shipped'])} | {r['predicted_fitted_s'] * 1e3:.0f} | "
            f"{_mark(r['error_fitted'])} | {r['bandwidth_term_s'] * 1e3:.0f} | "
            f"{r['latency_term_s'] * 1e3:.0f} | {per_message * 1e3:.2f} |")
    return lines


def _which_term(rows: list[dict]) -> str:
    """What the shipped model misses, from the last column of the cost table."""
    def span(selected):
        per = [(r["comm_s"] - r["bandwidth_term_s"]) / r["messages"] * 1e3 for r in selected]
        return f"{min(per):.1f}–{max(per):.1f} ms" if per else "— (none measured)"

    small = [r for r in rows if r["comm_bytes"] < 0.25e6]
    big = [r for r in rows if r["method"] == "allreduce"]
    low = [r for r in big if (r["rate_mbit"] or math.inf) == min(x["rate_mbit"] or math.inf
                                                                   for x in rows)]
    return ("Which term is off: at the lowest rate the all-reduce is bandwidth-bound and the "
            "shipped model is within "
            f"{max(abs(r['error_shipped']) for r in low):.0%} of it. The latency term is what is "
            "off: the shipped 5 µs a message against, measured per message beyond the bandwidth "
            f"term, {span(small)} for the compressors' payloads under 250 kB a step and "
            f"{span(big)} for the all-reduce's ring steps of megabytes (gloo over TCP reduces and "
            "copies on the same cores that train, so a ring step costs time that grows with its "
            "size beyond what the link takes). One fitted alpha cannot be both, which is why "
            "the fitted rows err in both directions.")


def _break_even_table(rows: list[dict], alpha: float) -> list[str]:
    lines = ["| workers | method | measured | predicted: shipped / fitted |", "|---|---|---|---|"]
    for workers in sorted({r["workers"] for r in rows}):
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "allreduce"):
            lines.append(f"| {workers} | {method} | "
                         f"{measured_break_even(rows, workers, method)} | "
                         f"faster below {predicted_break_even(rows, workers, method, alpha)} |")
    return lines


def _docs_table(rows: list[dict], target: str) -> list[str]:
    """The page's table: each method's time to target and its step, measured and predicted."""
    lines = [(f"| workers | link | method | × sooner to {target} (range) | step ms | "
              "predicted ms, shipped / fitted |"), "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {_rate(r['rate_mbit'] or math.inf)} | {r['method']} | "
                     f"{_fmt_range(r['sooner'], '×', 2)} | {r['step_s'] * 1e3:.0f} | "
                     f"{r['predicted_shipped_s'] * 1e3:.0f} / "
                     f"{r['predicted_fitted_s'] * 1e3:.0f} |")
    return lines


def tables(data: dict) -> tuple[list[str], dict]:
    """The section's lines, and what the summary JSON keeps of them."""
    rows, alpha = cost_check(summarize(data["records"]))
    spec, verdicts = data["spec"], _verdicts(rows)
    target = f"{spec['target']:.0%}"
    setting = (f"Machine: {data['machine']}. {len(spec['seeds'])} seeds "
               f"({', '.join(map(str, spec['seeds']))}) each; model: MLP {spec['hidden']} on "
               f"{spec['data']} ({_allreduce_bytes(rows):,.0f} gradient bytes a step), global "
               f"batch {spec['batch_size']}, Adam {spec['lr']:g}; target: {target} validation "
               f"accuracy (evaluated every {spec['eval_every']} steps, off the clock), at most "
               f"{spec['max_steps']} steps. Step time: median after step {SKIP_STEPS}; compute: "
               "the same step on the worker's device alone, all workers at once; comm = step − "
               "compute.")
    model = ("Predicted step = compute (the all-reduce's compute-only step) + the compressor's "
             "overhead (its compute-only step − that) + ring collectives. *Shipped*: the nominal "
             "rate (unlimited: the measured one), 5 µs a message. *Fitted*: the measured TCP "
             "rate and one per-message latency fitted to every row, **alpha = "
             f"{alpha * 1e3:.2f} ms** (gloo's cost per ring step on this machine, and the "
             "step's small all-reduces of its metrics, which the model does not count). "
             f"Error = predicted / measured − 1, within ±{TOLERANCE:.0%} marked ✓; the last "
             "column is what a per-message latency would have to be for that row alone.")
    lines = [setting, "", _verdict_line(verdicts), "",
             f"### Time to {target} validation accuracy", "", *_time_table(rows, target),
             "", "### The cost model beside the measurements", "", model, "",
             *_cost_table(rows), "", _which_term(rows), "",
             "### Where compression stops paying (step time vs the all-reduce's)", "",
             *_break_even_table(rows, alpha)]
    more = (f"Fitted per-message latency alpha = {alpha * 1e3:.2f} ms; every column, the split "
            "into compute and communication and the break-even rates: "
            "[benchmarks/RESULTS.md](../benchmarks/RESULTS.md#compressed-gradients-on-a-real-"
            "slow-network).")
    docs = [_verdict_line(verdicts), "", *_docs_table(rows, target), "", more]
    return lines, {"rows": rows, "alpha_s": alpha, "verdicts": verdicts, "docs": docs}


def write(json_path: Path, results: Path, docs: Path | None = None) -> str:
    """The section of `results` (and the table of `docs`), the plot and the summary JSON beside
    `json_path`, all from `json_path`'s records."""
    data = json.loads(Path(json_path).read_text())
    lines, derived = tables(data)
    docs_lines = derived.pop("docs")
    if docs is not None:
        write_section(Path(docs), TAG, docs_lines)
    png = Path(json_path).with_suffix(".png")
    plot(data["records"], data["spec"]["target"], png)
    Path(json_path).with_name(Path(json_path).stem + "_summary.json").write_text(
        json.dumps(derived, indent=1) + "\n")
    about = ("`benchmarks/network_compress.py`: W processes, each in a network namespace of its "
             "own (`benchmarks/netcluster.py`), joined by `jax.distributed` (gloo) over links "
             "that `tc`'s token bucket limits both ways; every step's time and every seed in "
             f"`benchmarks/{Path(json_path).name}`; the curves at the lowest rate in "
             f"`benchmarks/{png.name}`.")
    header = ["## Compressed gradients on a real slow network", "", about, ""]
    return write_section(Path(results), TAG, header + lines)
