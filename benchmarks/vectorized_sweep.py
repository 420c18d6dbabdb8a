"""Vectorized sweep: trial-steps/s of a population of trials as one vmapped program against the
same trials run one after another, in one process (issue 10, "Measure").

    .venv/bin/python benchmarks/vectorized_sweep.py [--sizes 1,16,64,256] [--models mlp,cnn1d]
        [--steps-per-call K] [--repeats 5] [--budget-s S] [--json PATH] [--results PATH]

Both sides run the loop's compiled call (make_logged_train_fn around the loop's train step, as
suite_steps builds it), K steps scanned per call. A population is that step vmapped over stacked
TrainStates (core/population.py::population_step), and a real sweep: member i has seed i (its
initialisation and data order) and a learning rate drawn log-uniformly. The sequential side runs
the first few of the same trials, one trial per call, through one compiled single-trial program.
Its rate in trial-steps/s does not depend on how many trials take their turn, so a few stand for
all (256 CNN trials in turn would take long on a CPU). A model's variants are timed in the same
interleaved repeats (suite_steps.interleaved), each population's window right after a sequential
one: compile excluded and reported apart, medians over repeats, each ratio within a repeat.

Writes the JSON (default benchmarks/vectorized_sweep.json) and the "vectorized_sweep-<backend>"
section of benchmarks/RESULTS.md after every model, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from results_file import write_section
from suite_steps import Call, _framework_step, interleaved, one_line, ratio

from jaxopt_lab import default_config, model_config, validate
from jaxopt_lab.core.feed import make_logged_train_fn, zero_totals
from jaxopt_lab.core.population import Population, population_step, set_values
from jaxopt_lab.core.state import (
    create_train_state,
    init_sharded_state,
    sample_input,
    state_shardings,
)
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
LR_RANGE = (1e-4, 3e-2)  # Adam; the configs' 1e-2 inside it
# K when not given: on this CPU the loop's automatic choice is K=1 for both models (the overhead
# table of RESULTS.md); on an accelerator the suite's 50 (the chooser's largest candidate).
DEFAULT_K = {"cpu": 1}
ACCELERATOR_K = 50


@dataclasses.dataclass
class Setup:
    """One model's pieces as the loop builds them (suite_steps' builder)."""

    batch: int
    mesh: Any
    experiment: Any
    source: Any  # the training data, on device
    step_fn: Callable  # (state, source) -> (state, metrics): one trial's step
    sample_x: Any


def setup(model: str) -> Setup:
    """The MNIST-1D registry model at its default size, the default config (batch 100, Adam)."""
    config = default_config()
    config.model = model_config(model)
    validate(config)
    dataset, mesh, experiment, source, step_fn = _framework_step(config)
    return Setup(config.data.batch_size, mesh, experiment, source, step_fn,
                 sample_input(dataset))


def sweep_values(size: int, seed: int = 0) -> list[dict]:
    """A random search's first `size` trials: member i has seed i and a log-uniform lr."""
    rng = np.random.default_rng(seed)
    lrs = np.exp(rng.uniform(np.log(LR_RANGE[0]), np.log(LR_RANGE[1]), size))
    return [{"seed": i, "optim.lr": float(lr)} for i, lr in enumerate(lrs)]


def trial_state(s: Setup, values: dict):
    """One trial as a single run makes it: its seed's state, then its learning rate (set where
    the state lives, so that the first call's inputs are placed as every later call's)."""
    state = init_sharded_state(s.experiment, s.sample_x, s.mesh, values["seed"])
    set_lr = functools.partial(set_values, values={"optim.lr": values["optim.lr"]})
    return jax.jit(set_lr, out_shardings=jax.tree.map(lambda x: x.sharding, state))(state)


def population_state(s: Setup, values: Sequence[dict]) -> Population:
    """The trials as one population, made by one vmapped init over their seeds.

    Not core's population_init, which traces one init per member: for 256 MLPs that compile ran
    past 9 minutes on this CPU. The members equal the trials made alone (the benchmark's test).
    """
    seeds = jnp.asarray([v["seed"] for v in values])
    lrs = [v["optim.lr"] for v in values]
    e = s.experiment

    def member(seed):
        return create_train_state(e.model, s.sample_x, e.tx, e.reducer.init, s.mesh.size, seed,
                                  hparams=e.hparams, extra_params=e.extra_params)

    def init():
        members = set_values(jax.vmap(member)(seeds), {"optim.lr": lrs})
        return Population(jnp.zeros((), jnp.int32), members, jnp.ones((len(values),), bool))

    abstract = jax.eval_shape(init)
    replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    return jax.jit(init, out_shardings=Population(
        replicated, state_shardings(abstract.members, s.mesh, 1), replicated))()


