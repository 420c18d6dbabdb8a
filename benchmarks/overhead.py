"""Framework overhead: the jaxopt_lab training loop against a plain hand-written jit loop.

Same model, same on-device data and batch order, same optimizer, in one process, alternating the
two so machine noise hits both. Also K=1 against K=50 scanned steps per call.

    .venv/bin/python benchmarks/overhead.py [--steps 3000] [--repeats 3] [--models cnn1d mlp]

Writes the table into benchmarks/RESULTS.md (replacing its "overhead" section), machine named.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.core.config import default_config, model_config, validate
from jaxopt_lab.core.loop import train_and_evaluate
from jaxopt_lab.core.metrics import read_metrics
from jaxopt_lab.data.shuffle import permuted_indices
from jaxopt_lab.data.sources import load_dataset
from jaxopt_lab.models import build_model

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- overhead:begin -->", "<!-- overhead:end -->"


def handwritten_steps_per_s(model_name: str, steps: int, seed: int = 0) -> float:
    """The baseline: what a user would write by hand with jax, flax and optax.

    It draws its batches with the same on-device shuffle as the framework, so the two differ
    only in the training loop around the model.
    """
    data = load_dataset("mnist1d")
    model = build_model(model_name, data.num_classes)
    x = jnp.asarray(data.train["x"])
    y = jnp.asarray(data.train["label"])
    params = model.init(jax.random.key(seed), x[:1])["params"]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    n, batch = len(y), 100
    per_epoch = n // batch

    @jax.jit
    def step(params, opt_state, i):
        epoch_key = jax.random.fold_in(jax.random.key(seed), i // per_epoch)
        idx = permuted_indices(epoch_key, (i % per_epoch) * batch + jnp.arange(batch), n)

        def loss_fn(p):
            logits = model.apply({"params": p}, x[idx])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state, loss = step(params, opt_state, 0)  # compile
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        params, opt_state, loss = step(params, opt_state, i)
    jax.block_until_ready(loss)
    return steps / (time.perf_counter() - start)


def framework_steps_per_s(model_name: str, steps: int, steps_per_call: int) -> float:
    """Steady-state rate of `train_and_evaluate`: log windows after the first (which compiles)."""
    config = default_config()
    config.model = model_config(model_name)
    config.train.steps = steps
    config.train.log_every = steps // 10
    config.train.eval_every = steps
    config.train.checkpoint_every = steps
    config.train.steps_per_call = steps_per_call
    config.train.progress = False
    validate(config)
    with tempfile.TemporaryDirectory() as workdir:
        train_and_evaluate(config, workdir)
        windows = read_metrics(workdir)[1:]
    # Total steps over total time of the steady windows.
    seconds = sum(config.train.log_every / w["steps_per_s"] for w in windows)
    return len(windows) * config.train.log_every / seconds


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "?"
    return (f"{kind} ({jax.default_backend()}, {len(devices)} device(s)), host {cpu}, "
            f"{os.cpu_count()} cores, jax {jax.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["cnn1d", "mlp"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()

    rows = []
    for model in args.models:
        rates = {"hand": [], "k1": [], "k50": []}
        for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
            rates["hand"].append(handwritten_steps_per_s(model, args.steps))
            rates["k1"].append(framework_steps_per_s(model, args.steps, 1))
            rates["k50"].append(framework_steps_per_s(model, args.steps, 50))
            print(model, {k: f"{v[-1]:.0f}" for k, v in rates.items()}, flush=True)
        ratios = [f / h for f, h in zip(rates["k1"], rates["hand"])]
        scan = [s / f for s, f in zip(rates["k50"], rates["k1"])]
        rows.append((model, statistics.median(rates["hand"]), statistics.median(rates["k1"]),
                     statistics.median(ratios), statistics.median(rates["k50"]),
                     statistics.median(scan)))

    table = [
        BEGIN,
        "## Overhead: framework loop vs hand-written jit loop",
        "",
        f"`benchmarks/overhead.py --steps {args.steps} --repeats {args.repeats}` on {machine_name()}.",
        "MNIST-1D, batch 100, Adam 1e-2, data on device; medians over interleaved repeats.",
        "Framework rate = steady-state log windows (compile excluded); ratio = framework / hand-written",
        "(1.00 = no overhead; goal ≥ 0.97).",
        "",
        ("| model | hand-written steps/s | framework K=1 steps/s | ratio K=1 / hand | "
        "framework K=50 steps/s | K=50 / K=1 |"),
        "|---|---|---|---|---|---|",
        *[f"| {m} | {h:.0f} | {f:.0f} | {r:.3f} | {s:.0f} | {x:.2f}× |"
          for m, h, f, r, s, x in rows],
        END,
    ]
    path = Path(args.out)
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + "\n".join(table) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(table) + "\n"
    path.write_text(text)
    print("\n".join(table))


if __name__ == "__main__":
    main()
