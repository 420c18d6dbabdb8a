"""Populations for searches: the core's stacked-trial mechanics, and running a train function
over a stacked state outside the loop (`vmap_over_trials`).

A search sets each member's values by config key with `set_values` ("optim.lr", "optim.momentum",
"optim.weight_decay", "optim.warmup_steps", "data.seed", or any `TrainState.hparams` key) and runs
the population through the loop (`config.population`) or with `vmap_over_trials`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxopt_lab.core.population import (
    MEMBER_AXIS,
    set_values,
    stack_trials,
    stop_members,
    unstack_trials,
)

__all__ = ["set_values", "stack_trials", "stop_members", "unstack_trials", "vmap_over_trials"]


def vmap_over_trials(train_fn: Callable) -> Callable:
    """`train_fn(state, source)` for a stacked state; the data source is shared by all trials."""
    return jax.jit(jax.vmap(train_fn, in_axes=(0, None), axis_name=MEMBER_AXIS))
