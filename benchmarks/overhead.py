"""Framework overhead: the jaxopt_lab training loop against a plain hand-written jit loop.

Same model, same on-device data and batch order, same optimizer, in one process, alternating the
variants so machine noise hits all. Compared like with like: at K=1 against the hand-written
per-step loop, at the K the automatic choice picks and at K=50 against a hand-written loop
scanned at that K.

    .venv/bin/python benchmarks/overhead.py [--steps 3000] [--repeats 3] [--models cnn1d mlp]
                                            [--out RESULTS.md] [--json rows.json]

Writes the table into benchmarks/RESULTS.md (replacing its "overhead" section, or on an
accelerator its "overhead-<backend>" section), machine named, and every repeat's rates and
ratios into benchmarks/overhead.json (overhead_<backend>.json): medians hide how far one
machine's noise reaches.
With --breakdown, instead adds the framework's parts one at a time to the hand-written step and
writes the "overhead-breakdown" section and benchmarks/overhead_breakdown.json: where the
framework's time goes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P
from results_file import write_section

from jaxopt_lab import build_experiment, default_config, model_config, train_and_evaluate, validate
from jaxopt_lab.core.distributed import data_mesh
from jaxopt_lab.core.feed import (
    device_sampler,
    make_logged_train_fn,
    replicate,
    sampled_step,
    zero_totals,
)
from jaxopt_lab.core.metrics import read_metrics
from jaxopt_lab.core.state import init_sharded_state, sample_input
from jaxopt_lab.core.step import DATA_AXIS, data_mean, make_train_step
from jaxopt_lab.data.shuffle import permuted_indices
from jaxopt_lab.data.sources import load_dataset
from jaxopt_lab.host import cpu_model
from jaxopt_lab.models import build_model

ROOT = Path(__file__).resolve().parents[1]


# Untimed calls first: the first compiles, and the second compiles again where the outputs' placement
# differs from the inputs' (a shard_map's NamedSharding outputs fed back in, say).
WARMUP_CALLS = 3
# Framework features the breakdown adds one at a time onto the hand-written step (cumulative).
LADDER = (
    ("hand-written jit step", ()),
    ("+ injected lr (optax.inject_hyperparams)", ("inject",)),
    ("+ loss and grads inside shard_map (1-device mesh)", ("inject", "shard_map")),
    ("+ accuracy and grad-norm metrics", ("inject", "shard_map", "metrics")),
)


def handwritten_steps_per_s(model_name: str, steps: int, features: tuple[str, ...] = (),
                            seed: int = 0, steps_per_call: int = 1) -> float:
    """The baseline: what a careful user would write by hand with jax, flax and optax.

    It draws its batches with the same on-device shuffle as the framework, donates its
    parameters and optimizer state as the framework donates its state, and with
    `steps_per_call` > 1 scans that many steps per call, so the two differ only in the training
    loop around the model. `features` adds framework parts one by one (see LADDER), to find where
    the framework's time goes.
    """
    data = load_dataset("mnist1d")
    model = build_model(model_name, data.num_classes)
    x = jnp.asarray(data.train["x"])
    y = jnp.asarray(data.train["label"])
    params = model.init(jax.random.key(seed), x[:1])["params"]
    tx = (optax.inject_hyperparams(optax.adam)(learning_rate=1e-2) if "inject" in features
          else optax.adam(1e-2))
    opt_state = tx.init(params)
    n, batch = len(y), 100
    per_epoch = n // batch

    def local_loss_and_grads(params, xb, yb):
        def loss_fn(p):
            logits = model.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, logits, grads

    loss_and_grads = local_loss_and_grads
    if "shard_map" in features:
        def per_device(params, xb, yb):
            loss, logits, grads = local_loss_and_grads(params, xb, yb)
            return data_mean(loss), logits, data_mean(grads)

        loss_and_grads = jax.shard_map(
            per_device, mesh=data_mesh(),
            in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)), out_specs=(P(), P(DATA_AXIS), P()),
            check_vma=False)

    def one_step(carry, i):
        params, opt_state = carry
        epoch_key = jax.random.fold_in(jax.random.key(seed), i // per_epoch)
        idx = permuted_indices(epoch_key, (i % per_epoch) * batch + jnp.arange(batch), n)
        loss, logits, grads = loss_and_grads(params, x[idx], y[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss}
        if "metrics" in features:
            metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == y[idx])
            metrics["grad_norm"] = optax.global_norm(grads)
        return (optax.apply_updates(params, updates), opt_state), metrics

    k = steps_per_call

    @functools.partial(jax.jit, donate_argnums=0)
    def call(carry, first):
        if k == 1:
            return one_step(carry, first)
        return jax.lax.scan(one_step, carry, first + jnp.arange(k))

    carry = (params, opt_state)
    for i in range(WARMUP_CALLS):
        carry, metrics = call(carry, i * k)
    jax.block_until_ready(metrics)
    # Timed in windows of a tenth of the steps, synced at each end as the framework's log
    # windows are; the median window, as for the framework.
    calls_per_window = max(1, steps // 10 // k)
    rates, i = [], WARMUP_CALLS
    for _ in range(10):
        start = time.perf_counter()
        for _ in range(calls_per_window):
            carry, metrics = call(carry, i * k)
            i += 1
        jax.block_until_ready(metrics)
        rates.append(calls_per_window * k / (time.perf_counter() - start))
    return statistics.median(rates)


def framework_call_steps_per_s(model_name: str, steps: int) -> float:
    """The framework's compiled call (step, sampler, on-device metric totals) at K=1, driven by a
    bare Python loop: the loop's own host work (logging, progress bar, boundaries) left out."""
    config = _config(model_name, steps, steps_per_call=1)
    dataset = load_dataset("mnist1d")
    mesh = data_mesh()
    experiment = build_experiment(config, dataset)
    train_step = make_train_step(experiment.loss_fn, experiment.reducer, experiment.tx, mesh)
    state = init_sharded_state(experiment, sample_input(dataset), mesh, config.seed)
    source = replicate(dataset.train, mesh)
    sample = device_sampler(len(dataset.train["label"]), config.data.batch_size, mesh,
                            config.data.shuffle)
    step_fn = sampled_step(train_step, sample)
    fn = make_logged_train_fn(step_fn, 1, streamed=False)
    totals = zero_totals(step_fn, state, source, streamed=False)
    for _ in range(WARMUP_CALLS):
        state, totals = fn(state, source, totals)
    jax.block_until_ready(totals)
    start = time.perf_counter()
    for _ in range(steps):
        state, totals = fn(state, source, totals)
    jax.block_until_ready(totals)
    return steps / (time.perf_counter() - start)


