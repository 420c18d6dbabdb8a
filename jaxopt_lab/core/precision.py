"""Mixed precision: the computation dtype a config names, and float16's dynamic loss scaling.

Parameters and optimizer state stay float32 (master weights); the model computes in
`train.compute_dtype` (its layers' Flax `dtype`), the loss and its softmax in float32 (the task
casts the model's outputs, `core/tasks.py::apply_model`), and gradients arrive in float32, the
parameters' dtype, so reducers and optimizers see float32 as before. The layers
`train.float32_layers` names (by default the input-reading and the logits layer) compute in
float32 (`models/float32_layers.py`). bfloat16 has float32's
exponent range and needs nothing more. float16's is small: gradients below 6e-8 flush to zero, so
the loss is multiplied by a large scale before differentiation and the gradients divided by it
after (Micikevicius et al., "Mixed Precision Training", ICLR 2018). A scale too large overflows:
the step's gradients are non-finite, its update is skipped and the scale halved; after
`growth_interval` finite steps in a row the scale doubles.

The scale is `TrainState.loss_scale`, so it is checkpointed and resumes exactly; it is None (no
leaves) for the other dtypes, so their states and checkpoints are as they were. flax's
`DynamicScale` holds it with its rule's constants. Its own `value_and_grad` is not used: it judges
finiteness per device, or after an all-reduce of its own that would bypass the communication
seam. Here every device's verdict is combined before the reducer (a compressor may hide a
non-finite value: signSGD sends sign(inf) = 1), and `adjust` applies DynamicScale's rule to it.

A skipped overflow is not a divergence: the step reports it (`loss_scale_overflow`), and
`diverged` excuses such a step. Non-finite gradients at a scale of 1 (the floor), or a
non-finite loss, which the scale does not touch, are divergence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.dynamic_scale import DynamicScale

from jaxopt_lab.core.layers import abstract_variables, check_patterns, default_skip
from jaxopt_lab.core.tasks import DATA_AXIS
from jaxopt_lab.errors import UserError
from jaxopt_lab.models.float32_layers import computes_below_float32, with_float32_layers
from jaxopt_lab.models.remat import check_remat

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
OVERFLOW = "loss_scale_overflow"  # step metric: 1 where the update was skipped for an overflow
LOSS_SCALE = "loss_scale"  # step metric: the scale the step's loss was multiplied by


class LossScale(NamedTuple):
    """TrainState.loss_scale of a float16 run."""

    dynamic: DynamicScale  # flax's: scale (float32 scalar), fin_steps (int32: finite in a row)
    skipped: jax.Array  # int32 scalar: updates skipped for overflow so far


def compute_dtype(name: str) -> Any:
    """The jnp dtype `train.compute_dtype` names."""
    if name not in COMPUTE_DTYPES:
        raise UserError(f"train.compute_dtype={name!r} is unknown; allowed: "
                        f"{', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def check_precision(train) -> None:
    """`train.compute_dtype`, `train.float32_layers` and `train.remat` of a config, before
    anything is built."""
    compute_dtype(train.compute_dtype)
    check_patterns("train.float32_layers", train.float32_layers, "the first and last layers")
    check_remat(train.remat, "train.remat")


def with_layer_policy(model: Any, train, sample_x: Any) -> Any:
    """`model` (computing in `train.compute_dtype`) with `train.float32_layers` in float32: by
    default the first and last multiplying layers, traced on `sample_x` (`models/float32_layers.py`).
    Under float32 there is nothing to keep."""
    if not computes_below_float32(model):
        return model
    layers = train.float32_layers
    if layers is None:
        layers = default_skip(model, abstract_variables(model, sample_x), sample_x)
    return with_float32_layers(model, layers)


def scales_loss(model: Any) -> bool:
    """Whether `model` computes in float16 (its `dtype` field), and so trains with a loss scale."""
    dtype = getattr(model, "dtype", None)
    return dtype is not None and jnp.dtype(dtype) == jnp.float16


def initial_loss_scale(model: Any) -> LossScale | None:
    """A fresh loss scale where `model` computes in float16, else None."""
    if not scales_loss(model):
        return None
    # A scale of 1 multiplies nothing: non-finite gradients there are the model's, not the scale's.
    dynamic = DynamicScale(fin_steps=jnp.zeros((), jnp.int32), scale=jnp.float32(2.0**16),
                           minimum_scale=1.0)
    return LossScale(dynamic, jnp.zeros((), jnp.int32))


def current_scale(state) -> jax.Array | None:
    """The scale a step multiplies its loss by, or None where the state has no loss scale."""
    return None if state.loss_scale is None else state.loss_scale.dynamic.scale


def scaled_value_and_grad(loss_fn: Callable, scale: jax.Array | None) -> Callable:
    """`jax.value_and_grad(loss_fn, has_aux=True)`; with a `scale`, of the loss times it, the
    gradients divided back (the loss and aux come back unscaled)."""
    if scale is None:
        return jax.value_and_grad(loss_fn, has_aux=True)

    def scaled_loss(*args):
        loss, aux = loss_fn(*args)
        return loss * scale, (loss, aux)

    def value_and_grad(*args):
        (_, (loss, aux)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(*args)
        return (loss, aux), jax.tree.map(lambda g: g / scale, grads)

    return value_and_grad


def all_finite(grads: Any) -> jax.Array:
    """Whether every device's gradients are all finite; inside the step's per-device region,
    before the reducer."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    if jax.lax.axis_size(DATA_AXIS) > 1:
        finite = jax.lax.pmin(finite.astype(jnp.int32), DATA_AXIS) > 0
    return finite


