"""The scikit-optimize bridge (`SkoptSampler`, an Optuna sampler) against scikit-optimize's own
`gp_minimize` on standard test functions: Branin (2-D) and Hartmann-6 (6-D), same budget, same
initial-point count, same acquisition (gp_hedge), several seeds.

    .venv/bin/python experiments/hpo_bridge.py [--calls 30] [--initial 10] [--seeds 10]

The bridge rebuilds skopt's `Optimizer` from the study at every ask (so resumed studies and other
workers ask the same points); `gp_minimize` keeps one optimizer for the whole run. If the bridge
lost something on the way (the GP's inputs, the acquisition, the best value), its median best
would be worse. The check: the bridge's median best over seeds is no worse than gp_minimize's
(lower is better; both minimize). Seeds differ between the two (their random initial points are
drawn by different generators), so per-seed values are not paired.

Writes results/hpo_bridge.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
from common import ROOT, machine
from skopt import gp_minimize
from skopt.benchmarks import branin, hart6

from jaxopt_lab.tune.skopt_sampler import SkoptSampler

# name: (function, bounds, known minimum)
FUNCTIONS = {
    "branin": (branin, [(-5.0, 10.0), (0.0, 15.0)], 0.397887),
    "hartmann6": (hart6, [(0.0, 1.0)] * 6, -3.32237),
}
METHODS = {"gp_minimize": "skopt gp_minimize", "bridge": "SkoptSampler in Optuna"}


def with_gp_minimize(fn, bounds, calls: int, initial: int, seed: int) -> list[float]:
    result = gp_minimize(fn, bounds, n_calls=calls, n_initial_points=initial,
                         acq_func="gp_hedge", random_state=seed)
    return [float(v) for v in result.func_vals]


def with_bridge(fn, bounds, calls: int, initial: int, seed: int) -> list[float]:
    sampler = SkoptSampler("GP", seed=seed, n_initial_points=initial, acq_func="gp_hedge")
    study = optuna.create_study(sampler=sampler, direction="minimize")

    def objective(trial):
        return fn([trial.suggest_float(f"x{i}", low, high) for i, (low, high) in enumerate(bounds)])

    study.optimize(objective, n_trials=calls)
    return [float(t.value) for t in sorted(study.trials, key=lambda t: t.number)]


RUNNERS = {"gp_minimize": with_gp_minimize, "bridge": with_bridge}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--initial", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="The objective has been evaluated at this point")
    results = {"machine": machine(), "calls": args.calls, "initial": args.initial,
               "seeds": list(range(args.seeds)), "functions": {}}
    for name, (fn, bounds, minimum) in FUNCTIONS.items():
        entry = {"minimum": minimum, "methods": {}}
        for method, run in RUNNERS.items():
            start = time.perf_counter()
            values = [run(fn, bounds, args.calls, args.initial, seed) for seed in range(args.seeds)]
            best = [min(v) for v in values]
            entry["methods"][method] = {
                "values": values, "best": best, "median_best": statistics.median(best),
                "best_so_far": [np.minimum.accumulate(v).tolist() for v in values],
                "seconds": time.perf_counter() - start}
            print(f"{name} {method}: median best {statistics.median(best):.4f}", flush=True)
        medians = {m: r["median_best"] for m, r in entry["methods"].items()}
        entry["bridge_no_worse"] = medians["bridge"] <= medians["gp_minimize"]
        results["functions"][name] = entry
    out = Path(args.out)
    (out / "hpo_bridge.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "hpo_bridge.md").write_text(markdown(results))
    plot(results, out / "hpo_bridge.png")


def markdown(results: dict) -> str:
    seeds = len(results["seeds"])
    lines = [
        "# The scikit-optimize bridge against `gp_minimize`",
        "",
        (f"Written by `experiments/hpo_bridge.py` on {results['machine']}. {results['calls']} "
         f"evaluations a run, the first {results['initial']} random, gp_hedge acquisition, "
         f"{seeds} seeds (0..{seeds - 1}) each; lower is better. The check: the bridge's median "
         "best is no worse than gp_minimize's."),
        "",
        "| function (minimum) | method | best per seed | median best | check |",
        "|---|---|---|---|---|",
    ]
    for name, entry in results["functions"].items():
        for method, r in entry["methods"].items():
            best = ", ".join(f"{v:.3f}" for v in r["best"])
            check = ("met" if entry["bridge_no_worse"] else "not met") if method == "bridge" else ""
            lines.append(f"| {name} ({entry['minimum']}) | {METHODS[method]} | {best} | "
                         f"{r['median_best']:.4f} | {check} |")
    lines += ["", "![best so far](hpo_bridge.png)", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["functions"]), figsize=(10, 3.6))
    for ax, (name, entry) in zip(axes, results["functions"].items(), strict=True):
        for method, r in entry["methods"].items():
            curves = np.array(r["best_so_far"]) - entry["minimum"]
            x = np.arange(1, curves.shape[1] + 1)
            line, = ax.plot(x, np.median(curves, axis=0), label=f"{METHODS[method]} (median)")
            ax.fill_between(x, curves.min(axis=0), curves.max(axis=0), color=line.get_color(),
                            alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel("evaluation")
        ax.set_ylabel("best so far − minimum")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
