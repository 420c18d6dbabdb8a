"""Hardware-aware width search for the MNIST-1D CNN: validation accuracy against measured latency,
the width-masked vmapped search against the same search run trial by trial.

    .venv/bin/python experiments/nas_widths.py [--trials 16] [--population 8] [--steps 1000]

The space: each of the three convs' channels from {8, 16, 32, 64} (64 architectures). Optuna's
multi-objective TPE (seeded) asks a batch of `population` trials at a time; objectives are the
validation accuracy (maximize; 10 % of the training set held out) and `latency_ms_batch1`
(minimize) of the trial's own narrow model, measured by `core.measure.measure_model`.

(a) masked: each batch is one population of the 64-channel CNN, every member masked to its
    widths (`workflows.nas.start_population`, then the loop: one vmapped program), its latency
    measured on its shrunk model (`workflows.nas.shrunk_member`). The same search from the
    command line: configs/sweeps/mnist1d_cnn_widths.py (`sweep.widths`).
(b) alone: the same trials, in the same order, enqueued in a second study, each trained as its
    own narrow model by `core.loop.train_and_evaluate` (which measures its latency).
Trial n trains from seed n both ways (initialisation and data order), and a masked member starts
as its narrow model does, so (a) and (b) should agree per trial up to float rounding: the
agreement is the check, the wall times are the comparison. Both run in this one process, one
after the other, without a persistent compilation cache.

Latency at batch 1 on a shared CPU is noisy, so after both searches every architecture is timed
again in interleaved rounds and the front is given with those latencies too.

Writes results/nas_widths.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import optuna
from common import ROOT, machine

from jaxopt_lab import default_config, load_run, model_config, train_and_evaluate
from jaxopt_lab.core.measure import count_flops, latency_ms, measure_model
from jaxopt_lab.core.state import sample_input
from jaxopt_lab.core.tasks import inference
from jaxopt_lab.models import CNN1D
from jaxopt_lab.workflows.nas import shrunk_member, start_population, width_config

CHOICES = (8, 16, 32, 64)
CONVS = 3
DIRECTIONS = ("maximize", "minimize")  # validation accuracy, latency at batch 1
COSTS = ("latency_ms_batch1", "latency_ms_batch256", "flops_per_example", "model_bytes")


def config(channels, steps: int, seed: int = 0):
    c = default_config()
    c.model = model_config("cnn1d", channels=channels)
    c.seed = seed
    c.data.validation_fraction = 0.1
    c.train.steps = steps
    c.train.eval_every = c.train.checkpoint_every = steps
    c.train.log_every = max(1, steps // 4)
    c.train.steps_per_call = 1  # XLA:CPU runs scanned conv steps slower (prune_lottery.py)
    c.train.progress = False
    return c


def widths_of(trial: optuna.Trial) -> tuple[int, ...]:
    return tuple(trial.suggest_categorical(f"conv{i}", CHOICES) for i in range(CONVS))


def study(seed: int, startup: int) -> optuna.Study:
    """The first batch at random, TPE from the second on."""
    return optuna.create_study(directions=list(DIRECTIONS), sampler=optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup))


def masked_search(args, runs: Path) -> tuple[optuna.Study, list[dict], dict]:
    """(a): every batch of asked trials one width-masked population of the widest CNN
    (`train_widths`'s two stages, timed apart)."""
    search, rows = study(args.seed, args.population), []
    times = {"start_s": 0.0, "loop_s": 0.0, "train_steps_s": 0.0, "measure_s": 0.0}
    began = time.perf_counter()
    for batch in range(args.trials // args.population):
        trials = [search.ask() for _ in range(args.population)]
        widths = [widths_of(t) for t in trials]
        workdir = str(runs / f"batch{batch}")
        widest = width_config(config(max(CHOICES), args.steps), widths, [t.number for t in trials])
        widest.train.measure = False  # the widest model's cost is no member's
        t0 = time.perf_counter()
        start_population(widest, widths, workdir)
        t1 = time.perf_counter()
        summary = train_and_evaluate(widest, workdir)
        t2 = time.perf_counter()
        run = load_run(workdir)
        for i, trial in enumerate(trials):
            model, variables = shrunk_member(run, i)
            costs = measure_model(model, variables, sample_input(run.dataset))
            member = summary["members"][i]
            search.tell(trial, [member["validation_accuracy"], costs["latency_ms_batch1"]])
            rows.append({"trial": trial.number, "widths": list(model.channels),
                         "validation_accuracy": member["validation_accuracy"],
                         "test_accuracy": member["test_accuracy"],
                         **{k: costs[k] for k in COSTS}})
        t3 = time.perf_counter()
        for key, seconds in (("start_s", t1 - t0), ("loop_s", t2 - t1),
                             ("train_steps_s", summary["train_wall_s"]), ("measure_s", t3 - t2)):
            times[key] += seconds
        print(f"(a) batch {batch}: start {t1 - t0:.0f} s, loop {t2 - t1:.0f} s (steps "
              f"{summary['train_wall_s']:.0f} s), measure {t3 - t2:.0f} s", flush=True)
    return search, rows, {"wall_s": time.perf_counter() - began, **times}


def alone_search(args, asked: list[dict], runs: Path) -> tuple[optuna.Study, list[dict], dict]:
    """(b): the same trials, each its own narrow model trained alone by the loop (which
    measures its latency)."""
    search, rows = study(args.seed, args.population), []
    times = {"loop_s": 0.0, "train_steps_s": 0.0}
    began = time.perf_counter()
    for params in asked:
        search.enqueue_trial(params)
        trial = search.ask()
        widths = widths_of(trial)
        t0 = time.perf_counter()
        summary = train_and_evaluate(config(widths, args.steps, seed=trial.number),
                                     str(runs / f"trial{trial.number}"))
        times["loop_s"] += time.perf_counter() - t0
        times["train_steps_s"] += summary["train_wall_s"]
        search.tell(trial, [summary["validation_accuracy"], summary["latency_ms_batch1"]])
        rows.append({"trial": trial.number, "widths": list(widths),
                     "validation_accuracy": summary["validation_accuracy"],
                     "test_accuracy": summary["test_accuracy"],
                     **{k: summary[k] for k in COSTS}})
        print(f"(b) trial {trial.number} {widths}: {time.perf_counter() - t0:.0f} s (steps "
              f"{summary['train_wall_s']:.0f} s)", flush=True)
    return search, rows, {"wall_s": time.perf_counter() - began, **times}


def control_runs(args, asked: list[dict], runs: Path) -> list[dict]:
    """(c), the first `control` trials: the narrow model itself as an unmasked population of two
    copies of its seed. Vmapping alone changes the float rounding; how far that moves a run
    from the one trained alone is the yardstick for (a) vs (b)."""
    rows = []
    for number, params in enumerate(asked[:args.control]):
        widths = tuple(params[f"conv{i}"] for i in range(CONVS))
        c = config(widths, args.steps, seed=number)
        c.population, c.train.measure = (("seed", (number, number)),), False
        member = train_and_evaluate(c, str(runs / f"trial{number}"))["members"][0]
        rows.append({"trial": number, "widths": list(widths),
                     **{f"{split}_accuracy": member[f"{split}_accuracy"]
                        for split in ("validation", "test")}})
        print(f"(c) trial {number} {widths}", flush=True)
    return rows


def agreement(rows: list[dict], reference: list[dict]) -> dict:
    """|Δ accuracy| per split between `rows` and the same trials of `reference`."""
    by_trial = {r["trial"]: r for r in reference}
    out = {}
    for split in ("validation", "test"):
        d = np.array([r[f"{split}_accuracy"] - by_trial[r["trial"]][f"{split}_accuracy"]
                      for r in rows])
        out[split] = {"max_abs": float(np.max(np.abs(d))), "mean_abs": float(np.mean(np.abs(d))),
                      "mean": float(np.mean(d)), "identical": int(np.sum(d == 0)),
                      "trials": len(d)}
    return out


def remeasure(architectures: list[tuple[int, ...]], rounds: int) -> dict[tuple, float]:
    """Latency at batch 1 of each architecture, again: `rounds` rounds, each timing every
    architecture once (the median of 20 calls), interleaved so that a burst of load on this
    shared machine hits all alike; the median over rounds. Weights do not change a dense
    model's latency, so each is timed at its initialisation."""
    x = np.zeros((1, 40), np.float32)
    models = {a: CNN1D(num_classes=10, channels=a) for a in architectures}
    variables = {a: m.init(jax.random.key(0), x) for a, m in models.items()}
    times: dict[tuple, list[float]] = {a: [] for a in architectures}
    for _ in range(rounds):
        for a, m in models.items():
            times[a].append(latency_ms(inference(m), x, 1, variables=variables[a], runs=20))
    return {a: statistics.median(t) for a, t in times.items()}


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (accuracy, latency) points no other point beats in both, ties kept."""
    return [i for i, (acc, lat) in enumerate(points)
            if not any(a >= acc and t <= lat and (a, t) != (acc, lat) for a, t in points)]


def run(args) -> dict:
    runs = Path(args.runs)
    shutil.rmtree(runs, ignore_errors=True)  # timed from scratch: nothing resumes
    load_before = os.getloadavg()
    masked, rows_a, times_a = masked_search(args, runs / "masked")
    asked = [t.params for t in sorted(masked.trials, key=lambda t: t.number)]
    alone, rows_b, times_b = alone_search(args, asked, runs / "alone")
    rows_c = control_runs(args, asked, runs / "control")
    for search, rows in ((masked, rows_a), (alone, rows_b)):
        front = {t.number for t in search.best_trials}
        for row in rows:
            row["pareto"] = row["trial"] in front
    rows_a.sort(key=lambda r: r["trial"])
    clean = remeasure(sorted({tuple(r["widths"]) for r in rows_a}), args.rounds)
    points = [(r["validation_accuracy"], clean[tuple(r["widths"])]) for r in rows_a]
    for i in pareto(points):  # the front of (a)'s trials
        rows_a[i]["pareto_remeasured"] = True
    for row in rows_a:
        row["latency_ms_batch1_remeasured"] = clean[tuple(row["widths"])]
    return {
        "machine": f"this CPU: {os.cpu_count()} cores, XLA:CPU; {machine()}",
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "runs")},
                     "choices": list(CHOICES), "sampler": "optuna TPESampler (multi-objective)",
                     "directions": list(DIRECTIONS)},
        "times": {"masked": times_a, "alone": times_b},
        "agreement": {"masked_vs_alone": agreement(rows_a, rows_b),
                      "masked_vs_alone_control_trials": agreement(rows_a[:len(rows_c)], rows_b),
                      "control_vs_alone": agreement(rows_c, rows_b)},
        "masked": rows_a, "alone": rows_b, "control": rows_c,
    }


def front(rows: list[dict], key: str = "pareto", latency: str = "latency_ms_batch1") -> str:
    chosen = sorted((r for r in rows if r.get(key)), key=lambda r: r[latency])
    return ", ".join(f"{tuple(r['widths'])} {r['validation_accuracy']:.3f} @ {r[latency]:.3f} ms"
                     for r in chosen)


def agreement_row(name: str, a: dict) -> str:
    v, t = a["validation"], a["test"]
    return (f"| {name} | {v['trials']} | {100 * v['max_abs']:.2f}, {100 * v['mean_abs']:.2f}, "
            f"{100 * v['mean']:+.2f} | {100 * t['max_abs']:.2f}, {100 * t['mean_abs']:.2f}, "
            f"{100 * t['mean']:+.2f} | {v['identical']}, {t['identical']} |")


def costs(results: dict) -> dict:
    """What the tables' costs say together: (a)'s FLOPs over (b)'s (every member at the widest
    width), and how latency ranks with FLOPs."""
    from scipy.stats import spearmanr

    x = np.zeros((1, 40), np.float32)
    widest = CNN1D(num_classes=10, channels=max(results["settings"]["choices"]))
    widest_flops = count_flops(inference(widest), widest.init(jax.random.key(0), x), x)
    rows = results["alone"]
    flops = [r["flops_per_example"] for r in rows]
    b1 = [r["latency_ms_batch1_remeasured"] for r in results["masked"]]
    return {"flops_ratio": widest_flops * len(rows) / sum(flops), "flops": (min(flops), max(flops)),
            "b1": (min(b1), max(b1)), "rho_b1": float(spearmanr(flops, b1)[0]),
            "rho_b256": float(spearmanr(flops, [r["latency_ms_batch256"] for r in rows])[0])}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "nas_widths.json").write_text(json.dumps(results, indent=2) + "\n")
    s, agree, cost = results["settings"], results["agreement"], costs(results)
    a, b = results["times"]["masked"], results["times"]["alone"]
    n, load = s["trials"], results["load_average_1min"]
    lines = [
        "# Width search (NAS) for the MNIST-1D CNN: masked population vs trial by trial", "",
        (f"Written by `experiments/nas_widths.py` on {results['machine']}: a machine shared with "
        f"other jobs (1-minute load average {load['before']:.1f} at the start, "
        f"{load['after']:.1f} at the end)."), "",
        (f"{n} trials of Optuna's multi-objective TPE (seed {s['seed']}; the first batch at "
        f"random), asked {s['population']} at a time; each conv's channels from {s['choices']}; "
        f"{s['steps']} steps of Adam 1e-2, batch 100, on 90 % of the MNIST-1D training set. "
        "Objectives: validation accuracy (the 10 % held out) and latency at batch 1 of the "
        "trial's narrow model (`core.measure`: the median of 10 warm calls). (a) trains each "
        "batch as one population of the 64-channel CNN, every member's extra channels masked to "
        "zero (`jaxopt_lab.workflows.nas`), and measures each member's shrunk model; (b) trains the "
        "same trials, in the same order, one by one as their own narrow models. Trial n uses "
        "seed n both ways, and a masked member starts from its narrow model's own "
        "initialisation."), "",
        ("| search | wall time | per trial | steps (train_wall_s: with their compilation) | start (members' inits) | loop "
        "(build, compile, steps, eval) | latency of the shrunk members |"),
        "|---|---|---|---|---|---|---|",
        (f"| (a) masked, {s['population']} per vmapped population | {a['wall_s']:.0f} s | "
        f"{a['wall_s'] / n:.1f} s | {a['train_steps_s']:.0f} s | {a['start_s']:.0f} s | "
        f"{a['loop_s']:.0f} s | {a['measure_s']:.0f} s |"),
        (f"| (b) trial by trial | {b['wall_s']:.0f} s | {b['wall_s'] / n:.1f} s | "
        f"{b['train_steps_s']:.0f} s | – | {b['loop_s']:.0f} s (latency included) | – |"), "",
        (f"(a) / (b) wall time: {a['wall_s'] / b['wall_s']:.2f}×; steps alone: "
        f"{a['train_steps_s'] / b['train_steps_s']:.2f}×. (a) computes every member at "
        f"{max(s['choices'])} channels, {cost['flops_ratio']:.1f}× the FLOPs of (b)'s narrow "
        f"models, so its steps ran at {cost['flops_ratio'] * b['train_steps_s'] / a['train_steps_s']:.1f}× "
        "(b)'s FLOP rate; what masking wastes, vmapping about wins back on this CPU. (a)'s "
        "start compiles one initialiser per architecture (a member starts as its narrow model), "
        "as (b)'s loop compiles one per trial."), "",
        "Per-trial agreement with (b), in accuracy points (Δ = this − (b)):",
        "", ("| runs | trials | validation: max abs Δ, mean abs Δ, mean Δ | test: the same | "
         "identical (val, test) |"), "|---|---|---|---|---|",
        *(agreement_row(name, agree[key]) for name, key in (
            ("(a) masked member", "masked_vs_alone"),
            ("(a) masked member, the control's trials", "masked_vs_alone_control_trials"),
            ("(c) control: the narrow model in an unmasked population", "control_vs_alone"))),
        "", ("A masked member and its narrow model trained alone start equal and compute the same "
        "function; they agree to float rounding over the first steps (tests/test_nas.py: after 20 "
        "steps, parameters within 1e-5). Over a whole run the rounding differences of a different program grow "
        "(Adam at 1e-2); (c), which changes nothing but vmapping the narrow model itself, "
        "measures how far that alone moves a run."), "",
        "Pareto fronts as each search measured latency (what its sampler was told):", "",
        f"- (a): {front(results['masked'])}",
        f"- (b): {front(results['alone'])}", "",
        (f"Latency at batch 1 measured again after both searches ({s['rounds']} interleaved rounds "
        "of every architecture, each the median of 20 calls; the median over rounds), and the "
        "front of (a)'s trials with it:"), "",
        f"- {front(results['masked'], 'pareto_remeasured', 'latency_ms_batch1_remeasured')}", "",
        (f"Re-measured, latency at batch 1 spans {cost['b1'][0]:.3f}–{cost['b1'][1]:.3f} ms "
         f"over a {cost['flops'][1] / cost['flops'][0]:.0f}× range of FLOPs "
         f"({cost['flops'][0]}–{cost['flops'][1]} per example; Spearman ρ with FLOPs "
         f"{cost['rho_b1']:+.2f}, against {cost['rho_b256']:+.2f} for (b)'s latency at batch "
         "256): at batch 1 these CNNs cost this CPU fixed per-call and per-layer work more than "
         "arithmetic, so the widest layers are not the slowest, and the front is short."), "",
        ("| trial | channels | val acc (a) | val acc (b) | test (a) | test (b) | b1 ms (a) | "
        "b1 ms (b) | b1 ms again | b256 ms (a) | b256 ms (b) | FLOPs / example | Pareto |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x, y in zip(results["masked"], results["alone"], strict=True):
        marks = [name for name, flag in (("a", x["pareto"]), ("b", y["pareto"]),
                                         ("again", x.get("pareto_remeasured"))) if flag]
        lines.append(
            f"| {x['trial']} | {tuple(x['widths'])} | {x['validation_accuracy']:.4f} | "
            f"{y['validation_accuracy']:.4f} | {x['test_accuracy']:.4f} | "
            f"{y['test_accuracy']:.4f} | {x['latency_ms_batch1']:.3f} | "
            f"{y['latency_ms_batch1']:.3f} | {x['latency_ms_batch1_remeasured']:.3f} | "
            f"{x['latency_ms_batch256']:.3f} | {y['latency_ms_batch256']:.3f} | "
            f"{x['flops_per_example']} | {', '.join(marks)} |")
    (out / "nas_widths.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "nas_widths.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, agree) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, label, marker, color in (("masked", "(a) masked", "o", "tab:blue"),
                                       ("alone", "(b) alone", "x", "tab:orange")):
        rows = results[name]
        ax.scatter([r["latency_ms_batch1"] for r in rows],
                   [r["validation_accuracy"] for r in rows], marker=marker, color=color,
                   alpha=0.6, label=label)
        chosen = sorted((r for r in rows if r["pareto"]), key=lambda r: r["latency_ms_batch1"])
        ax.step([r["latency_ms_batch1"] for r in chosen],
                [r["validation_accuracy"] for r in chosen], where="post", color=color,
                label=f"{label}: Pareto front")
    ax.set_xlabel("latency at batch 1 (ms, this CPU)")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=8)
    alone = {r["trial"]: r["validation_accuracy"] for r in results["alone"]}
    for name, color in (("masked", "tab:blue"), ("control", "tab:green")):
        rows = results[name]
        agree.scatter([alone[r["trial"]] for r in rows], [r["validation_accuracy"] for r in rows],
                      color=color, marker="o" if name == "masked" else "s", alpha=0.7,
                      label={"masked": "(a) masked member",
                             "control": "(c) narrow model, unmasked population"}[name])
    low, high = min(alone.values()), max(alone.values())
    agree.plot([low, high], [low, high], color="black", linewidth=0.8)
    agree.set_xlabel("(b) trained alone: validation accuracy")
    agree.set_ylabel("validation accuracy")
    agree.set_title("per trial, against (b)", fontsize=9)
    agree.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--population", type=int, default=8, help="trials asked per batch")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="the sampler's")
    parser.add_argument("--rounds", type=int, default=7, help="of the latency re-measurement")
    parser.add_argument("--control", type=int, default=8, help="trials run as control (c)")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the .md and .png from the .json in --out")
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "nas_widths"))
    args = parser.parse_args()
    if args.trials % args.population:
        parser.error("--trials must be a multiple of --population")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out)
    write(json.loads((out / "nas_widths.json").read_text()) if args.render else run(args), out)


if __name__ == "__main__":
    main()
