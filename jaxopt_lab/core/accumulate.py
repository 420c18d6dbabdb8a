"""Gradient accumulation: a step's per-device batch in microbatches, scanned, then one update.

A batch that does not fit in a device's memory at once is cut into `steps` equal microbatches
along its leading axis; `lax.scan` computes one microbatch's loss and gradient at a time and sums
them, so only one microbatch's activations are alive. The step then reduces the mean gradient
once (the communication seam) and updates once: for a loss that is a mean over examples, the
large-batch step to float tolerance, and the bytes sent per step do not grow with `steps`.

Non-trainable collections (BatchNorm's statistics) thread through the microbatches in order, as
they would through `steps` small steps; the normalisation itself is per microbatch, so a model
with BatchNorm differs from its large-batch step (as it does across devices). Each microbatch
draws its own key (dropout, augmentation). `core.tasks.labeled_mean` stays exact: each microbatch
divides by the labelled count of the whole step (`LABELED_COUNT`), not by its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_lab.core.tasks import DATA_AXIS, LABELED, LABELED_COUNT
from jaxopt_lab.errors import UserError

# (params, model_state, batch, rng, hparams) -> ((loss, aux), grads): `jax.value_and_grad` of a loss
GradFn = Callable[[Any, Any, dict, jax.Array, dict], tuple[tuple[jax.Array, dict], Any]]
KEY = "train.grad_accum_steps"


def check_microbatches(per_device_batch: int, steps: int) -> None:
    """One line naming the key where `steps` does not split a device's batch evenly."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"{KEY} must be an int >= 1, got {steps!r}")
    if per_device_batch % steps:
        raise UserError(f"{KEY}={steps} must divide the per-device batch of "
                        f"{per_device_batch} examples (data.batch_size / devices)")


def accumulate(grad_fn: GradFn, steps: int) -> GradFn:
    """`grad_fn` over `steps` microbatches of its batch: the mean loss, metrics and gradient, the
    model state after the last microbatch. `steps=1` returns `grad_fn` itself.

    The returned aux holds only "metrics" and "model_state" (what the step reads).
    """
    if steps == 1:
        return grad_fn

    def accumulated(params, model_state, batch, rng, hparams):
        check_microbatches(jax.tree.leaves(batch)[0].shape[0], steps)
        micro = jax.tree.map(lambda a: a.reshape(steps, a.shape[0] // steps, *a.shape[1:]), batch)
        extra = {}
        if LABELED in batch:  # every microbatch divides by the step's labelled count
            extra[LABELED_COUNT] = jax.lax.pmean(jnp.sum(batch[LABELED]), DATA_AXIS) / steps

        def one(model_state, i, mb):
            (loss, aux), grads = grad_fn(params, model_state, {**mb, **extra},
                                         jax.random.fold_in(rng, i), hparams)
            scalars = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), (loss, aux["metrics"]))
            return aux["model_state"], (*scalars, grads)

        first = jax.tree.map(lambda a: a[0], micro)
        _, shapes = jax.eval_shape(one, model_state, 0, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(carry, xs):
            model_state, sums = carry
            model_state, values = one(model_state, *xs)
            return (model_state, jax.tree.map(jnp.add, sums, values)), None

        (model_state, sums), _ = jax.lax.scan(body, (model_state, zeros),
                                              (jnp.arange(steps), micro))
        loss, metrics, grads = jax.tree.map(lambda s: s / steps, sums)
        return (loss, {"metrics": metrics, "model_state": model_state}), grads

    return accumulated
