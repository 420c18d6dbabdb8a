"""The in-process parts of benchmarks/accelerator_suite.py: the bf16 matmul peak, the framework's
train step against a hand-written Flax step of the same model, and a vmapped population against
one trial.

Every comparison times its variants in interleaved repeats (drift hits them alike) and reports
medians; a ratio is taken within each repeat, then its median. A variant that fails to build or
compile is a row with its error, and the others still run.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab import build_experiment, default_config, model_config, prepare_dataset, validate
from jaxopt_lab.core.distributed import data_mesh
from jaxopt_lab.core.feed import (
    device_sampler,
    make_logged_train_fn,
    replicate,
    sampled_step,
    zero_totals,
)
from jaxopt_lab.core.measure import count_flops
from jaxopt_lab.core.population import Population, population_step
from jaxopt_lab.core.state import (
    create_train_state,
    init_sharded_state,
    sample_input,
    state_shardings,
)
from jaxopt_lab.core.step import make_train_step
from jaxopt_lab.core.tasks import train_kwargs
from jaxopt_lab.data.shuffle import permuted_indices
from jaxopt_lab.models import build_model

WARMUP_CALLS = 3  # the first compiles; a second can compile again where output placement differs
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LR, MOMENTUM = 0.1, 0.9  # SGD with momentum, both sides
Call = Callable[[], Any]  # one step (or K); returns something to block on


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def interleaved(calls: dict[str, Call], repeats: int, min_repeat_s: float) -> dict[str, dict]:
    """Per variant: compile_s (the first call), and `seconds` per call, one value per repeat.

    Each repeat runs every variant back to back for at least `min_repeat_s` (calls queue on the
    device; one sync at the end). A variant whose warm-up fails is dropped with its error.
    """
    out, per_repeat = {}, {}
    for name, call in calls.items():
        try:
            start = time.perf_counter()
            jax.block_until_ready(call())
            out[name] = {"compile_s": time.perf_counter() - start, "seconds": []}
            for _ in range(WARMUP_CALLS - 1):
                jax.block_until_ready(call())
            start = time.perf_counter()
            jax.block_until_ready(call())
            per_repeat[name] = max(1, math.ceil(min_repeat_s / (time.perf_counter() - start)))
        except Exception as error:  # noqa: BLE001 -- one variant failing is a row, not the end
            out[name] = {"error": one_line(error)}
    for _ in range(repeats):
        for name, n in per_repeat.items():
            start = time.perf_counter()
            for _ in range(n):
                result = calls[name]()
            jax.block_until_ready(result)
            out[name]["seconds"].append((time.perf_counter() - start) / n)
    for row in out.values():
        if row.get("seconds"):
            row["median_ms"] = 1e3 * statistics.median(row["seconds"])
    return out


def ratio(rows: dict[str, dict], top: str, bottom: str) -> dict | None:
    """Speed of `top` over `bottom` (time of bottom / time of top) per repeat: median and range."""
    a, b = rows.get(top, {}).get("seconds"), rows.get(bottom, {}).get("seconds")
    if not a or not b:
        return None
    ratios = [tb / ta for ta, tb in zip(a, b)]
    return {"median": statistics.median(ratios), "low": min(ratios), "high": max(ratios)}


def matmul_peak(n: int, repeats: int, min_repeat_s: float) -> dict:
    """TFLOP/s of an n×n×n bf16 matmul (float32 accumulation, bf16 out): the chip's usable peak."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    row = interleaved({"matmul": lambda: matmul(a, b)}, repeats, min_repeat_s)["matmul"]
    if "error" not in row:
        row["tflops"] = 2 * n**3 / (row["median_ms"] / 1e3) / 1e12
    return {"n": n, **row}


# --- framework step vs hand-written step ----------------------------------------------------------

