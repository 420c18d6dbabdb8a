"""A population of trials as one XLA program: the whole TrainState gets a leading trial axis.

Trials that differ only in values, not shapes (learning rates, weight decays, seeds), run as one
vmapped step: the injected hyperparameters live in the optimizer state, so each trial carries its
own. Trials that change shapes (widths, depths) need one population per shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.core.state import TrainState


def stack_trials(states: Sequence[TrainState]) -> TrainState:
    """Stacks per-trial states along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_trials(population: TrainState) -> list[TrainState]:
    """The inverse of `stack_trials`."""
    size = jax.tree.leaves(population)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], population) for i in range(size)]


def set_hyperparams(state: TrainState, **values) -> TrainState:
    """Overwrites injected optimizer hyperparameters (e.g. learning_rate=array of shape [T])."""

    def replace(path, leaf):
        keys = [getattr(p, "key", None) for p in path]
        for name, value in values.items():
            if len(keys) >= 2 and keys[-2] == "hyperparams" and keys[-1] == name:
                return jnp.asarray(value, leaf.dtype).reshape(leaf.shape)
        return leaf

    opt_state = jax.tree_util.tree_map_with_path(replace, state.opt_state)
    missing = set(values) - set(optax.tree_utils.tree_get(state.opt_state, "hyperparams") or {})
    if missing:
        raise KeyError(f"optimizer state has no injected hyperparameter(s) {sorted(missing)}")
    return state.replace(opt_state=opt_state)


def vmap_over_trials(train_fn: Callable) -> Callable:
    """`train_fn(state, source)` for a stacked state; the data source is shared by all trials."""
    return jax.jit(jax.vmap(train_fn, in_axes=(0, None)))
