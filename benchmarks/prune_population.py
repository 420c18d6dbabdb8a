"""A whole accuracy–sparsity curve as one vmapped program vs the same runs one after another.

    .venv/bin/python benchmarks/prune_population.py [--steps 500] [--rounds 2]

The target sparsity is a value in the pruning state, so one population trains every target.
Both sides are whole `train_and_evaluate` runs (compile, train, evaluate, checkpoint), what a user
waits for; the rounds alternate population and sequential so that a busy spell on this shared
machine hits both, and the best of each is compared. Every member's final parameters are checked
against its run alone.

Writes the "Pruning: a sparsity curve in one program" section of benchmarks/RESULTS.md and
benchmarks/prune_population.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from results_file import write_section

from jaxopt_lab.core.config import load_config
from jaxopt_lab.core.loop import train_and_evaluate
from jaxopt_lab.core.run import load_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from common import ROOT, machine

TARGETS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98)


def config(steps: int, channels: int, population: tuple = ()):
    P = "--config.techniques.prune"
    return load_config(str(ROOT / "configs" / "mnist1d_cnn.py"), [
        f"--config.model.channels={channels}", f"--config.train.steps={steps}",
        f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}",
        f"--config.train.log_every={steps // 5}", "--config.train.progress=False",
        "--config.train.measure=False", "--config.train.steps_per_call=1",
        f"{P}.method=magnitude", f"{P}.begin_step={steps // 10}",
        f"{P}.end_step={steps * 6 // 10}", f"{P}.frequency={max(steps // 60, 1)}",
        f"--config.population={population!r}"])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prune_population_"))
    population = (("techniques.prune.sparsity", TARGETS),)

    def run_population(tag):
        train_and_evaluate(config(args.steps, args.channels, population), str(root / tag))

    def run_sequential(tag):
        for i, target in enumerate(TARGETS):
            c = config(args.steps, args.channels)
            c.techniques.prune.sparsity = target
            train_and_evaluate(c, str(root / tag / str(i)))

    times = {"population": [], "sequential": []}
    for r in range(args.rounds):
        times["population"].append(timed(lambda r=r: run_population(f"population{r}")))
        times["sequential"].append(timed(lambda r=r: run_sequential(f"sequential{r}")))
        print(f"round {r}: population {times['population'][-1]:.1f} s, sequential "
              f"{times['sequential'][-1]:.1f} s", flush=True)
    stacked = load_run(str(root / "population0")).state.params
    worst = 0.0
    for i in range(len(TARGETS)):
        alone = load_run(str(root / "sequential0" / str(i))).state.params
        for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(alone), strict=True):
            worst = max(worst, float(np.max(np.abs(np.asarray(got[i]) - np.asarray(want)))))
    shutil.rmtree(root, ignore_errors=True)
    ratio = min(times["population"]) / min(times["sequential"])
    result = {"machine": machine(), "steps": args.steps, "channels": args.channels,
              "targets": TARGETS, "seconds": times, "population_over_sequential": ratio,
              "max_abs_param_difference": worst}
    out = ROOT / "benchmarks"
    (out / "prune_population.json").write_text(json.dumps(result, indent=2) + "\n")
    write_section(out / "RESULTS.md", "prune-population", [
        "## Pruning: a sparsity curve in one program", "",
        (f"Written by `benchmarks/prune_population.py` on {machine()}: the MNIST-1D CNN at "
        f"{args.channels} channels, {args.steps} steps of gradual magnitude pruning to each of "
        f"{len(TARGETS)} targets ({', '.join(f'{t:g}' for t in TARGETS)}), as one population "
        f"(one vmapped program) and as {len(TARGETS)} runs one after another; whole runs "
        f"(compile, train, evaluate, checkpoint), best of {args.rounds} alternating rounds."),
        "",
        ("| population (s) | sequential, summed (s) | population / sequential | "
        "max abs param difference |"),
        "|---|---|---|---|",
        (f"| {min(times['population']):.1f} | {min(times['sequential']):.1f} | {ratio:.2f}× | "
        f"{worst:.2e} |")])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