def _config(model_name: str, steps: int, steps_per_call: int):
    config = default_config()
    config.model = model_config(model_name)
    config.train.steps = steps
    config.train.log_every = steps // 10
    config.train.eval_every = steps
    config.train.checkpoint_every = steps
    config.train.steps_per_call = steps_per_call
    config.train.progress = False
    config.data.validation_fraction = 0.0  # all 4000 examples, as the hand-written loop uses
    validate(config)
    return config


def framework_steps_per_s(model_name: str, steps: int, steps_per_call: int) -> tuple[float, int]:
    """Steady-state rate of `train_and_evaluate`: the median of its log windows after the first
    (which compiles); and the K it ran at (`steps_per_call=0`: the automatic choice's)."""
    config = _config(model_name, steps, steps_per_call)
    with tempfile.TemporaryDirectory() as workdir:
        summary = train_and_evaluate(config, workdir)
        windows = read_metrics(workdir)[1:]
    return statistics.median(w["steps_per_s"] for w in windows), summary["steps_per_call"]


def machine_name() -> str:
    cpu = cpu_model()
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "?"
    return (f"{kind} ({jax.default_backend()}, {len(devices)} device(s)), host {cpu}, "
            f"{os.cpu_count()} cores, jax {jax.__version__}")


BREAKDOWN = [name for name, _ in LADDER] + [
    "framework's compiled call (make_train_step + sampler + totals), bare Python loop",
    "framework loop (train_and_evaluate, K=1)"]


