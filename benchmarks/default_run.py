"""The default run against the loop a user would write by hand: the whole of
`jaxopt-lab train --config configs/mnist1d_cnn.py` (6000 steps, its default checkpoint, log,
evaluation and measurement cadence) against a plain `jax.jit` step fed host-side batches that
also evaluates the test set every 250 steps, wall time from call to return, compiling included.

    .venv/bin/python benchmarks/default_run.py [--steps 6000] [--repeats 3] [--breakdown]

`overhead.py` compares the training loops like with like (same on-device sampler, same donation
and scan); this compares what a user sees: the run they launch against the loop they would have
written. Goal: the default run at ≥ 0.97 of the bare loop's steps/s.

With --breakdown, the default run is also timed with its parts switched off one at a time
(cumulative): where its time beyond the bare loop goes.

Writes the "default-run" section of benchmarks/RESULTS.md and every repeat into
benchmarks/default_run.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from overhead import ROOT, machine_name
from results_file import write_section

from jaxopt_lab import load_config, train_and_evaluate
from jaxopt_lab.data.sources import load_dataset
from jaxopt_lab.models import build_model

CONFIG = ROOT / "configs" / "mnist1d_cnn.py"
BARE_EVAL_EVERY = 250
# The default run with its parts switched off one at a time, cumulative: (label, overrides).
LADDER = (
    ("default run", []),
    ("- end-of-run measurements (train.measure=False)", ["--config.train.measure=False"]),
    ("- progress bar", ["--config.train.progress=False"]),
    ("- choosing steps per call (steps_per_call=1)", ["--config.train.steps_per_call=1"]),
    ("- checkpoints but the last (checkpoint_every=steps)", ["checkpoint_every"]),
    ("- per-window logging (log_every=steps)", ["log_every"]),
)


def bare_loop_seconds(steps: int, seed: int = 0) -> float:
    """What a user writes: the paper's CNN, Adam 1e-2, batches of 100 sliced from host arrays in
    order (the config walks MNIST-1D in order too), test accuracy every 250 steps."""
    start = time.perf_counter()
    data = load_dataset("mnist1d")
    x, y = data.train["x"], data.train["label"]
    x_test, y_test = jnp.asarray(data.test["x"]), jnp.asarray(data.test["label"])
    model = build_model("cnn1d", data.num_classes)
    params = model.init(jax.random.key(seed), x[:1])["params"]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = model.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def accuracy(params):
        return jnp.mean(jnp.argmax(model.apply({"params": params}, x_test), -1) == y_test)

    batches = len(y) // 100
    for i in range(steps):
        b = i % batches
        params, opt_state, loss = step(params, opt_state, x[b * 100:(b + 1) * 100],
                                       y[b * 100:(b + 1) * 100])
        if (i + 1) % BARE_EVAL_EVERY == 0:
            float(accuracy(params))
    float(loss)
    return time.perf_counter() - start


def default_run_seconds(steps: int, overrides: list[str]) -> float:
    """`train_and_evaluate` of the shipped config with `overrides`, from load to return."""
    start = time.perf_counter()
    flags = [f"--config.train.steps={steps}"]
    for item in overrides:
        flags.append(f"--config.train.{item}={steps}" if "=" not in item else item)
    config = load_config(str(CONFIG), flags)
    with tempfile.TemporaryDirectory() as workdir:
        train_and_evaluate(config, workdir)
    return time.perf_counter() - start


def in_fresh_process(call: str) -> float:
    """Seconds `call` (an expression of this module) took in a new Python process, as a user's
    launch runs it: nothing compiled or cached by an earlier variant (imports not counted)."""
    code = f"import default_run, sys; print(default_run.{call})"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{call} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def measure(steps: int, repeats: int, breakdown: bool) -> dict:
    """Seconds of every variant in every repeat (interleaved, each in a fresh process), and each
    variant's steps/s ratio to the bare loop of the same repeat."""
    ladder = LADDER if breakdown else LADDER[:1]
    seconds = {"bare loop": [], **{label: [] for label, _ in ladder}}
    for repeat in range(repeats):
        seconds["bare loop"].append(in_fresh_process(f"bare_loop_seconds({steps})"))
        overrides: list[str] = []
        for label, extra in ladder:
            overrides = overrides + extra
            seconds[label].append(in_fresh_process(f"default_run_seconds({steps}, {overrides!r})"))
        print(f"repeat {repeat}:", {k: f"{v[-1]:.1f}s" for k, v in seconds.items()}, flush=True)
    ratios = {label: [b / s for b, s in zip(seconds["bare loop"], v)]
              for label, v in seconds.items() if label != "bare loop"}
    return {"seconds": seconds, "ratio": {k: statistics.median(v) for k, v in ratios.items()},
            "ratio_range": {k: [min(v), max(v)] for k, v in ratios.items()},
            "per_repeat_ratio": ratios}


def table(result: dict, steps: int) -> list[str]:
    lines = ["| variant | wall s (median) | steps/s | ÷ bare loop's steps/s |", "|---|---|---|---|"]
    for label, values in result["seconds"].items():
        median = statistics.median(values)
        ratio = "1.000" if label == "bare loop" else (
            f"{result['ratio'][label]:.3f} ({result['ratio_range'][label][0]:.2f}–"
            f"{result['ratio_range'][label][1]:.2f})")
        lines.append(f"| {label} | {median:.1f} | {steps / median:.0f} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true",
                        help="also the default run with its parts switched off one at a time")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    result = measure(args.steps, args.repeats, args.breakdown)
    host = machine_name()
    Path(args.out).with_name("default_run.json").write_text(json.dumps(
        {"machine": host, "steps": args.steps, "repeats": args.repeats, **result}, indent=2)
        + "\n")
    print(write_section(Path(args.out), "default-run", [
        "## The default run vs the loop a user would write", "",
        (f"`benchmarks/default_run.py --steps {args.steps} --repeats {args.repeats}"
         f"{' --breakdown' if args.breakdown else ''}` on {host}. "
         "`jaxopt-lab train --config configs/mnist1d_cnn.py` as shipped (eval every 500 steps, "
         "log every 100, a checkpoint every 1000, end-of-run measurements, progress bar, the "
         "automatic steps per call) against a plain `jax.jit` step fed host-side batches that "
         f"evaluates the test set every {BARE_EVAL_EVERY} steps; wall time from call to "
         "return, compiling and data loading included (imports not), each variant in a fresh "
         "process as a user's launch runs it, interleaved. "
         "Ratio: steps/s of the run ÷ the bare loop's in the same repeat, median (lowest–"
         "highest); goal ≥ 0.97. Breakdown rows switch the default run's parts off one at a "
         "time, cumulative (every repeat in `benchmarks/default_run.json`)."), "",
        *table(result, args.steps)]))


if __name__ == "__main__":
    main()
