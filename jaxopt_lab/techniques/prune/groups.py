"""Which parameters share a channel: what structured pruning removes together.

A channel (a Dense neuron, a conv filter, an attention head) lives in several arrays at once: the
kernel that produces it, that kernel's bias, the BatchNorm scale and shift right after it, and, in
a ResNet, every other layer writing to the same residual stream. Zeroing all of them removes the
channel exactly (its output is 0 wherever it is read), so the masked model computes what the
shrunk one will (`prune.shrink`). The layers that read the channel need no zeroing (they multiply
zeros): surgery removes their input rows.

Registry models are wired by hand here, from how each one calls its layers. Any other module gets
a generic reading: every layer with a `kernel`, except the one writing the outputs, is a group of
its kernel's last axis and its bias. That is right for plain stacks of Dense/Conv layers; a model
with BatchNorm, residual additions or attention needs its own groups passed to the pruner
(`ChannelGroup`s), since a generic reading cannot see which layers share a channel there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxopt_lab.core.layers import layers_in_call_order, param_paths
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import CNN1D, CNN2D, MLP, ResNet, TransformerLM, ViT

Slice = tuple[str, int]  # (parameter path as jax.tree_util.keystr prints it, axis of the channel)


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together: channel i is slice i along `axis` of every member."""

    name: str  # readable: "Conv_1", "stage 1 residual", "TransformerBlock_0 heads"
    members: tuple[Slice, ...]  # producing kernels' output axes, their biases, BatchNorm after
    size: int  # number of channels (heads for attention)


@dataclasses.dataclass(frozen=True)
class Wiring:
    """A registry model's group and what surgery needs besides: who reads the channels and
    which width hyperparameter counts them."""

    group: ChannelGroup
    # Input axes of the layers reading the channels. An axis `size`·k long (a Dense after a
    # flatten of [..., k positions, size channels]) holds the channel at every k-th place.
    consumers: tuple[Slice, ...]
    width: tuple[str, tuple[int, ...]]  # (model field, its entries equal to the group's size)


def _path(*keys: str) -> str:
    """"['Block_0']['Dense_1']['kernel']" from its keys: how the members name parameters."""
    return "".join(f"['{key}']" for key in keys)


def channel_groups(model, params, sample_x=None) -> list[ChannelGroup]:
    """The channel groups of `model` (a registry model, or any linen module read generically).

    The layer writing the outputs is never a group (removing it would remove a class). For a
    module of your own, it is the layer called last (traced on `sample_x`, a batch of inputs,
    where given), else the only layer whose kernel is `num_classes` wide.

    Raises:
      UserError: transformer_lm (not supported), or no way to tell the output layer apart.
    """
    if isinstance(model, TransformerLM):
        raise UserError("structured pruning of transformer_lm is not supported; use an "
                        "unstructured or N:M pattern")
    if type(model) in _FAMILIES:
        return [w.group for w in wiring(model, params)]
    return _generic(model, params, sample_x)


def wiring(model, params) -> list[Wiring]:
    """Every channel group of a registry model with its consumers and width field."""
    family = _FAMILIES.get(type(model))
    if family is None:
        raise UserError(f"{type(model).__name__} is not a model surgery knows; allowed: the "
                        f"registry's {', '.join(cls.__name__ for cls in _FAMILIES)}")
    shapes = {p: leaf.shape for p, leaf in zip(param_paths(params), jax.tree.leaves(params),
                                                strict=True)}
    return [_checked(shapes, w) for w in family(model)]


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


def _layer(*keys: str, axis: int, bias: bool = True) -> tuple[Slice, ...]:
    """A producing layer's slices: its kernel's output `axis` and its bias."""
    return ((_path(*keys, "kernel"), axis),) + (((_path(*keys, "bias"), 0),) if bias else ())


def _norm(*keys: str) -> tuple[Slice, ...]:
    return (_path(*keys, "scale"), 0), (_path(*keys, "bias"), 0)


def _wire(name: str, members, consumers, field: str, entries) -> Wiring:
    return Wiring(ChannelGroup(name, tuple(members), 0), tuple(consumers), (field, tuple(entries)))


