"""Rematerialisation: a model's blocks recompute their activations in the backward pass.

Every registry model takes `remat`: "none" (keep every activation the backward pass needs),
"full" (keep only each block's input; recompute the rest) or the name of a
`jax.checkpoint_policies` policy that decides what inside a block is kept (e.g. "dots_saveable"
keeps matmul and conv outputs and recomputes the cheap elementwise ops). A block is a ResNet basic
block, a Transformer block, or one layer (with its activation and pooling) of the MLP, the CNNs
and logistic regression. Memory falls from every block's intermediates to their inputs, at the
price of a second forward pass through each block (Chen et al., "Training Deep Nets with
Sublinear Memory Cost", 2016).

`checkpointed` lifts a function of the module, not a module class, through `nn.remat`: the layers
it creates belong to the calling module as before, so parameter paths, checkpoints and the
`skip` patterns of pruning and quantization do not depend on `remat`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
from flax import linen as nn

from jaxopt_lab.errors import UserError

NONE, FULL = "none", "full"


def _is_policy(name: str) -> bool:
    """A ready policy, called as policy(prim, *avals, **params); not a factory such as
    save_only_these_names(*names), which needs arguments a config cannot give (and takes no
    keyword parameters of a primitive)."""
    value = getattr(jax.checkpoint_policies, name)
    if name.startswith("_") or not callable(value):
        return False
    try:
        parameters = inspect.signature(value).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD for p in parameters)


def remat_choices() -> tuple[str, ...]:
    """Every value `remat` takes: none, full and this JAX's ready checkpoint policies."""
    return (NONE, FULL, *sorted(n for n in dir(jax.checkpoint_policies) if _is_policy(n)))


def check_remat(value: object, key: str = "remat") -> str:
    """`value` if it names a remat choice, else a UserError naming `key`."""
    choices = remat_choices()
    if value not in choices:
        raise UserError(f"{key}={value!r} is unknown; allowed: {', '.join(choices)}")
    return value


def checkpointed(fn: Callable, remat: str, static_argnums: tuple[int, ...] = ()) -> Callable:
    """`fn(module, *args)` with its activations recomputed in the backward pass as `remat` says
    (`fn` itself for "none"). `static_argnums` count `module` as 0 (Python values: widths,
    strides, the `train` flag)."""
    check_remat(remat)
    if remat == NONE:
        return fn
    policy = None if remat == FULL else getattr(jax.checkpoint_policies, remat)
    return nn.remat(fn, policy=policy, static_argnums=static_argnums)
