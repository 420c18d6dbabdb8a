"""Test-set evaluation: the whole split in fixed-size, padded, sharded batches, summed exactly."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from jaxopt_lab.core.feed import shard_batch
from jaxopt_lab.core.step import make_eval_step


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


def make_evaluator(model, arrays: dict[str, np.ndarray], batch_size: int,
                   mesh: Mesh) -> Callable[[object], dict[str, float]]:
    """`evaluate(state) -> {"test_loss", "test_accuracy"}` over all of `arrays`.

    The batches are put on the devices once; the batch size is rounded up to a multiple of the
    device count so every device gets an equal share.
    """
    batch_size = -(-min(batch_size, len(arrays["label"])) // mesh.size) * mesh.size
    batches = [shard_batch(b, mesh) for b in padded_batches(arrays, batch_size)]
    eval_step = jax.jit(make_eval_step(model))

    def evaluate(state) -> dict[str, float]:
        sums = [eval_step(state.params, state.model_state, b) for b in batches]
        total = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *sums))
        count = float(total["count"])
        return {"test_loss": float(total["loss_sum"]) / count,
                "test_accuracy": float(total["correct"]) / count}

    return evaluate
