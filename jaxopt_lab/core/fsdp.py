"""Sharded parameters and optimizer state (ZeRO-3 / FSDP) over the mesh's "data" axis.

Each device holds 1/n of every large parameter and of its optimizer state, split along the
leaf's largest axis that n divides. The step gathers the whole parameters inside the per-device
region (`all_gather`), computes its gradient as usual, and reduce-scatters it (`psum_scatter`,
then / n: each device gets the mean of its own shard); the optax update then runs on the shards,
outside the per-device region, where XLA's partitioner (GSPMD) splits its elementwise work.
Memory per device for parameters, gradients' results and optimizer state falls by about n; the
gathered parameters and the full per-device gradient are alive only inside the step.

Leaves smaller than MIN_SHARD_SIZE elements, or with no axis n divides, stay replicated and are
all-reduced as usual. A compressor cannot take the reduce-scatter's place: each compresses and
exchanges whole tensors and keeps whole-tensor state per device, so `check_reducer` refuses the
combination.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_lab.core.tasks import DATA_AXIS

MIN_SHARD_SIZE = 1024  # elements: a smaller leaf costs a collective more than its memory saves
KEY = "train.shard_params"


def shard_axis(shape: tuple[int, ...], devices: int) -> int | None:
    """The axis a leaf of `shape` is split along over `devices`: its largest axis that `devices`
    divides (the first such on a tie), or None where it stays replicated."""
    size = 1
    for d in shape:
        size *= d
    if devices < 2 or size < MIN_SHARD_SIZE:
        return None
    axes = [a for a, d in enumerate(shape) if d % devices == 0]
    return max(axes, key=lambda a: shape[a], default=None)


def leaf_spec(shape: tuple[int, ...], devices: int, leading_axes: int = 0) -> P:
    """The PartitionSpec of one leaf; the first `leading_axes` (a population's members) are never
    split and do not count in the choice."""
    axis = shard_axis(tuple(shape[leading_axes:]), devices)
    if axis is None:
        return P()
    return P(*([None] * (leading_axes + axis)), DATA_AXIS)


def tree_specs(tree: Any, devices: int, leading_axes: int = 0) -> Any:
    """`leaf_spec` of every array (or ShapeDtypeStruct) leaf of `tree`."""
    return jax.tree.map(lambda x: leaf_spec(jnp.shape(x), devices, leading_axes), tree)


def gather(shards: Any, specs: Any) -> Any:
    """Inside the per-device region: each sharded leaf whole again, replicated leaves as they are."""

    def one(x, spec):
        if spec == P():
            return x
        return jax.lax.all_gather(x, DATA_AXIS, axis=len(spec) - 1, tiled=True)

    return jax.tree.map(one, shards, specs)


def constrain(tree: Any, mesh: Mesh) -> Any:
    """`tree` (params or optimizer state, outside the per-device region) placed by the rule, so
    the updated state leaves the step sharded as it came in."""
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, leaf_spec(jnp.shape(x), mesh.shape[DATA_AXIS]))), tree)


def scatter_mean(grads: Any) -> Any:
    """Inside the per-device region: the devices' mean gradient, each sharded leaf as this
    device's shard of it (reduce-scatter), each replicated leaf whole (all-reduce)."""
    devices = jax.lax.axis_size(DATA_AXIS)
    if devices == 1:
        return grads

    def one(g):
        axis = shard_axis(g.shape, devices)
        if axis is None:
            return jax.lax.pmean(g, DATA_AXIS)
        return jax.lax.psum_scatter(g, DATA_AXIS, scatter_dimension=axis, tiled=True) / devices

    return jax.tree.map(one, grads)

