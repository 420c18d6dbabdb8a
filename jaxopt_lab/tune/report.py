"""What `jaxopt-lab sweep` prints and plots at the end (and `--status` without running): the top
trials, the Pareto front, best-so-far / Pareto / importance PNGs, and a markdown + JSON report.

Reads the study only through Optuna's API and the sweep's conventions: `study.user_attrs
["objectives"]` names the objectives, trial user_attrs hold the measured metrics and the run
directory, and FAIL trials marked `over_budget` are left out of everything.
"""

from __future__ import annotations

import json
import math
import textwrap
import warnings
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from jaxopt_lab.profile.pareto import non_dominated

LATENCY = "latency_ms_batch1"
PLOTS = ("best_so_far.png", "pareto.png", "importances.png")
_SHORT = (("validation_", "val_"), ("accuracy", "acc"), ("latency_ms_batch", "lat_ms_b"),
          ("model_bytes", "bytes"))


def _objectives(study: optuna.Study) -> list[tuple[str, str]]:
    """(metric, direction) pairs; studies made outside the sweep fall back to Optuna's names."""
    if named := study.user_attrs.get("objectives"):
        return [(str(m), str(d)) for m, d in named]
    dirs = ["maximize" if d == StudyDirection.MAXIMIZE else "minimize" for d in study.directions]
    names = study.metric_names or (["value"] if len(dirs) == 1 else
                                   [f"value{i}" for i in range(len(dirs))])
    return list(zip(names, dirs))


def _sign(direction: str) -> float:
    """Multiply by this to turn "higher is better" into "lower is better"."""
    return -1.0 if direction == "maximize" else 1.0