def adjust(dynamic: DynamicScale, finite: jax.Array) -> DynamicScale:
    """DynamicScale's rule on a verdict taken elsewhere: grow by `growth_factor` after
    `growth_interval` finite steps in a row, back off by `backoff_factor` (not below
    `minimum_scale`) on a non-finite one."""
    grow = dynamic.fin_steps == dynamic.growth_interval
    grown = jnp.where(grow, jnp.minimum(dynamic.scale * dynamic.growth_factor,
                                        jnp.finfo(jnp.float32).max), dynamic.scale)
    backed_off = jnp.maximum(dynamic.scale * dynamic.backoff_factor, dynamic.minimum_scale)
    return dynamic.replace(
        scale=jnp.where(finite, grown, backed_off).astype(jnp.float32),
        fin_steps=jnp.where(grow | ~finite, 0, dynamic.fin_steps + 1).astype(jnp.int32))


def skip_nonfinite(old, new, finite: jax.Array, metrics: dict) -> tuple[Any, dict]:
    """`new` where the step's gradients were finite; else `old` one step on (its data and keys
    move on), the update skipped. The scale adjusts either way; the metrics gain the scale used
    and whether the step was an overflow the scale explains."""
    loss_scale = old.loss_scale
    state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old).replace(
        step=new.step,
        loss_scale=LossScale(adjust(loss_scale.dynamic, finite),
                             loss_scale.skipped + (~finite).astype(jnp.int32)))
    scale = loss_scale.dynamic.scale
    overflow = ~finite & jnp.isfinite(metrics["loss"]) & (scale > 1)
    return state, {**metrics, LOSS_SCALE: scale, OVERFLOW: overflow.astype(jnp.float32)}


def diverged(metrics: dict) -> jax.Array:
    """Where a step's loss or gradient norm is non-finite and no loss-scale overflow explains
    it (elementwise over stacked steps and members)."""
    bad = ~(jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]))
    if OVERFLOW in metrics:
        bad = bad & (metrics[OVERFLOW] == 0)
    return bad


def loss_scale_summary(state) -> dict:
    """summary.json's `loss_scale` (the final scale) and `skipped_steps` (updates skipped for
    overflow) of a host TrainState; {} where it has no loss scale."""
    if state.loss_scale is None:
        return {}
    return {LOSS_SCALE: float(np.asarray(state.loss_scale.dynamic.scale)),
            "skipped_steps": int(np.asarray(state.loss_scale.skipped))}
