"""One pure training step, `(state, batch) -> (state, metrics)`, built from the four seams.

    loss_fn(params, model_state, batch, rng, hparams) -> (loss, aux)          loss seam
    reducer.reduce(grads, comm_state, rng, hparams) -> (grads, comm_state, stats)
                                                                            communication seam
    tx: optax GradientTransformation(ExtraArgs)                             update seam
    the model is whatever `loss_fn` closes over                             model seam

`aux` is a dict with "metrics" (scalars to log) and "model_state" (updated non-trainable
collections); see `core/tasks.py` for the rest. `hparams` is `TrainState.hparams`, the per-trial
scalars of the loss and the reducer. The per-device part (loss, gradient, reduction) runs inside
`jax.shard_map` over the mesh's "data" axis, so a reducer sees exactly its own device's gradients,
its own state and its own key. `state_metrics(state)`, where given, adds scalars computed from the
new state (a technique's sparsity from its masks, say) to the step's metrics.

Two ways to fit a larger model or batch, both off by default: `grad_accum_steps` scans a device's
batch in microbatches before the one reduction and update (`core/accumulate.py`); a sharded
reducer (`sharded_mean_reducer`) holds parameters and optimizer state sharded over "data"
(ZeRO-3 / FSDP, `core/fsdp.py`).
A state with a loss scale (float16, `core/precision.py`) scales the loss and skips updates whose
gradients overflow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxopt_lab.core import fsdp
from jaxopt_lab.core.accumulate import accumulate
from jaxopt_lab.core.precision import (
    all_finite,
    current_scale,
    scaled_value_and_grad,
    skip_nonfinite,
)
from jaxopt_lab.core.state import TrainState
from jaxopt_lab.core.tasks import DATA_AXIS, LossFn

__all__ = ["DATA_AXIS", "Reducer", "data_mean", "make_train_step",
           "pmean_reducer", "sharded_mean_reducer"]
_REDUCER_STREAM = 1  # the reducer's key is the loss's folded with this: independent streams


class Reducer(NamedTuple):
    """A gradient-communication strategy as an (init, reduce) pair of pure functions.

    init(params) -> one device's comm state.
    reduce(grads, comm_state, rng, hparams) -> (mean grads, comm state, stats); runs per device
    with a key of its own (per step and device), may use collectives over DATA_AXIS; stats are
    scalars (e.g. bytes sent) logged with the metrics. A `sharded` reducer returns each
    device's shard of the mean (`core.fsdp.scatter_mean`) instead: the step then holds parameters
    and optimizer state sharded and gathers the parameters per device.
    """

    init: Callable[[Any], Any]
    reduce: Callable[[Any, Any, jax.Array, dict], tuple[Any, Any, dict]]
    sharded: bool = False


def data_mean(tree):
    """`pmean` over DATA_AXIS, skipped where the axis has one device: XLA keeps a one-device
    all-reduce as a copy per array, which shows on a small model's step."""
    if jax.lax.axis_size(DATA_AXIS) == 1:
        return tree
    return jax.lax.pmean(tree, DATA_AXIS)


def pmean_reducer() -> Reducer:
    """The default: an exact all-reduce mean of float32 gradients."""

    def reduce(grads, comm_state, rng, hparams):
        del rng, hparams
        nbytes = sum(g.size * g.dtype.itemsize for g in jax.tree.leaves(grads))
        stats = {"comm_bytes": jnp.float32(nbytes), "comm_bytes_uncompressed": jnp.float32(nbytes)}
        return data_mean(grads), comm_state, stats

    return Reducer(init=lambda params: (), reduce=reduce)


def sharded_mean_reducer() -> Reducer:
    """The exact mean as a reduce-scatter (ZeRO-3 / FSDP): each device keeps its shard of the
    mean of the large leaves (`core.fsdp`); the stats count the same bytes as `pmean_reducer`."""

    def reduce(grads, comm_state, rng, hparams):
        del rng, hparams
        nbytes = sum(g.size * g.dtype.itemsize for g in jax.tree.leaves(grads))
        stats = {"comm_bytes": jnp.float32(nbytes), "comm_bytes_uncompressed": jnp.float32(nbytes)}
        return fsdp.scatter_mean(grads), comm_state, stats

    return Reducer(init=lambda params: (), reduce=reduce, sharded=True)