def breakdown_rows(models: list[str], steps: int, repeats: int) -> list[dict]:
    """Per model: each LADDER rung, then the framework's compiled call and its full loop, as a
    ratio to the hand-written step of the same repeat: medians and ranges, and under
    "per_repeat" every repeat's steps/s and ratio of each."""
    rows = []
    for model in models:
        rates = [[] for _ in BREAKDOWN]
        for _ in range(repeats):  # interleaved, so drift hits every variant alike
            for i, (_, features) in enumerate(LADDER):
                rates[i].append(handwritten_steps_per_s(model, steps, features))
            rates[-2].append(framework_call_steps_per_s(model, steps))
            rates[-1].append(framework_steps_per_s(model, steps, 1)[0])
            print(model, [f"{r[-1]:.0f}" for r in rates], flush=True)
        ratios = {name: [r / h for r, h in zip(rung, rates[0])]
                  for name, rung in zip(BREAKDOWN[1:], rates[1:])}
        rows.append({"model": model, "hand_steps_per_s": statistics.median(rates[0]),
                     "ratio": {name: statistics.median(v) for name, v in ratios.items()},
                     "ratio_range": {name: [min(v), max(v)] for name, v in ratios.items()},
                     "per_repeat": {"steps_per_s": dict(zip(BREAKDOWN, rates)),
                                    "ratio": ratios}})
    return rows


def breakdown_table(rows: list[dict]) -> list[str]:
    """The hand-written step's rate, then every other column as a ratio to it."""
    lines = [("| model | " + " | ".join(BREAKDOWN) + " |"), "|---|" + "---|" * len(BREAKDOWN)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['hand_steps_per_s']:.0f} steps/s | "
                     + " | ".join(_median_and_range(row["per_repeat"]["ratio"][name])
                                  for name in BREAKDOWN[1:]) + " |")
    return lines


SCANNED_K = 50  # the scanned comparison: the largest K the automatic choice considers


def overhead_rows(models: list[str], steps: int, repeats: int) -> list[dict]:
    """Per model: the framework loop against its like hand-written loop at K=1, at the K the
    automatic choice picks, and at K=50 scanned; medians and ranges over interleaved repeats,
    and under "per_repeat" every repeat's value of each (same keys, one value per repeat)."""
    rows = []
    for model in models:
        rates = {name: [] for name in ("hand_k1", "fw_k1", "fw_auto", "hand_auto", "fw_k50",
                                       "hand_k50")}
        chosen = []
        for _ in range(repeats):  # interleaved, so drift hits every variant alike
            rates["hand_k1"].append(handwritten_steps_per_s(model, steps))
            rates["fw_k1"].append(framework_steps_per_s(model, steps, 1)[0])
            rate, k = framework_steps_per_s(model, steps, 0)
            rates["fw_auto"].append(rate)
            chosen.append(k)
            rates["hand_auto"].append(rates["hand_k1"][-1] if k == 1 else
                                      handwritten_steps_per_s(model, steps, steps_per_call=k))
            rates["fw_k50"].append(framework_steps_per_s(model, steps, SCANNED_K)[0])
            rates["hand_k50"].append(handwritten_steps_per_s(model, steps,
                                                             steps_per_call=SCANNED_K))
            print(model, {k: f"{v[-1]:.0f}" for k, v in rates.items()}, f"auto K={chosen[-1]}",
                  flush=True)
        row = {"model": model, "auto_k": chosen,
               **{f"{name}_steps_per_s": statistics.median(v) for name, v in rates.items()}}
        per_repeat = {f"{name}_steps_per_s": v for name, v in rates.items()}
        for label, fw, hand in (("k1", "fw_k1", "hand_k1"), ("auto", "fw_auto", "hand_auto"),
                                ("k50", "fw_k50", "hand_k50")):
            ratios = [f / h for f, h in zip(rates[fw], rates[hand])]
            row[f"ratio_{label}"] = statistics.median(ratios)
            row[f"ratio_{label}_range"] = [min(ratios), max(ratios)]
            per_repeat[f"ratio_{label}"] = ratios
        rows.append({**row, "per_repeat": per_repeat})
    return rows


