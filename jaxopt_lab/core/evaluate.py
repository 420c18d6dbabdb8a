"""Evaluation of a split: all of it in fixed-size, padded, sharded batches, summed exactly.

The task's `eval_fn` gives per-example values; here they are masked (padding), summed over the
split and divided by its size, and named `<split>_<metric>` ("validation_loss", "test_accuracy").
A population is evaluated in one vmapped program, one result per member.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxopt_lab.core.feed import shard_batch
from jaxopt_lab.core.state import model_params
from jaxopt_lab.core.tasks import EvalFn


def padded_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Splits a split into equal batches; the last is padded and `mask` marks real examples."""
    n = len(arrays["label"])
    batches = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        pad = batch_size - (stop - start)
        batch = {k: np.concatenate([v[start:stop], np.zeros((pad, *v.shape[1:]), v.dtype)])
                 for k, v in arrays.items()}
        batch["mask"] = np.concatenate([np.ones(stop - start, np.float32), np.zeros(pad, np.float32)])
        batches.append(batch)
    return batches


def make_eval_sums(eval_fn: EvalFn) -> Callable:
    """`(params, model_state, batch) -> {metric: masked sum, "count": examples}`."""

    def sums(params, model_state, batch):
        mask = batch["mask"]
        values = eval_fn(params, model_state, {k: v for k, v in batch.items() if k != "mask"})
        out = {name: jnp.sum(value.astype(jnp.float32) * mask) for name, value in values.items()}
        return {**out, "count": jnp.sum(mask)}

    return sums


def make_evaluator(eval_fn: EvalFn, arrays: dict[str, np.ndarray], batch_size: int, mesh: Mesh,
                   split: str = "test", members: bool = False) -> Callable:
    """`evaluate(state) -> {"<split>_<metric>": mean}` over all of `arrays`; with `members`,
    `evaluate(stacked state) -> [one such dict per member]`.

    The batches are put on the devices once; the batch size is rounded up to a multiple of the
    device count so every device gets an equal share.
    """
    batch_size = -(-min(batch_size, len(arrays["label"])) // mesh.size) * mesh.size
    batches = [shard_batch(b, mesh) for b in padded_batches(arrays, batch_size)]
    sums = make_eval_sums(eval_fn)
    eval_step = jax.jit(jax.vmap(sums, in_axes=(0, 0, None)) if members else sums)

    def evaluate(state):
        parts = [eval_step(model_params(state.params), state.model_state, b) for b in batches]
        total = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *parts))
        count = np.asarray(total.pop("count"))
        means = {f"{split}_{name}": np.asarray(value) / count for name, value in total.items()}
        if not members:
            return {name: float(value) for name, value in means.items()}
        return [{name: float(value[i]) for name, value in means.items()}
                for i in range(count.shape[0])]

    return evaluate
