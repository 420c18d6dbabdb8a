"""Surgery: a structurally pruned registry model becomes a smaller dense model of its family.

Masks alone buy no speed: a pruned model is as big and as slow as before. Here every channel
whose group members (`groups.py`) are all exactly zero is cut out: its slices in the producing
layers, the BatchNorm statistics that go with them, and the input rows of the layers that read
it (after a flatten, one row per position). The model rebuilds itself with per-layer widths
(`models.channels.ChannelModel`), seams and all, and computes in inference mode what the
masked model did, up to float rounding.

A removed channel contributes exactly nothing in the masked model: a zero kernel column and
bias give a zero pre-activation, ReLU/GELU keep it 0, a zero BatchNorm scale and shift give 0
whatever the statistics, and a head with zero q, k and v adds a zero value vector. So cutting it
changes only the float summation order.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import linen as nn

from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.prune.groups import Wiring, wiring

_COLLECTIONS = ("params", "batch_stats")


def _kept(w: Wiring, params: dict) -> np.ndarray:
    """Indices of the group's channels that are still there (some member slice is nonzero)."""
    alive = np.zeros(w.group.size, bool)
    for p, axis in w.group.members:
        leaf = np.moveaxis(np.asarray(params[p]), axis, 0).reshape(w.group.size, -1)
        alive |= np.any(leaf != 0, axis=1)
    return np.flatnonzero(alive)


def shrink(model: nn.Module, variables: dict) -> tuple[nn.Module, dict]:
    """The smaller model without the pruned channels of `model`, and its variables.

    Args:
      model: a registry mlp, cnn1d, cnn2d, resnet or vit (with any seams: they are kept), or
        any module describing its channels (`models.channels.ChannelModel`).
      variables: its collections, {"params": ..., "batch_stats": ...}, pruned by channels.
    Returns:
      (model with per-layer widths, its variables as host arrays); in inference mode its
      outputs equal `model`'s on `variables`.
    Raises:
      UserError: a model or a collection surgery does not know, or a change of widths that
        would change the architecture; the message names the layer.
    """
    unknown = sorted(set(variables) - set(_COLLECTIONS))
    if unknown:
        raise UserError(f"shrink: collection {unknown[0]!r} is not one surgery knows (allowed: "
                        f"{', '.join(_COLLECTIONS)}); shrink the float model, then quantize")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    flat = {jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in leaves}
    params = {p[len("['params']"):]: leaf for p, leaf in flat.items() if p.startswith("['params']")}
    wirings = wiring(model, variables["params"])  # the model describes itself, or this raises
    per_layer = model.layer_widths()  # fields left at a default (an int for all convs) spelled out
    widths: dict[str, list[int]] = {}
    for w in wirings:
        keep = _kept(w, params)
        if not keep.size:
            raise UserError(f"shrink: every channel of {w.group.name} is pruned; surgery would "
                            "remove the layer (the pruner keeps at least one per group)")
        field, entries = w.width
        widths.setdefault(field, list(per_layer[field]))
        for entry in entries:
            widths[field][entry] = int(keep.size)
        _cut(flat, w, keep)
    # The model rebuilds itself: it refuses widths that would change more than the widths.
    smaller = model.with_layer_widths(**{field: tuple(values) for field, values in widths.items()})
    return smaller, jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)]
                                                           for p, _ in leaves])


def _cut(flat: dict[str, np.ndarray], w: Wiring, keep: np.ndarray) -> None:
    """Keeps channels `keep` of the group in `flat` (keystr paths of all collections)."""
    for p, axis in w.group.members:
        flat[f"['params']{p}"] = _take(flat[f"['params']{p}"], keep, axis, w.group.size)
        if p.endswith("['scale']"):  # a BatchNorm: its running statistics go with it
            module = p.removesuffix("['scale']")
            for stat in ("mean", "var"):
                key = f"['batch_stats']{module}['{stat}']"
                if key in flat:
                    flat[key] = _take(flat[key], keep, axis, w.group.size)
    for p, axis in w.consumers:
        flat[f"['params']{p}"] = _take(flat[f"['params']{p}"], keep, axis, w.group.size)


def _take(leaf: np.ndarray, keep: np.ndarray, axis: int, size: int) -> np.ndarray:
    """`leaf` with channels `keep` of `size` along `axis`; an axis k·size long is k positions of
    `size` channels (what flattening [..., positions, channels] gives), each cut alike."""
    moved = np.moveaxis(leaf, axis, 0)
    rest = moved.shape[1:]
    positions = moved.shape[0] // size
    cut = moved.reshape(positions, size, *rest)[:, keep].reshape(positions * keep.size, *rest)
    return np.moveaxis(cut, 0, axis)