def _trials(study: optuna.Study, state: TrialState | None = None) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False)
            if not (t.state == TrialState.FAIL and t.user_attrs.get("over_budget"))
            and state in (None, t.state)]


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state, over-budget FAIL trials not counted (the sweep's workers raced past it)."""
    counts = dict.fromkeys(("complete", "pruned", "failed", "running", "waiting"), 0)
    for t in _trials(study):
        counts["failed" if t.state == TrialState.FAIL else t.state.name.lower()] += 1
    return counts


def _row(trial: FrozenTrial, objectives: list[tuple[str, str]]) -> dict:
    """One trial as plain data (JSON-ready): objectives, params, measured metrics, run location.

    A PRUNED trial has no objective values; it shows what was measured when it was stopped (the
    first objective's last reported value where its metric was not recorded).
    """
    attrs, iv = trial.user_attrs, trial.intermediate_values
    values = trial.values or [attrs.get(m) for m, _ in objectives]
    if values[0] is None and iv:
        values[0] = iv[max(iv)]
    metrics = {k: v for k, v in attrs.items()
               if (k.startswith(("validation_", "test_")) or k in (LATENCY, "model_bytes"))  # reported, not chosen
               and isinstance(v, int | float) and k not in dict(objectives)}
    where = (f"{attrs['population_dir']}[{attrs.get('population_index', '?')}]"
             if "population_dir" in attrs else str(attrs.get("run_dir", "")))
    return {"number": trial.number, "state": trial.state.name,
            "objectives": {m: v for (m, _), v in zip(objectives, values)},
            "params": dict(trial.params), "metrics": metrics, "where": where,
            "resumed": bool(attrs.get("resumed", False))}


def top_trials(study: optuna.Study, k: int = 10) -> list[dict]:
    """The best `k` COMPLETE trials by the first objective; when fewer than `k` completed, PRUNED
    trials fill the rest, ranked by the last value they reported (what they reached, not more)."""
    objectives = _objectives(study)
    sign = _sign(objectives[0][1])
    done = sorted(_trials(study, TrialState.COMPLETE), key=lambda t: (sign * t.values[0], t.number))
    pruned = sorted(_trials(study, TrialState.PRUNED), key=lambda t: (
        sign * t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values
        else math.inf, t.number))
    return [_row(t, objectives) for t in (done + pruned)[:k]]


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The non-dominated COMPLETE trials, in trial order.

    Multi-objective: Optuna's own front (`study.best_trials`). Single-objective: the front of the
    objective against the measured `latency_ms_batch1` (lower is better), so the hardware-aware
    trade-off is visible even when latency was not searched on; trials without it are left out.
    """
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    trials = [t for t in _trials(study, TrialState.COMPLETE) if LATENCY in t.user_attrs]
    flags = non_dominated([(t.values[0], float(t.user_attrs[LATENCY])) for t in trials],
                          maximize=(_objectives(study)[0][1] == "maximize", False))
    return [t for t, on_front in zip(trials, flags, strict=True) if on_front]


def _front_values(study: optuna.Study, trial: FrozenTrial | None = None) -> dict:
    """The Pareto axes (metric names) mapped to the trial's values on them (None: no trial)."""
    names = [m for m, _ in _objectives(study)]
    if len(names) == 1:
        names.append(LATENCY)
        values = trial and [trial.values[0], trial.user_attrs[LATENCY]]
    else:
        values = trial and trial.values
    return dict(zip(names, values or [None] * len(names)))


def _short(key: str, keys: list[str]) -> str:
    """A column header: a config key's last part (more parts when two keys share it)."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        tail = ".".join(parts[-n:])
        if sum(k == tail or k.endswith("." + tail) for k in keys) == 1:
            break
    for long, short in _SHORT:
        tail = tail.replace(long, short)
    return tail


def _cell(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _grid(headers: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(c) for c in col) for col in zip(headers, *body)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
            for line in [headers, *body]]


def format_table(rows: list[dict], width: int = 100) -> str:
    """Rows from `top_trials` as a fixed-width table: #, state, objectives, metrics, params,
    where. When the params would push it past `width`, they go on wrapped `key=value` lines below
    instead. Floats to 4 significant digits; a long run location keeps its tail."""
    if not rows:
        return "(no finished trials to show)"
    cols = {sect: list(dict.fromkeys(k for r in rows for k in r[sect]))
            for sect in ("objectives", "metrics", "params")}
    every = [*cols["objectives"], *cols["metrics"]]
    where = [r["where"] if len(r["where"]) <= 28 else "…" + r["where"][-27:] for r in rows]
    head = ["#", "state", *(_short(k, every) for k in every)]
    body = [[str(r["number"]) + ("r" if r["resumed"] else ""), r["state"].lower(),
             *(_cell(r[s].get(k)) for s in ("objectives", "metrics") for k in cols[s])]
            for r in rows]
    phead = [_short(k, cols["params"]) for k in cols["params"]]
    pbody = [[_cell(r["params"].get(k)) for k in cols["params"]] for r in rows]
    lines = _grid(head + phead + ["where"], [b + p + [w] for b, p, w in zip(body, pbody, where)])
    if max(map(len, lines)) > width:
        lines = _grid(head + ["where"], [b + [w] for b, w in zip(body, where)])
        for r, p in zip(rows, pbody):
            pairs = "  ".join(f"{h}={c}" for h, c in zip(phead, p) if c != "-")
            lines.append(textwrap.fill(pairs, width, initial_indent=f"  #{r['number']}: ",
                                       subsequent_indent="      "))
    if any(r["resumed"] for r in rows):
        lines.append("(r = resumed after a crash)")
    return "\n".join(lines)


def header_line(study: optuna.Study) -> str:
    """One line: the study, its trial counts by state, its objectives."""
    c = trial_counts(study)
    objs = ", ".join(f"{m} ({d[:3]})" for m, d in _objectives(study))
    states = ", ".join(f"{n} {s}" for s, n in c.items() if n or s != "waiting")
    return f"study {study.study_name}: {sum(c.values())} trials ({states}); objectives: {objs}"


def format_report(study: optuna.Study, k: int = 10) -> str:
    """The header, the top-`k` table and the Pareto table (best first): what the CLI prints."""
    rows = top_trials(study, k)
    if not rows:
        return header_line(study) + "\nno complete or pruned trials yet: nothing to rank."
    sign = _sign(_objectives(study)[0][1])
    front = [_row(t, _objectives(study))
             for t in sorted(pareto_front(study), key=lambda t: sign * t.values[0])]
    against = "" if len(study.directions) > 1 else f" (first objective vs {LATENCY})"
    pareto = format_table(front) if front or not rows else (
        f"(no trial recorded {LATENCY}: train.measure=False)")
    return (f"{header_line(study)}\n\ntop {len(rows)} trials:\n{format_table(rows)}\n\n"
            f"Pareto front{against}:\n{pareto}")


def _varied_params(done: list[FrozenTrial]) -> list[str]:
    keys = dict.fromkeys(k for t in done for k in t.params)
    return [k for k in keys if len({repr(t.params[k]) for t in done if k in t.params}) > 1]


def skipped_plots(study: optuna.Study) -> dict[str, str]:
    """The plots `write_plots` leaves out, each with the reason (printed and reported instead)."""
    done = _trials(study, TrialState.COMPLETE)
    if not done:
        return dict.fromkeys(PLOTS, "no complete trials yet")
    skipped, n_obj, varied = {}, len(study.directions), _varied_params(done)
    if n_obj > 3:
        skipped["pareto.png"] = f"{n_obj} objectives: the plot shows 2 or 3"
    elif n_obj == 1 and not any(LATENCY in t.user_attrs for t in done):
        skipped["pareto.png"] = f"no complete trial recorded {LATENCY}"
    if len(done) < 3 or not varied:
        skipped["importances.png"] = (f"needs >= 3 complete trials and >= 1 varied param "
                                      f"(have {len(done)} and {len(varied)})")
    return skipped


def write_plots(study: optuna.Study, out_dir: str | Path) -> list[str]:
    """Writes best_so_far.png, pareto.png and importances.png into `out_dir` (those that apply;
    `skipped_plots` says why any is missing) and returns the written paths.

    Optuna's matplotlib plots wherever they fit. Own code only where they do not: the best-so-far
    line of a multi-objective study's first objective (Optuna draws none with a `target`) and the
    single-objective objective-vs-latency front. Importances are for the first objective.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (name0, dir0), multi = _objectives(study)[0], len(study.directions) > 1
    done, sign = _trials(study, TrialState.COMPLETE), _sign(dir0)
    first = (lambda t: sign * t.values[0]) if multi else None  # PED-ANOVA: lower is better
    written, skipped = [], skipped_plots(study)
    for name in (n for n in PLOTS if n not in skipped):
        # rc_context: Optuna's plots switch matplotlib's global style; put it back afterwards.
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.filterwarnings("ignore", message=".*low `target` values")  # as intended
            if name == "best_so_far.png":
                ax = ovm.plot_optimization_history(
                    study, target=(lambda t: t.values[0]) if multi else None, target_name=name0)
                if multi:
                    best = min if dir0 == "minimize" else max
                    ys = [best(t.values[0] for t in done[:i + 1]) for i in range(len(done))]
                    ax.plot([t.number for t in done], ys, color="C3", label="Best Value")
                    ax.legend()
            elif name == "pareto.png":
                ax = (ovm.plot_pareto_front(study, target_names=list(_front_values(study)))
                      if multi else _single_objective_front(study, plt))
            else:
                ax = ovm.plot_param_importances(study, params=_varied_params(done),
                                                target=first, target_name=name0)
            ax.figure.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        written.append(str(out / name))
    return written


def _single_objective_front(study: optuna.Study, plt):
    """The objective against measured latency: every complete trial, the front joined by a step."""
    name0 = _objectives(study)[0][0]
    done = [t for t in _trials(study, TrialState.COMPLETE) if LATENCY in t.user_attrs]
    front = sorted(pareto_front(study), key=lambda t: t.user_attrs[LATENCY])
    ax = plt.subplots(figsize=(6.4, 4.8))[1]
    ax.scatter([t.user_attrs[LATENCY] for t in done], [t.values[0] for t in done],
               color="lightgray", label="trials")
    xs, ys = [t.user_attrs[LATENCY] for t in front], [t.values[0] for t in front]
    ax.step(xs, ys, where="post", color="C0", marker="o", label="Pareto front")
    for t, x, y in zip(front, xs, ys):
        ax.annotate(f"#{t.number}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel=f"{LATENCY} (measured)", ylabel=name0, title=f"{name0} vs latency")
    ax.legend()
    return ax


def write_report(study: optuna.Study, workdir: str | Path) -> dict:
    """Writes WORKDIR/sweep_report.md (tables, plot links) and sweep_report.json; returns the JSON.

    The plots go into WORKDIR too, so the markdown links them by file name.
    """
    workdir = Path(workdir)
    plots, skipped = [Path(p).name for p in write_plots(study, workdir)], skipped_plots(study)
    front = [{"number": t.number, "values": _front_values(study, t)} for t in pareto_front(study)]
    report = {"study": study.study_name, "objectives": [list(o) for o in _objectives(study)],
              "counts": trial_counts(study), "top_trials": top_trials(study),
              "pareto": {"axes": list(_front_values(study)), "trials": front},
              "plots": plots, "plots_skipped": skipped}
    links = "\n\n".join([f"![{p}]({p})" for p in plots]
                        + ["\n".join(f"- {p}: skipped, {why}" for p, why in skipped.items())])
    md = f"# Sweep report\n\n```\n{format_report(study)}\n```\n\n## Plots\n\n{links.strip()}"
    (workdir / "sweep_report.md").write_text(md + "\n")
    (workdir / "sweep_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
