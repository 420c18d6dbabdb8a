"""A whole accuracy–sparsity curve as one vmapped program vs the same runs one after another.

    .venv/bin/python benchmarks/prune_population.py [--steps 500] [--rounds 2]
    .venv/bin/python benchmarks/prune_population.py --render  # the section from the JSON

The target sparsity is a value in the pruning state, so one population trains every target.
Both sides are whole `train_and_evaluate` runs (compile, train, evaluate, checkpoint), what a user
waits for; the rounds alternate population and sequential so that a busy spell on this shared
machine hits both, and each round's ratio is reported beside the best of each side's rounds.
Equality is checked on a short run (12 steps, every member's parameters against its run alone):
over hundreds of steps the batched convolution's last-bit differences grow chaotically, so there
the members' test accuracies are compared.

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


def measure(steps: int, channels: int, rounds: int) -> dict:
    """Times both sides over alternating rounds and checks that they train the same models."""
    root = Path(tempfile.mkdtemp(prefix="prune_population_"))
    population = (("techniques.prune.sparsity", TARGETS),)

    def run_population(tag, steps=steps):
        train_and_evaluate(config(steps, channels, population), str(root / tag))

    def run_sequential(tag, steps=steps):
        for i, target in enumerate(TARGETS):
            c = config(steps, channels)
            c.techniques.prune.sparsity = target
            train_and_evaluate(c, str(root / tag / str(i)))

    times = {"population": [], "sequential": []}
    for r in range(rounds):
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
    accuracy_gap = max(abs(a - b) for a, b in zip(*accuracy.values(), strict=True))
    return {"machine": machine(), "steps": steps, "channels": channels,
            "targets": TARGETS, "seconds": times,
            "population_over_sequential": min(times["population"]) / min(times["sequential"]),
            "test_accuracy": accuracy, "max_abs_test_accuracy_difference": accuracy_gap,
            "check_steps": CHECK_STEPS, "max_abs_param_difference_at_check": worst}


def with_rounds(result: dict) -> dict:
    """Adds each round's population / sequential: on this shared machine one round's busy spell
    moves the ratio, and the best of each side alone hides by how much."""
    seconds = result["seconds"]
    return {**result, "population_over_sequential_per_round": [
        p / s for p, s in zip(seconds["population"], seconds["sequential"], strict=True)]}


def section(result: dict) -> list[str]:
    seconds, per_round = result["seconds"], result["population_over_sequential_per_round"]
    targets = result["targets"]
    rows = [f"| {r + 1} | {p:.1f} | {s:.1f} | {ratio:.2f}× |" for r, (p, s, ratio) in
            enumerate(zip(seconds["population"], seconds["sequential"], per_round))]
    return [
        "## Pruning: a sparsity curve in one program", "",
        (f"Written by `benchmarks/prune_population.py --steps {result['steps']} --channels "
         f"{result['channels']} --rounds {len(per_round)}` on {result['machine']}: the MNIST-1D "
         f"CNN at {result['channels']} channels, {result['steps']} steps of gradual magnitude "
         f"pruning to each of {len(targets)} targets ({', '.join(f'{t:g}' for t in targets)}), "
         f"as one population (one vmapped program) and as {len(targets)} runs one after "
         "another; whole runs (compile, train, evaluate, checkpoint), in alternating rounds. "
         "A round's ratio is its population time over its sequential time; the last row takes "
         "each side's fastest round."), "",
        "| round | population (s) | sequential, summed (s) | population / sequential |",
        "|---|---|---|---|", *rows,
        (f"| best of rounds | {min(seconds['population']):.1f} | "
         f"{min(seconds['sequential']):.1f} | {result['population_over_sequential']:.2f}× |"),
        "",
        (f"Per round, population / sequential ran {min(per_round):.2f}–{max(per_round):.2f}×. "
         "Largest test accuracy difference between a member and its run alone (round 1): "
         f"{result['max_abs_test_accuracy_difference']:.4f}; largest parameter difference after "
         f"{result['check_steps']} steps: {result['max_abs_param_difference_at_check']:.2e}.")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite the section from the JSON as it stands")
    args = parser.parse_args()
    out = ROOT / "benchmarks"
    path = out / "prune_population.json"
    result = with_rounds(json.loads(path.read_text()) if args.render else
                         measure(args.steps, args.channels, args.rounds))
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(write_section(out / "RESULTS.md", "prune-population", section(result)))


if __name__ == "__main__":
    main()
