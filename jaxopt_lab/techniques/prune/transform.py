"""The pruning optax transformation: masks, the update count, the target and a key in its state.

    tx = prune.wrap(optax.adam(1e-3), skip=(), sparsity=0.9, end_step=2000)

Each update runs the inner optimizer on the gradients, then, where the schedule says so,
recomputes the masks from the would-be weights, and returns updates that leave every pruned
weight exactly 0 (a kept weight gets the inner optimizer's update unchanged). All of it is in
`PruneState`, so masks checkpoint, resume, shard, scan and vmap with the rest of the TrainState,
and the target sparsity is a per-trial value (`hyperparams["sparsity"]`).

Methods differ in the score a mask is cut from: magnitude |w|; random (the sanity baseline);
SNIP |g ⊙ w| (Lee et al. 2019; at begin_step 0 that is saliency at initialisation); or a score
of your own, named by an import path "module:function" as the method: `function(weights, grads)`
takes and returns dicts keyed by parameter path, higher scores kept. SET (Mocanu
et al. 2018) and RigL (Evci et al. 2020) start from a random mask at the target and then drop
the smallest kept weights and regrow at random (SET) or where the gradient is largest (RigL), new
connections at zero. STE keeps the dense weights in the state, trains them with the gradient taken
at the pruned ones (a straight-through estimator) and re-cuts the mask from them. A connection
SET / RigL regrow starts afresh in the inner optimizer too: its entries of the optimizer state
(momentum, second moments, built from gradients taken while it was pruned) are zeroed, as RigL's
reference resets the momentum of new connections.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.core.layers import param_paths, touched
from jaxopt_lab.core.population import when_any_member
from jaxopt_lab.errors import UserError
from jaxopt_lab.importpath import is_import_path, load_object
from jaxopt_lab.techniques.prune import masks as M
from jaxopt_lab.techniques.prune import schedule
from jaxopt_lab.techniques.prune.options import PruneOptions


class PruneState(NamedTuple):
    inner: Any  # the wrapped optimizer's state
    masks: Any  # like params: a bool array per masked leaf, a scalar True elsewhere
    count: jax.Array  # int32: updates taken
    rng: jax.Array  # uint32 key data: random scores and regrowth
    hyperparams: dict  # {"sparsity": float32}: the target, a per-trial value
    dense: Any  # STE: the dense weights of masked leaves (like params, () elsewhere); else ()


def make_layout(params: Any, options: PruneOptions, skip: Sequence[str],
                groups: Sequence[Any] = ()) -> M.Layout:
    """The prunable kernels of `params` (every 'kernel' leaf of 2+ dims that `skip` leaves in)
    and, for the channels pattern, the channel groups none of whose kernels is skipped."""
    flat = dict(zip(param_paths(params), jax.tree.leaves(params), strict=True))
    keep = dict(zip(param_paths(params), jax.tree.leaves(touched(params, skip)), strict=True))
    shapes = {p: tuple(np.shape(v)) for p, v in flat.items()}
    if options.pattern == "channels":
        chosen = tuple(M.ChannelMembers(g.name, tuple(g.members), g.size) for g in groups
                       if all(keep[p] for p, _ in g.members if p.endswith("['kernel']")))
        for g in chosen:
            for p, axis in g.members:
                if p not in shapes or shapes[p][axis] != g.size:
                    raise UserError(f"prune: channel group {g.name!r} names {p} axis {axis}, "
                                    f"which the parameters do not have with {g.size} channels")
        kernels = tuple(dict.fromkeys(p for g in chosen for p, _ in g.members
                                      if p.endswith("['kernel']")))
        return M.Layout(kernels, shapes, chosen)
    kernels = tuple(p for p in flat if p.endswith("['kernel']") and len(shapes[p]) >= 2
                    and keep[p])
    if options.n_of_m is not None:
        m = options.n_of_m[1]
        for p in kernels:
            if math.prod(shapes[p][:-1]) % m:
                raise UserError(f"prune pattern={options.pattern!r}: layer {p} has "
                                f"{math.prod(shapes[p][:-1])} inputs per output, not a multiple "
                                f"of {m}; leave it dense with skip")
    return M.Layout(kernels, shapes)


def _by_path(tree: Any) -> dict[str, Any]:
    return dict(zip(param_paths(tree), jax.tree.leaves(tree), strict=True))


def _like(params: Any, by_path: dict[str, Any], fill: Any) -> Any:
    """A tree like `params` with `by_path`'s values at their paths and `fill` elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: by_path.get(jax.tree_util.keystr(path), fill), params)