def overhead_table(rows: list[dict]) -> list[str]:
    def ratio(row, label):
        low, high = row[f"ratio_{label}_range"]
        return f"{row[f'ratio_{label}']:.3f} ({low:.2f}–{high:.2f})"

    return [
        ("| model | hand-written K=1 steps/s | framework K=1 steps/s | K=1: framework / hand | "
         "automatic K (per repeat) | at that K: framework / hand | "
         f"K={SCANNED_K}: framework / hand |"),
        "|---|---|---|---|---|---|---|",
        *[f"| {r['model']} | {r['hand_k1_steps_per_s']:.0f} | {r['fw_k1_steps_per_s']:.0f} | "
          f"{ratio(r, 'k1')} | {', '.join(map(str, r['auto_k']))} | {ratio(r, 'auto')} | "
          f"{ratio(r, 'k50')} |" for r in rows],
    ]


def _median_and_range(values: list[float]) -> str:
    """The median, and the lowest and highest repeat: how far one machine's noise reaches."""
    return f"{statistics.median(values):.3f} ({min(values):.2f}–{max(values):.2f})"


def _shown(path: Path) -> str:
    """`path` as a section names it: from the repository root where it lies inside."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["cnn1d", "mlp"])
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: add the framework's parts one at a time to the "
                             "hand-written step (section 'overhead-breakdown')")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--json", help="where every repeat's rates and ratios go (default: "
                                       "beside --out, named after the section, e.g. "
                                       "overhead.json, overhead_breakdown.json)")
    args = parser.parse_args()

    backend = jax.default_backend()
    tag = ("overhead-breakdown" if args.breakdown else
           "overhead" if backend == "cpu" else f"overhead-{backend}")
    json_path = Path(args.json or Path(args.out).with_name(tag.replace("-", "_") + ".json"))
    command = (f"`benchmarks/overhead.py{' --breakdown' if args.breakdown else ''} "
               f"--steps {args.steps} --repeats {args.repeats}` on {machine_name()}.")
    common = ("MNIST-1D, batch 100, Adam 1e-2, data on device; medians over interleaved repeats "
              f"(every repeat's rates and ratios in `{_shown(json_path)}`).")
    rows = (breakdown_rows if args.breakdown else overhead_rows)(args.models, args.steps,
                                                                  args.repeats)
    json_path.write_text(json.dumps({"machine": machine_name(), "steps": args.steps,
                                     "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    if args.breakdown:
        print(write_section(Path(args.out), tag, [
            "## Overhead breakdown: the framework's parts added one at a time", "",
            command, common,
            ("Each column is a steps/s ratio against the hand-written step of the first column "
             "(1.00 = no cost), median (lowest–highest) over the repeats, each repeat against "
             "its own hand-written run; the ladder columns are cumulative."), "",
            *breakdown_table(rows)]))
        return
    print(write_section(Path(args.out), tag, [
        f"## Overhead: framework loop vs hand-written jit loop ({backend})", "",
        command, common,
        ("Rates are the median of ten windows of a tenth of the steps each, synced at each end "
         "(the framework's log windows, the first, which compiles, left out). The hand-written "
         "loop donates its parameters and optimizer state and, at K > 1, scans K steps per "
         "call, like the framework. Ratio = framework / hand-written within one repeat, median "
         "(lowest–highest); 1.00 = no overhead, goal ≥ 0.97."), "",
        *overhead_table(rows)]))


if __name__ == "__main__":
    main()
