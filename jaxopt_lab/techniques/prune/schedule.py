"""When masks change and to what sparsity, as functions of the update count (traced).

one_shot: the target at `begin_step`, kept from then on. gradual (Zhu & Gupta 2017, "To prune, or
not to prune"): s_t = s_f + (s_i − s_f)(1 − (t − t_0) / (t_1 − t_0))³ between begin_step t_0 and
end_step t_1, masks recomputed every `frequency` steps and at t_1. SET and RigL change their
topology every `frequency` steps after begin_step until end_step, dropping a fraction that
decays on a cosine (Evci et al. 2020).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopt_lab.techniques.prune.options import SPARSE_TRAINING, PruneOptions


def sparsity_at(o: PruneOptions, count: jax.Array, target: jax.Array) -> jax.Array:
    """The sparsity the masks should have after update `count` (0 before begin_step)."""
    if o.schedule == "one_shot":
        return jnp.where(count >= o.begin_step, target, 0.0)
    progress = jnp.clip((count - o.begin_step) / (o.end_step - o.begin_step), 0.0, 1.0)
    current = target + (o.initial_sparsity - target) * (1.0 - progress) ** 3
    return jnp.where(count >= o.begin_step, current, 0.0)


def due(o: PruneOptions, count: jax.Array) -> jax.Array:
    """Whether update `count` recomputes the masks."""
    since = count - o.begin_step
    periodic = (since >= 0) & (since % o.frequency == 0)
    if o.method in SPARSE_TRAINING:
        return (since == 0) | (periodic & (count < o.end_step))
    if o.method == "ste":  # re-cut from the dense weights until end_step, at the final target
        return (since == 0) | (periodic & (count < o.end_step)) | (count == o.end_step)
    if o.schedule == "one_shot":
        return since == 0
    return (periodic & (count <= o.end_step)) | (count == o.end_step)


def drop_fraction_at(o: PruneOptions, count: jax.Array) -> jax.Array:
    """SET / RigL: the fraction of kept weights replaced at update `count` (cosine decay)."""
    progress = jnp.clip((count - o.begin_step) / max(o.end_step - o.begin_step, 1), 0.0, 1.0)
    return o.drop_fraction * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
