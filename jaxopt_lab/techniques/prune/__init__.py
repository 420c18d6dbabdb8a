"""Pruning at the update seam: an optax transformation whose state holds the masks.

    tx = prune.wrap(optax.adam(1e-2), skip=(), sparsity=0.9, begin_step=500, end_step=2000)
    tx = prune.wrap(tx, model=model, sample_x=x, pattern="channels", sparsity=0.5)
    small_model, small_variables = prune.shrink(model, variables)   # channels really removed
    stored = prune.encode(params, "bitmask")                         # values + where they are

Pruned weights are exactly zero after every update, for every method. The target sparsity is a
value in the state (`PruneState.hyperparams["sparsity"]`), so a population of targets runs as
one vmapped program (`techniques.prune.sparsity` as a population key).

Options (`PruneOptions`): method magnitude | random | snip | set | rigl | ste; pattern
unstructured | "N:M" (e.g. "2:4") | channels (filters, neurons, attention heads, scored by the
`norm` l1 | l2 of their weights); scope layer | global; distribution uniform | erk (per-layer
sparsities, layer scope); sparsity (fraction of zeros among the prunable kernels; for channels,
of each group's channels); schedule one_shot (at begin_step) | gradual (cubic, initial_sparsity
→ sparsity from begin_step to end_step, every `frequency` updates); drop_fraction (SET / RigL);
skip (regular expressions over parameter paths left dense; None = the first and last layers,
which needs `model` and `sample_x`; () prunes every kernel).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.core.layers import abstract_variables, default_skip_or, param_paths
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.prune.groups import ChannelGroup, channel_groups
from jaxopt_lab.techniques.prune.options import PruneOptions, prune_options
from jaxopt_lab.techniques.prune.shrink import shrink
from jaxopt_lab.techniques.prune.storage import decode, encode, encoded_bytes
from jaxopt_lab.techniques.prune.tickets import magnitude_masks, pruned_fraction, with_masks
from jaxopt_lab.techniques.prune.transform import PruneState, find_state, prune_transform

__all__ = ["ChannelGroup", "PruneOptions", "PruneState", "channel_groups", "decode", "encode",
           "encoded_bytes", "find_state", "magnitude_masks", "prune_options", "pruned_fraction", "pruning_record",
           "resolve_skip", "shrink", "sparsity_metrics", "sparsity_summary", "with_masks",
           "wrap"]


def resolve_skip(options: PruneOptions, model=None, sample_x: Any = None) -> tuple[str, ...]:
    """`options.skip`, or where it is None the default: the model's first and last layers."""
    return default_skip_or(
        options.skip, model, sample_x,
        "prune.wrap: the default skip (first and last layers) needs model= and sample_x=; or "
        "pass skip=() to prune every kernel, or your own patterns")


def wrap(tx: optax.GradientTransformation, *, model=None, sample_x: Any = None,
         groups=None, seed: int = 0, **options: Any) -> optax.GradientTransformationExtraArgs:
    """`tx` with pruning: masks applied to its updates and to the parameters.

    Args:
      tx: any optax transformation (its update receives the gradients; extra args pass through).
      model, sample_x: the Flax module and one input batch, for the default `skip` and, with
        pattern="channels", for the channel groups (`groups.channel_groups`).
      groups: channel groups of your own for pattern="channels" (see `groups.ChannelGroup`).
      seed: the key of random scores and of regrowth.
      options: `PruneOptions` fields.
    """
    o = prune_options(**options)
    skip = resolve_skip(o, model, sample_x)
    if o.pattern == "channels" and groups is None:
        if model is None or sample_x is None:
            raise UserError("prune pattern='channels' needs model= and sample_x= (to find which "
                            "parameters share a channel) or groups= of your own")
        groups = channel_groups(model, abstract_variables(model, sample_x)["params"],
                                sample_x)
    pruned = prune_transform(tx, o, skip, groups or (), seed)
    # What summary.json records of it, kept on its update function, so a run given this
    # optimizer from Python records the pruning it really does (`pruning_record`).
    pruned.update.prune_record = {**o.describe(), "skip": list(skip)}
    return pruned


def pruning_record(tx: optax.GradientTransformation) -> dict | None:
    """What `wrap` made `tx` do, as summary.json records it; None for another optimizer."""
    return getattr(tx.update, "prune_record", None)


def _pruned_kernels(masks: Any) -> list[tuple[str, jax.Array]]:
    return [(p, m) for p, m in zip(param_paths(masks), jax.tree.leaves(masks), strict=True)
            if p.endswith("['kernel']") and np.ndim(m) > 0]


def sparsity_metrics(state) -> dict[str, jax.Array]:
    """The step metric: the fraction of pruned weights among the prunable kernels (from the
    masks of the TrainState's optimizer state)."""
    prune_state = find_state(state.opt_state)
    kernels = _pruned_kernels(prune_state.masks)
    total = sum(m.size for _, m in kernels)
    kept = sum(jnp.sum(m) for _, m in kernels)
    return {"sparsity": 1.0 - kept / total}


def sparsity_summary(state) -> dict[str, float | int]:
    """summary.json's fields, counted from the parameters themselves: `sparsity` (zeros among
    the prunable kernels), `nonzero_params` (non-zero parameters of the whole model) and the
    bytes of the compact encodings (`storage`), beside the dense `model_bytes`."""
    prune_state = find_state(state.opt_state)
    params = dict(zip(param_paths(state.params), jax.tree.leaves(state.params), strict=True))
    paths = [p for p, _ in _pruned_kernels(prune_state.masks)]
    zeros = sum(int(np.sum(np.asarray(params[p]) == 0)) for p in paths)
    return {"sparsity": zeros / sum(np.size(params[p]) for p in paths),
            "nonzero_params": sum(int(np.count_nonzero(np.asarray(v))) for v in params.values()),
            **encoded_bytes(state.params, paths)}