def k_step_calls(step_fn: Callable, carries: list, source, k: int, mesh) -> tuple[Call, Callable]:
    """One compiled K-step call (the loop's), shared by `carries` and run on one per call, in
    turn; and a function returning the carries as they stand.

    The metric totals start on the mesh, where the call leaves them: a carry's first call then
    reuses the program compiled for the others (no compile inside the timed repeats).
    """
    fn = make_logged_train_fn(step_fn, k, streamed=False)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    held = [[c, jax.device_put(zero_totals(step_fn, c, source, streamed=False), replicated)]
            for c in carries]
    turn = itertools.cycle(held)

    def call():
        pair = next(turn)
        pair[0], pair[1] = fn(pair[0], source, pair[1])
        return pair[1]

    return call, lambda: [pair[0] for pair in held]


def measure_model(model: str, sizes: Sequence[int], k: int, repeats: int, min_repeat_s: float,
                  sequential_trials: int) -> list[dict]:
    """One row per population size. In every repeat each population's window follows a window of
    the sequential side, and its ratio is to that one: a drift in the machine's load hits both."""
    s = setup(model)
    values = sweep_values(max(*sizes, sequential_trials))
    sequential = [trial_state(s, v) for v in values[:sequential_trials]]
    params = sum(x.size for x in jax.tree.leaves(sequential[0].params))
    sequential_call = k_step_calls(s.step_fn, sequential, s.source, k, s.mesh)[0]
    # Each repeat opens with a sequential window it does not use: on this CPU, the CNN's window
    # right after the largest population's (in the repeat before) ran ~1.3x slower in every repeat.
    calls = {"sequential, settling": sequential_call}
    for n in sizes:
        calls[f"sequential, before {n}"] = sequential_call  # compiled at the first of these
        calls[f"population of {n}"] = k_step_calls(
            population_step(s.step_fn), [population_state(s, values[:n])], s.source, k,
            s.mesh)[0]
    timed = interleaved(calls, repeats, min_repeat_s)
    rows = []
    for n in sizes:
        vec, seq = timed[f"population of {n}"], timed[f"sequential, before {n}"]
        row = {"model": model, "population": n, "params": params, "batch": s.batch,
               "steps_per_call": k, "sequential_trials": sequential_trials,
               "error": vec.get("error") or seq.get("error")}
        if row["error"] is None:
            # time per call, sequential / vectorized, per repeat
            speed = ratio(timed, f"population of {n}", f"sequential, before {n}")
            row.update(
                vectorized_trial_steps_per_s=n * k / statistics.median(vec["seconds"]),
                sequential_trial_steps_per_s=k / statistics.median(seq["seconds"]),
                ratio=n * speed["median"], ratio_low=n * speed["low"],
                ratio_high=n * speed["high"], compile_s=vec["compile_s"],
                sequential_compile_s=timed["sequential, settling"]["compile_s"],
                vectorized_seconds_per_call=vec["seconds"],
                sequential_seconds_per_call=seq["seconds"])
        rows.append(row)
    return rows


# --- the report ---------------------------------------------------------------------------------

def machine_name() -> str:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"this CPU: {os.cpu_count()} cores, XLA:CPU"
    return f"{device.device_kind} ({device.platform}, {jax.device_count()} device(s))"