def grad_norm(grads, sharded: bool = False) -> jax.Array:
    """`optax.global_norm(grads)`, the step's one norm (update and parameter norms took ~20 % of
    an MNIST-1D MLP step on a CPU). Computed as one dot over the concatenated gradients: on a
    CPU that single vectorized kernel cost ~2 % of that step where a reduction per leaf cost
    ~10 %. Sharded gradients keep the per-leaf form: concatenating them would gather them."""
    leaves = jax.tree.leaves(grads)
    if sharded or len(leaves) < 2:
        return optax.global_norm(grads)
    flat = jnp.concatenate([jnp.ravel(g).astype(jnp.float32) for g in leaves])
    return jnp.sqrt(jnp.vdot(flat, flat))


def make_train_step(loss_fn: LossFn, reducer: Reducer, tx: optax.GradientTransformationExtraArgs,
                    mesh: Mesh, state_metrics: Callable[[TrainState], dict] | None = None, *,
                    grad_accum_steps: int = 1
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Composes the seams into a pure step; jit, scan and vmap it from outside.

    `grad_accum_steps` microbatches per device and step (it must divide the per-device batch).
    With a `sharded` reducer the state's params and opt_state must be placed by
    `core.state.state_shardings(..., shard_params=True)`.
    """

    def per_device(specs, params, model_state, comm_state, rng, hparams, step, batch, loss_scale):
        # The keys are derived here, inside the per-device region, so a loss or reducer that never
        # uses its key (no dropout, no augmentation) lets XLA drop the derivation entirely.
        rng = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
        rng = jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS))
        if reducer.sharded:
            params = fsdp.gather(params, specs)
        # One device's ((loss, aux), grads), microbatch by microbatch where asked.
        grads_of = accumulate(scaled_value_and_grad(loss_fn, loss_scale), grad_accum_steps)
        (loss, aux), grads = grads_of(params, model_state, batch, rng, hparams)
        finite = None if loss_scale is None else all_finite(grads)  # float16: skip overflows
        local_comm = jax.tree.map(lambda x: x[0], comm_state)
        grads, local_comm, comm_stats = reducer.reduce(
            grads, local_comm, jax.random.fold_in(rng, _REDUCER_STREAM), hparams)
        comm_state = jax.tree.map(lambda x: x[None], local_comm)
        metrics = data_mean({"loss": loss, **aux["metrics"], **comm_stats})
        model_state = data_mean(aux["model_state"])
        return grads, model_state, comm_state, metrics, finite

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        specs = fsdp.tree_specs(state.params, mesh.shape[DATA_AXIS]) if reducer.sharded else P()
        sharded = jax.shard_map(
            functools.partial(per_device, specs), mesh=mesh,
            in_specs=(specs, P(), P(DATA_AXIS), P(), P(), P(), P(DATA_AXIS), P()),
            out_specs=(specs, P(), P(DATA_AXIS), P(), P()),
            check_vma=False)  # gradients stay per device: the reducer does the communicating
        grads, model_state, comm_state, metrics, finite = sharded(
            state.params, state.model_state, state.comm_state, state.rng, state.hparams,
            state.step, batch, current_scale(state))
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=metrics["loss"])
        params = optax.apply_updates(state.params, updates)
        if reducer.sharded:  # GSPMD splits the update; the new state stays where the old was
            params, opt_state = fsdp.constrain((params, opt_state), mesh)
        metrics = dict(metrics, grad_norm=grad_norm(grads, reducer.sharded))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  model_state=model_state, comm_state=comm_state)
        if finite is not None:
            new_state, metrics = skip_nonfinite(state, new_state, finite, metrics)
        if state_metrics is not None:
            metrics.update(state_metrics(new_state))
        return new_state, metrics

    return train_step
