"""Masks set from outside the schedule: the pure pieces of lottery-ticket rewinding
(`workflows/lottery.py`) and width search (`workflows/nas.py`), which hold their masks in the
pruning transform's state and change them between trainings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.core.state import TrainState
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.prune.select import drop_smallest, float_keys
from jaxopt_lab.techniques.prune.transform import PruneState, find_state

SCOPES = ("global", "layer")


def with_masks(state: TrainState, masks: Any) -> TrainState:
    """`state` whose pruning state holds `masks` and whose params are zero where they are False.

    Raises:
      UserError: where the state's optimizer has no pruning transform (see `lottery_config`).
    """
    if find_state(state.opt_state) is None:
        raise UserError("lottery: the optimizer state holds no pruning state; build the run "
                        "from lottery_config(config) or wrap the optimizer with prune.wrap")
    opt_state = jax.tree.map(lambda x: x._replace(masks=masks) if isinstance(x, PruneState) else x,
                             state.opt_state, is_leaf=lambda x: isinstance(x, PruneState))
    params = jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), state.params, masks)
    return state.replace(params=params, opt_state=opt_state)


def magnitude_masks(params: Any, masks: Any, fraction: float, scope: str = "global") -> Any:
    """`masks` with a further `fraction` of the kept weights pruned, the smallest |w| first.

    Which weights are prunable is what `masks` says (an array where the transform masks, a
    scalar True where `skip` left a layer dense). `scope="global"` ranks all prunable weights
    together (Frankle et al. 2020), `"layer"` prunes the fraction in each layer. Pure and
    jittable; exactly `pruned + round(fraction * kept)` weights end up pruned (per layer for
    layer scope), every one pruned before among them.
    """
    if scope not in SCOPES:
        raise UserError(f"lottery scope={scope!r} is unknown; allowed: {', '.join(SCOPES)}")
    if not 0 < fraction < 1:
        raise UserError(f"lottery fraction={fraction!r} must be in (0, 1)")
    leaves, treedef = jax.tree.flatten(masks)
    weights = jax.tree.leaves(params)
    chosen = [i for i, m in enumerate(leaves) if np.ndim(m) > 0]
    # Kept weights rank above pruned ones (key 0) by magnitude, exactly, even at |w| = 0, so a
    # pruned weight is always among the dropped.
    keys = [jnp.where(leaves[i], float_keys(jnp.abs(weights[i])) + 1, 0).reshape(-1)
            for i in chosen]

    def cut(k: jax.Array) -> jax.Array:
        kept = jnp.sum(k > 0)
        return drop_smallest(k, k.size - kept + jnp.round(fraction * kept).astype(jnp.int32))

    if scope == "global":
        flat = cut(jnp.concatenate(keys))
        new = jnp.split(flat, np.cumsum([k.size for k in keys])[:-1])
    else:
        new = [cut(k) for k in keys]
    for i, m in zip(chosen, new, strict=True):
        leaves[i] = m.reshape(np.shape(leaves[i]))
    return treedef.unflatten(leaves)


def pruned_fraction(masks: Any) -> jax.Array:
    """The fraction of prunable weights (array leaves of `masks`) that are pruned."""
    arrays = [m for m in jax.tree.leaves(masks) if np.ndim(m) > 0]
    return 1.0 - sum(jnp.sum(m) for m in arrays) / sum(m.size for m in arrays)