def section(report: dict) -> list[str]:
    backend, k = report["device"]["backend"], report["steps_per_call"]
    lines = [
        (f"## Vectorized sweep: a population in one program vs its trials one at a time "
         f"({backend})"), "",
        (f"`{' '.join(['benchmarks/vectorized_sweep.py', *report['argv']])}` on "
         f"{report['machine']}, jax {jax.__version__}; {report['elapsed_s']:.0f} s in all; "
         f"1-minute load average {report['load_average'][0]:.1f} at the start, "
         f"{report['load_average'][1]:.1f} at the end (other processes share the machine)."),
        (f"MNIST-1D registry models at their default sizes, batch 100, Adam; member i has seed i "
         f"(initialisation and data order) and a learning rate drawn log-uniformly from "
         f"[{LR_RANGE[0]:g}, {LR_RANGE[1]:g}]. Both sides run the loop's compiled call, K = {k} "
         f"step(s) scanned per call; a population is that step vmapped over stacked TrainStates "
         f"(core/population.py)."),
        (f"Sequential: the first {report['sequential_trials']} of the same trials, one trial per "
         f"call, through one compiled single-trial program. Its rate (trial-steps/s) does not "
         f"depend on how many trials take their turn, so these stand for all of them: the "
         f"larger populations' trials were not each run alone."),
        (f"Warm rates (compile excluded; its seconds, first call included, in the last columns), "
         f"medians over {report['repeats']} interleaved repeats; in each, every population's "
         f"window follows one of the sequential side (after one unused, settling window), and the ratio is to that window (so the "
         f"sequential rate is measured once per row): median (lowest–highest) over the repeats. "
         f"Goal (issue 10): ≥ 50× on a GPU, no slowdown (≥ 1×) on a CPU."), "",
        ("| model | trials in the population | vectorized trial-steps/s | sequential "
         f"trial-steps/s ({report['sequential_trials']} trials in turn) | vectorized / "
         "sequential | compile s: population | compile s: one trial |"),
        "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r.get("skipped") or r.get("error"):
            why = r.get("skipped") or "failed: " + r["error"].replace("|", "/")
            lines.append(f"| {r['model']} | {r.get('population', '')} | {why} | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['population']} | {r['vectorized_trial_steps_per_s']:.0f} | "
            f"{r['sequential_trial_steps_per_s']:.0f} | {r['ratio']:.2f}× ({r['ratio_low']:.2f}"
            f"–{r['ratio_high']:.2f}) | {r['compile_s']:.1f} | {r['sequential_compile_s']:.1f} |")
    return lines


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag}={text!r}: expected positive integers separated by commas, "
                        f"e.g. 1,16,64,256") from None
    values = list(dict.fromkeys(values))  # a size named twice is measured once
    if not values or min(values) < 1:
        raise UserError(f"{flag}={text!r}: every population size must be at least 1")
    return values


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,16,64,256", help="population sizes, e.g. 1,16")
    parser.add_argument("--models", default="mlp,cnn1d", help="registry models, e.g. mlp,cnn1d")
    parser.add_argument("--steps-per-call", type=int, default=0,
                        help="K steps scanned per call, both sides (0: 1 on a CPU, else 50)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-repeat-s", type=float, default=0.3,
                        help="least seconds each variant runs in each repeat")
    parser.add_argument("--sequential-trials", type=int, default=4,
                        help="how many of the trials the sequential side runs in turn")
    parser.add_argument("--budget-s", type=float,
                        help="no model starts after this many seconds (default: no limit)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "vectorized_sweep.json"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    args.sizes = int_list(args.sizes, "--sizes")
    args.models = [m for m in args.models.split(",") if m]
    for model in args.models:
        if model not in MODELS:
            raise UserError(f"--models: {model!r} is not a registry model; allowed: "
                            f"{', '.join(MODELS)}")
    if not args.models:
        raise UserError("--models: name at least one registry model, e.g. mlp,cnn1d")
    for flag, value in (("--repeats", args.repeats), ("--sequential-trials",
                                                      args.sequential_trials)):
        if value < 1:
            raise UserError(f"{flag}={value}: must be at least 1")
    if args.steps_per_call < 0:
        raise UserError(f"--steps-per-call={args.steps_per_call}: must be 0 (automatic) or more")
    return args


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    try:
        args = parse(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    device = jax.devices()[0]
    k = args.steps_per_call or DEFAULT_K.get(device.platform, ACCELERATOR_K)
    report = {"device": {"device_kind": device.device_kind, "backend": device.platform},
              "machine": machine_name(), "jax": jax.__version__,
              "argv": list(sys.argv[1:] if argv is None else argv), "sizes": args.sizes,
              "models": args.models, "steps_per_call": k, "repeats": args.repeats,
              "min_repeat_s": args.min_repeat_s, "sequential_trials": args.sequential_trials,
              "lr_range": list(LR_RANGE), "budget_s": args.budget_s,
              "load_average": [os.getloadavg()[0]] * 2, "rows": []}
    print(f"device: {device.device_kind} ({device.platform}); K={k}", flush=True)
    for model in args.models:
        elapsed = time.perf_counter() - start
        if args.budget_s is not None and elapsed >= args.budget_s:
            rows = [{"model": model, "skipped": f"skipped: out of the {args.budget_s:.0f} s "
                     "budget"}]
        else:
            try:
                rows = measure_model(model, args.sizes, k, args.repeats, args.min_repeat_s,
                                     args.sequential_trials)
            except Exception as error:  # noqa: BLE001 -- one model failing is a row, not the end
                rows = [{"model": model, "error": one_line(error)}]
        report["rows"] += rows
        report["elapsed_s"] = time.perf_counter() - start
        report["load_average"][1] = os.getloadavg()[0]
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        lines = section(report)
        write_section(Path(args.results), f"vectorized_sweep-{device.platform}", lines)
        print(*lines[-len(rows):], sep="\n", flush=True)
    print(f"done in {time.perf_counter() - start:.0f} s; wrote {args.json} and a section of "
          f"{args.results}")


if __name__ == "__main__":
    main()
