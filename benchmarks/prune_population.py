"""A whole accuracy–sparsity curve as one vmapped program vs the same runs one after another.

    .venv/bin/python benchmarks/prune_population.py [--steps 500] [--rounds 2]

The target sparsity is a value in the pruning state, so one population trains every target.
Both sides are whole `train_and_evaluate` runs (compile, train, evaluate, checkpoint), what a user
waits for; the rounds alternate population and sequential so that a busy spell on this shared
machine hits both, and the best of each is compared. Equality is checked on a short run (12 steps,
every member's parameters against its run alone): over hundreds of steps the batched convolution's
last-bit differences grow chaotically, so there the members' test accuracies are compared.

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

from jaxopt_lab import load_config, load_run, train_and_evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from common import ROOT, machine

TARGETS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98)
CHECK_STEPS = 12


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

    def run_population(tag, steps=args.steps):
        train_and_evaluate(config(steps, args.channels, population), str(root / tag))

    def run_sequential(tag, steps=args.steps):
        for i, target in enumerate(TARGETS):
            c = config(steps, args.channels)
            c.techniques.prune.sparsity = target
            train_and_evaluate(c, str(root / tag / str(i)))

    times = {"population": [], "sequential": []}
    for r in range(args.rounds):
        times["population"].append(timed(lambda r=r: run_population(f"population{r}")))
        times["sequential"].append(timed(lambda r=r: run_sequential(f"sequential{r}")))
        print(f"round {r}: population {times['population'][-1]:.1f} s, sequential "
              f"{times['sequential'][-1]:.1f} s", flush=True)
    accuracy = {"population": [m["test_accuracy"] for m in json.loads(
        (root / "population0" / "summary.json").read_text())["members"]],
        "sequential": [json.loads((root / "sequential0" / str(i) / "summary.json").read_text())
                       ["test_accuracy"] for i in range(len(TARGETS))]}
    run_population("check_population", CHECK_STEPS)
    run_sequential("check_sequential", CHECK_STEPS)
    stacked = load_run(str(root / "check_population")).state.params
    worst = 0.0
    for i in range(len(TARGETS)):
        alone = load_run(str(root / "check_sequential" / str(i))).state.params
        for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(alone), strict=True):
            worst = max(worst, float(np.max(np.abs(np.asarray(got[i]) - np.asarray(want)))))
    shutil.rmtree(root, ignore_errors=True)
    ratio = min(times["population"]) / min(times["sequential"])
    accuracy_gap = max(abs(a - b) for a, b in zip(*accuracy.values(), strict=True))
    result = {"machine": machine(), "steps": args.steps, "channels": args.channels,
              "targets": TARGETS, "seconds": times, "population_over_sequential": ratio,
              "test_accuracy": accuracy, "max_abs_test_accuracy_difference": accuracy_gap,
              "check_steps": CHECK_STEPS, "max_abs_param_difference_at_check": worst}
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
         "largest test accuracy difference | largest param difference after 12 steps |"),
        "|---|---|---|---|---|",
        (f"| {min(times['population']):.1f} | {min(times['sequential']):.1f} | {ratio:.2f}× | "
         f"{accuracy_gap:.4f} | {worst:.2e} |")])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