def step_config(model: str, hparams: dict, input_shape: tuple, batch: int, dtype: str):
    """The framework's config for one model on synthetic data, SGD with momentum, no schedule."""
    config = default_config()
    config.data.name = "synthetic"
    config.data.synthetic_shape = tuple(input_shape)
    config.data.synthetic_size = 4 * batch
    config.data.validation_fraction = 0.0
    config.data.batch_size = batch
    config.model = model_config(model, **hparams)
    config.optim.name = "momentum"
    config.optim.lr, config.optim.momentum = LR, MOMENTUM
    config.train.steps = 10**6
    config.train.steps_per_call = 1
    config.train.progress = False
    if dtype != "float32":
        if "compute_dtype" not in config.train:
            raise KeyError("train.compute_dtype is not a config key in this tree (mixed "
                           "precision not merged)")
        config.train.compute_dtype = dtype
    validate(config)
    return config


def _framework_step(config):
    """The loop's pieces for `config`: data set, mesh, experiment, on-device data and the step
    that gathers its batch from them."""
    dataset = prepare_dataset(config)
    mesh = data_mesh()
    experiment = build_experiment(config, dataset)
    train_step = make_train_step(experiment.loss_fn, experiment.reducer, experiment.tx, mesh,
                                 experiment.state_metrics)
    source = replicate(dataset.train, mesh)
    step_fn = sampled_step(train_step, device_sampler(
        len(dataset.train["label"]), config.data.batch_size, mesh, config.data.shuffle))
    return dataset, mesh, experiment, source, step_fn


def framework_call(config) -> Call:
    """The framework's compiled call at K=1, as the loop builds it (make_train_step, the on-device
    sampler, metric totals), driven by a bare Python loop."""
    dataset, mesh, experiment, source, step_fn = _framework_step(config)
    fn = make_logged_train_fn(step_fn, 1, streamed=False)
    state = init_sharded_state(experiment, sample_input(dataset), mesh, config.seed)
    held = [state, zero_totals(step_fn, state, source, streamed=False)]

    def call():
        held[0], held[1] = fn(held[0], source, held[1])
        return held[1]

    return call