def _mlp(model: MLP) -> list[Wiring]:
    """Each hidden layer's neurons; with `residual`, layers adding to their input share the
    stream's neurons with the layer that started it."""
    chains: list[list[int]] = []
    for i, features in enumerate(model.hidden):
        if model.residual and i and features == model.hidden[i - 1]:
            chains[-1].append(i)
        else:
            chains.append([i])
    out = []
    for chain in chains:
        name = " + ".join(f"Dense_{i}" for i in chain) + (" (residual)" if len(chain) > 1 else "")
        out.append(_wire(name, [s for i in chain for s in _layer(f"Dense_{i}", axis=1)],
                         [(_path(f"Dense_{i + 1}", "kernel"), 0) for i in chain], "hidden", chain))
    return out


def _convs(count: int, field: str, spatial: int) -> list[Wiring]:
    """A plain stack of `count` convs (kernels of `spatial` + 2 axes) and a Dense after a flatten."""
    out = []
    for i in range(count):
        reader = (_path(f"Conv_{i + 1}", "kernel"), spatial) if i + 1 < count else (
            _path("Dense_0", "kernel"), 0)
        out.append(_wire(f"Conv_{i}", _layer(f"Conv_{i}", axis=spatial + 1), [reader], field, [i]))
    return out


def _cnn1d(model: CNN1D) -> list[Wiring]:
    return _convs(len(model.channels_per_conv), "channels", 1)


def _cnn2d(model: CNN2D) -> list[Wiring]:
    return _convs(len(model.features), "features", 2)


def _resnet(model: ResNet) -> list[Wiring]:
    """One group per stage: the stem (stage 0) or the projection, and every block's second
    conv-BN, write the stage's residual stream. Each block's first conv-BN is a group of its own."""
    n = model.blocks_per_stage
    blocks = [f"_BasicBlock_{b}" for b in range(3 * n)]
    stages, inner = [], []
    for stage in range(3):
        own = blocks[stage * n:(stage + 1) * n]
        if stage:  # the projection starts the stream; the first block reads the stage before
            writers = [*_layer(own[0], "Conv_2", axis=3, bias=False), *_norm(own[0], "BatchNorm_2")]
        else:
            writers = [*_layer("Conv_0", axis=3, bias=False), *_norm("BatchNorm_0")]
        for b in own:
            writers += [*_layer(b, "Conv_1", axis=3, bias=False), *_norm(b, "BatchNorm_1")]
        readers = [(_path(b, "Conv_0", "kernel"), 2) for b in (own[1:] if stage else own)]
        if stage < 2:
            first = blocks[(stage + 1) * n]
            readers += [(_path(first, "Conv_0", "kernel"), 2), (_path(first, "Conv_2", "kernel"), 2)]
        else:
            readers.append((_path("Dense_0", "kernel"), 0))
        stages.append(_wire(f"stage {stage} residual", writers, readers, "stage_widths", [stage]))
    for i, b in enumerate(blocks):
        inner.append(_wire(f"{b} inner", [*_layer(b, "Conv_0", axis=3, bias=False),
                                          *_norm(b, "BatchNorm_0")],
                           [(_path(b, "Conv_1", "kernel"), 2)], "inner_widths", [i]))
    return stages + inner


def _vit(model: ViT) -> list[Wiring]:
    """Each block's attention heads (q, k, v and the out projection's rows of a head) and its
    MLP's hidden neurons."""
    out = []
    for i in range(model.depth):
        block, attention = f"TransformerBlock_{i}", "MultiHeadDotProductAttention_0"
        heads = [s for name in ("query", "key", "value")
                 for s in _layer(block, attention, name, axis=1)]
        heads.append((_path(block, attention, "out", "kernel"), 0))
        out.append(_wire(f"{block} heads", heads, [], "layer_heads", [i]))
        out.append(_wire(f"{block} Dense_0", _layer(block, "Dense_0", axis=1),
                         [(_path(block, "Dense_1", "kernel"), 0)], "layer_mlp_dims", [i]))
    return out


_FAMILIES = {MLP: _mlp, CNN1D: _cnn1d, CNN2D: _cnn2d, ResNet: _resnet, ViT: _vit}


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
        return _path(*called[-1].split("/")) if called else None
    width = getattr(model, "num_classes", None)
    wide = [layer for layer in layers if shapes[f"{layer}['kernel']"][-1] == width]
    if len(wide) != 1:
        found = f"{len(wide)} layers are" if width is not None else "the module has no"
        raise UserError(f"channel groups of {type(model).__name__}: {found} num_classes wide, so "
                        "the output layer is unclear; pass sample_x (a batch of inputs)")
    return wide[0]