def compute_masks(options: PruneOptions, layout: M.Layout, weights: dict, grads: dict,
                  old: dict, sparsity: jax.Array, key: jax.Array, count: jax.Array) -> dict:
    """The masks after update `count`, cut from the would-be `weights` and the `grads`."""
    if options.pattern == "channels":
        if options.method == "random":  # a removed channel (norm 0) stays removed
            scores = {g.name: jax.random.uniform(jax.random.fold_in(key, i), (g.size,))
                      * (M.channel_norms(weights, g, options.norm) > 0)
                      for i, g in enumerate(layout.groups)}
        else:
            source = ({p: weights[p] * grads[p] for p in weights} if options.method == "snip"
                      else weights)
            scores = {g.name: M.channel_norms(source, g, options.norm) for g in layout.groups}
        return M.channels(scores, layout, sparsity)
    random = {p: jax.random.uniform(jax.random.fold_in(key, i), layout.shapes[p])
              for i, p in enumerate(layout.kernels)}
    magnitude = {p: jnp.abs(weights[p]) for p in layout.kernels}
    if options.method in ("set", "rigl"):
        initial = M.unstructured(random, layout, sparsity, options.scope, options.distribution)
        regrow = random if options.method == "set" else {p: jnp.abs(grads[p])
                                                           for p in layout.kernels}
        updated = M.drop_and_regrow({p: old[p] for p in layout.kernels}, magnitude, regrow,
                                    schedule.drop_fraction_at(options, count))
        first = count == options.begin_step
        return {p: jnp.where(first, initial[p], updated[p]) for p in layout.kernels}
    if is_import_path(options.method):  # a score of your own; a pruned weight stays pruned
        score_fn = load_object(options.method, "techniques.prune.method")
        given = score_fn({p: weights[p] for p in layout.kernels},
                         {p: grads[p] for p in layout.kernels})
        scores = {p: jnp.where(weights[p] != 0, jnp.asarray(given[p], jnp.float32), 0.0)
                  for p in layout.kernels}
    else:
        scores = {"random": {p: random[p] * (weights[p] != 0) for p in layout.kernels},
                  "snip": {p: jnp.abs(weights[p] * grads[p]) for p in layout.kernels}
                  }.get(options.method, magnitude)
    if options.n_of_m is not None:
        return M.n_of_m(scores, layout, *options.n_of_m)
    return M.unstructured(scores, layout, sparsity, options.scope, options.distribution)


def prune_transform(tx: optax.GradientTransformation, options: PruneOptions,
                    skip: Sequence[str], groups: Sequence[Any] = (), seed: int = 0
                    ) -> optax.GradientTransformationExtraArgs:
    """`tx` with pruning on top (see the module docstring); `prune.wrap` is the public entry."""
    tx = optax.with_extra_args_support(tx)
    ste = options.method == "ste"

    def init(params):
        layout = make_layout(params, options, skip, groups)
        if not layout.kernels:
            raise UserError("prune: no layer is left to prune (every kernel is skipped, or the "
                            "model has none); check skip")
        flat = _by_path(params)
        masks = _like(params, {p: jnp.ones(np.shape(flat[p]), bool) for p in layout.masked},
                      jnp.ones((), bool))
        dense = _like(params, {p: flat[p] for p in layout.masked}, ()) if ste else ()
        return PruneState(
            inner=tx.init(params), masks=masks, count=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(jax.random.key(seed)),
            hyperparams={"sparsity": jnp.float32(options.sparsity)}, dense=dense)

    def update(updates, state: PruneState, params=None, **extra):
        if params is None:
            raise ValueError("prune.wrap needs params in update(updates, state, params)")
        layout = make_layout(params, options, skip, groups)
        # STE: the dense weights stand in for the pruned ones wherever there is a mask.
        current = _like(params, {**_by_path(params), **_by_path(state.dense)}, None) if ste \
            else params
        inner_updates, inner = tx.update(updates, state.inner, current, **extra)
        candidate = optax.apply_updates(current, inner_updates)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.count)
        sparsity = schedule.sparsity_at(options, state.count, state.hyperparams["sparsity"])
        old = _by_path(state.masks)

        def recompute():
            weights = _by_path(candidate)
            if options.method not in ("ste", "set", "rigl"):
                # What is pruned stays pruned: it scores 0, below every kept weight.
                weights = {p: jnp.where(old[p], w, 0) if p in old else w
                           for p, w in weights.items()}
            new = compute_masks(options, layout, weights, _by_path(updates), old,
                                sparsity, key, state.count)
            return {p: new.get(p, old[p]) for p in layout.masked}

        changed = when_any_member(schedule.due(options, state.count), recompute,
                                  lambda: {p: old[p] for p in layout.masked})
        masks = _like(params, changed, jnp.ones((), bool))
        if options.method in ("set", "rigl"):
            inner = _regrown_afresh(tx, inner, masks, state.masks)
        if ste:
            new_updates = jax.tree.map(
                lambda m, c, p: jnp.where(m, c - p, -p), masks, candidate, params)
            dense = _like(params, {p: _by_path(candidate)[p] for p in layout.masked}, ())
        else:
            # A weight kept before and after keeps its update; a pruned one goes to exactly 0
            # (p + (-p)), and one regrown by SET / RigL starts at 0 (its value was 0).
            new_updates = jax.tree.map(
                lambda m, o, u, p: jnp.where(m & o, u, -p), masks, state.masks, inner_updates,
                params)
            dense = ()
        return new_updates, PruneState(inner=inner, masks=masks, count=state.count + 1,
                                       rng=state.rng, hyperparams=state.hyperparams, dense=dense)

    return optax.GradientTransformationExtraArgs(init, update)


def _regrown_afresh(tx, inner: Any, masks: Any, old_masks: Any) -> Any:
    """`inner` with the entries of newly grown weights zeroed in every parameter-shaped part."""
    grown = jax.tree.map(lambda new, old: new & ~old, masks, old_masks)
    try:
        return optax.tree_utils.tree_map_params(
            tx, lambda value, new: jnp.where(new, jnp.zeros_like(value), value), inner, grown)
    except (TypeError, ValueError) as error:
        raise UserError(f"prune: SET / RigL reset the optimizer state of regrown weights and "
                        f"cannot find the parameter-shaped parts of this optimizer's state "
                        f"({type(error).__name__}: {str(error).splitlines()[0]})") from None


def find_state(opt_state: Any) -> PruneState | None:
    """The pruning state inside an optimizer state (None if there is none)."""
    for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState)):
        if isinstance(leaf, PruneState):
            return leaf
    return None
