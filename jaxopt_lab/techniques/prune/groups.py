"""Which parameters share a channel: what structured pruning removes together.

A channel (a Dense neuron, a conv filter, an attention head) lives in several arrays at once
(`models.channels` lists them). Zeroing all of them removes the channel exactly (its output is 0
wherever it is read), so the masked model computes what the shrunk one will (`prune.shrink`). The
layers that read the channel need no zeroing (they multiply zeros): surgery removes their input
rows.

Registry models describe their own groups (`models.channels.ChannelModel`): only a model knows
how it calls its layers, so no table of model classes lives here. Any other module gets a generic
reading: every layer with a `kernel`, except the one writing the outputs, is a group of its
kernel's last axis and its bias. That is right for plain stacks of Dense/Conv layers; a model
with BatchNorm, residual additions or attention needs its own groups passed to the pruner
(`ChannelGroup`s), or to describe itself, since a generic reading cannot see which layers share a
channel there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxopt_lab.core.layers import layers_in_call_order, param_paths
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import MODELS
from jaxopt_lab.models.channels import ChannelGroup, ChannelModel, Slice, Wiring, param_path

# ChannelGroup, Slice and Wiring live with the models that describe them; importers of this
# module keep their names.
__all__ = ["ChannelGroup", "Slice", "Wiring", "channel_groups", "wiring"]


def channel_groups(model, params, sample_x=None) -> list[ChannelGroup]:
    """The channel groups of `model` (a registry model, or any linen module read generically).

    The layer writing the outputs is never a group (removing it would remove a class). For a
    module of your own, it is the layer called last (traced on `sample_x`, a batch of inputs,
    where given), else the only layer whose kernel is `num_classes` wide.

    Raises:
      UserError: a model that refuses channel pruning (transformer_lm), or no way to tell the
        output layer apart.
    """
    refusal = getattr(type(model), "CHANNEL_PRUNING_REFUSED", None)
    if refusal:
        raise UserError(refusal)
    if isinstance(model, ChannelModel):
        return [w.group for w in wiring(model, params)]
    return _generic(model, params, sample_x)


def wiring(model, params) -> list[Wiring]:
    """Every channel group of a model describing itself, with its consumers and width field,
    sized from `params`."""
    if not isinstance(model, ChannelModel):
        known = dict.fromkeys(cls.__name__ for cls in MODELS.values()
                              if issubclass(cls, ChannelModel))
        raise UserError(f"{type(model).__name__} is not a model surgery knows; allowed: the "
                        f"registry's {', '.join(known)}")
    shapes = {p: leaf.shape for p, leaf in zip(param_paths(params), jax.tree.leaves(params),
                                                strict=True)}
    return [_checked(shapes, w) for w in model.channel_wiring()]


def _checked(shapes: dict[str, tuple], w: Wiring) -> Wiring:
    """`w` with its size read from the parameters, every slice checked against them."""
    size = None
    for p, axis in w.group.members:
        if p not in shapes or axis >= len(shapes[p]):
            raise UserError(f"{w.group.name}: the parameters have no {p} (axis {axis}): they "
                            "do not belong to this model")
        if size not in (None, shapes[p][axis]):
            raise UserError(f"{w.group.name}: {p} has {shapes[p][axis]} channels, another "
                            f"member {size}: the parameters do not belong to this model")
        size = shapes[p][axis]
    for p, axis in w.consumers:
        if p not in shapes or axis >= len(shapes[p]) or shapes[p][axis] % size:
            raise UserError(f"{w.group.name}: {p} does not read its {size} channels: the "
                            "parameters do not belong to this model")
    return dataclasses.replace(w, group=dataclasses.replace(w.group, size=size))


def _generic(model, params, sample_x) -> list[ChannelGroup]:
    """Every layer owning a `kernel` but the output layer: its kernel's last axis and its bias."""
    paths = param_paths(params)
    shapes = dict(zip(paths, (leaf.shape for leaf in jax.tree.leaves(params)), strict=True))
    layers = [p[:-len("['kernel']")] for p in paths if p.endswith("['kernel']")]
    output = _output_layer(model, params, layers, shapes, sample_x)
    groups = []
    for layer in layers:
        if layer == output:
            continue
        size = shapes[f"{layer}['kernel']"][-1]
        members = [(f"{layer}['kernel']", len(shapes[f"{layer}['kernel']"]) - 1)]
        if shapes.get(f"{layer}['bias']") == (size,):
            members.append((f"{layer}['bias']", 0))
        name = "/".join(layer[2:-2].split("']['"))
        groups.append(ChannelGroup(name, tuple(members), size))
    return groups


def _output_layer(model, params, layers: list[str], shapes: dict, sample_x: Any) -> str | None:
    """The layer writing the outputs: last in call order, or the only one num_classes wide."""
    if sample_x is not None:
        variables = jax.eval_shape(model.init, jax.random.key(0), sample_x)
        variables = {**variables, "params": params}
        called = layers_in_call_order(model, variables, sample_x)
        return param_path(*called[-1].split("/")) if called else None
    width = getattr(model, "num_classes", None)
    wide = [layer for layer in layers if shapes[f"{layer}['kernel']"][-1] == width]
    if len(wide) != 1:
        found = f"{len(wide)} layers are" if width is not None else "the module has no"
        raise UserError(f"channel groups of {type(model).__name__}: {found} num_classes wide, so "
                        "the output layer is unclear; pass sample_x (a batch of inputs)")
    return wide[0]