def handwritten_step(config, dtype: str) -> tuple[Call, Callable[[], int]]:
    """What a user writes with flax and optax: the same model (with `dtype` as its compute dtype),
    data, batch order and optimizer, one jitted value_and_grad + update. Returns the call and a
    function counting the step's FLOPs."""
    dataset = prepare_dataset(config)
    extra = {} if dtype == "float32" else {"dtype": DTYPES[dtype]}
    model = build_model(config.model.name, dataset.num_classes,
                        **{k: v for k, v in config.model.items() if k != "name"}, **extra)
    x, y = jnp.asarray(dataset.train["x"]), jnp.asarray(dataset.train["label"])
    n, batch = len(y), config.data.batch_size
    per_epoch = n // batch
    variables = dict(jax.jit(functools.partial(model.init, **train_kwargs(model, False)))(
        jax.random.key(config.seed), x[:1]))
    params = variables.pop("params")
    tx = optax.sgd(LR, momentum=MOMENTUM)
    seed_key = jax.random.key(config.seed)

    def loss_fn(params, model_state, xb, yb):
        out = model.apply({"params": params, **model_state}, xb,
                          mutable=list(model_state) or False, **train_kwargs(model, True))
        logits, updates = out if model_state else (out, {})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yb)
        return loss.mean(), {**model_state, **updates}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(carry, x, y):
        params, model_state, opt_state, i = carry
        idx = permuted_indices(jax.random.fold_in(seed_key, i // per_epoch),
                               (i % per_epoch) * batch + jnp.arange(batch), n)
        (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, model_state, x[idx], y[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), model_state, opt_state, i + 1), loss

    held = [(params, dict(variables), tx.init(params), jnp.zeros((), jnp.int32))]

    def call():
        held[0], loss = step(held[0], x, y)
        return loss

    return call, lambda: count_flops(step, held[0], x, y)


def compare_steps(model: str, hparams: dict, input_shape: tuple, batch: int, repeats: int,
                  min_repeat_s: float, peak_tflops: float | None) -> dict:
    """The framework's and the hand-written train step of one model, float32 and bf16, timed in
    one interleaved loop; TFLOP/s from the counted FLOPs of the hand-written step."""
    calls, errors, flops = {}, {}, None
    for dtype in DTYPES:
        for side in ("framework", "hand-written"):
            name = f"{side} {dtype}"
            try:
                if side == "framework":
                    calls[name] = framework_call(
                        step_config(model, hparams, input_shape, batch, dtype))
                else:  # the same config in float32; the model gets the dtype directly
                    calls[name], count = handwritten_step(
                        step_config(model, hparams, input_shape, batch, "float32"), dtype)
                    if flops is None:
                        flops = count()
            except Exception as error:  # noqa: BLE001 -- the row says why
                errors[name] = one_line(error)
    rows = {**{name: {"error": e} for name, e in errors.items()},
            **interleaved(calls, repeats, min_repeat_s)}
    for row in rows.values():
        if "median_ms" in row:
            row["examples_per_s"] = batch / (row["median_ms"] / 1e3)
            if flops:
                row["tflops"] = flops / (row["median_ms"] / 1e3) / 1e12
                if peak_tflops:
                    row["pct_of_peak"] = 100 * row["tflops"] / peak_tflops
    ratios = {
        "framework / hand-written, float32": ratio(rows, "framework float32",
                                                   "hand-written float32"),
        "framework / hand-written, bfloat16": ratio(rows, "framework bfloat16",
                                                    "hand-written bfloat16"),
        "bfloat16 / float32, framework": ratio(rows, "framework bfloat16", "framework float32"),
        "bfloat16 / float32, hand-written": ratio(rows, "hand-written bfloat16",
                                                  "hand-written float32"),
    }
    order = [f"{side} {dtype}" for dtype in DTYPES for side in ("framework", "hand-written")]
    return {"model": model, "hparams": hparams, "input_shape": list(input_shape), "batch": batch,
            "flops_per_step": flops, "variants": {name: rows[name] for name in order},
            "ratios": ratios}


# --- a population against one trial -------------------------------------------------------------

def population_throughput(trials: int, steps_per_call: int, repeats: int,
                          min_repeat_s: float) -> dict:
    """`trials` MNIST-1D MLPs (each its own seed and data order) as one vmapped program
    (`core/population.py`) against one trial, both K steps scanned per call: trials·steps/s."""
    config = default_config()
    config.model = model_config("mlp")
    config.data.validation_fraction = 0.0
    validate(config)
    dataset, mesh, experiment, source, step_fn = _framework_step(config)
    sample_x = sample_input(dataset)

    def member(seed):  # one init traced once, vmapped over the seeds (not `trials` traces)
        return create_train_state(experiment.model, sample_x, experiment.tx,
                                  experiment.reducer.init, mesh.size, seed,
                                  hparams=experiment.hparams)

    def init():
        members = jax.vmap(member)(jnp.arange(trials))
        return Population(jnp.zeros((), jnp.int32), members, jnp.ones((trials,), bool))

    abstract = jax.eval_shape(init)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    population = jax.jit(init, out_shardings=Population(
        replicated, state_shardings(abstract.members, mesh, 1), replicated))()
    single = init_sharded_state(experiment, sample_x, mesh, config.seed)

    def looped(fn_step, carry):
        fn = make_logged_train_fn(fn_step, steps_per_call, streamed=False)
        held = [carry, zero_totals(fn_step, carry, source, streamed=False)]

        def call():
            held[0], held[1] = fn(held[0], source, held[1])
            return held[1]

        return call

    names = (f"population of {trials}", "one trial")
    rows = interleaved({names[0]: looped(population_step(step_fn), population),
                        names[1]: looped(step_fn, single)}, repeats, min_repeat_s)
    for name, row in rows.items():
        if "median_ms" in row:
            per_call = steps_per_call * (trials if name == names[0] else 1)
            row["trial_steps_per_s"] = per_call / (row["median_ms"] / 1e3)
    speed = ratio(rows, *names)  # calls: population time vs one trial's, per repeat
    throughput = None if speed is None else {k: v * trials for k, v in speed.items()}
    return {"trials": trials, "steps_per_call": steps_per_call, "model": "mlp",
            "batch": config.data.batch_size, "variants": rows,
            "ratios": {"population / one trial, trials·steps/s": throughput}}
