"""How a registry model says which of its parameters share a channel, and how it is rebuilt at
other widths: the description structured pruning, surgery and width search read.

A channel (a Dense neuron, a conv filter, an attention head) lives in several arrays at once: the
kernel that produces it, that kernel's bias, the BatchNorm scale and shift right after it, and, in
a ResNet, every other layer writing to the same residual stream. Only the model knows this from
how it calls its layers, so each registry model describes itself (`ChannelModel`) and the
techniques (`techniques.prune.groups`, `prune.shrink`, `tune.nas`) read that description instead
of keeping a table of model classes. These are plain data types so that models need import no
technique.

Lingo in this file:
  slice     (parameter path as `jax.tree_util.keystr` prints it, axis holding the channels).
  members   the slices of the layers writing a channel; zeroing them all removes it.
  consumers the input axes of the layers reading it; surgery cuts their rows, pruning leaves them.
  width     (model field, entries): the hyperparameter entries counting the group's channels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol, Self, runtime_checkable

Slice = tuple[str, int]  # (parameter path as jax.tree_util.keystr prints it, axis of the channel)


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together: channel i is slice i along `axis` of every member."""

    name: str  # readable: "Conv_1", "stage 1 residual", "TransformerBlock_0 heads"
    members: tuple[Slice, ...]  # producing kernels' output axes, their biases, BatchNorm after
    size: int  # number of channels (heads for attention); 0 in a model's own description


@dataclasses.dataclass(frozen=True)
class Wiring:
    """A registry model's group and what surgery needs besides: who reads the channels and
    which width hyperparameter counts them."""

    group: ChannelGroup
    # Input axes of the layers reading the channels. An axis `size`·k long (a Dense after a
    # flatten of [..., k positions, size channels]) holds the channel at every k-th place.
    consumers: tuple[Slice, ...]
    width: tuple[str, tuple[int, ...]]  # (model field, its entries equal to the group's size)


@runtime_checkable
class ChannelModel(Protocol):
    """A model that describes its channels, so that it can be channel-pruned and shrunk.

    The registry's MLP, CNN1D, CNN2D, ResNet and ViT implement it; a module of your own may too
    (then it is pruned and shrunk as they are, not read as a plain Dense/Conv stack). The sizes
    are left 0 here: `techniques.prune.groups.wiring` reads them from the parameters, which also
    checks that the parameters belong to the model.

    A model that must be neither described nor read as a plain stack (the generic reading would
    be wrong for it) says why in a class attribute `CHANNEL_PRUNING_REFUSED: ClassVar[str]`, the
    message channel pruning raises (transformer_lm).
    """

    def channel_wiring(self) -> tuple[Wiring, ...]:
        """Every channel group, in a fixed order (width search indexes widths by it)."""
        ...

    def layer_widths(self) -> dict[str, tuple[int, ...]]:
        """For every field a `Wiring.width` names, the width of each of its entries (a field
        left at its default, e.g. one int for all convs, spelled out per layer)."""
        ...

    def with_layer_widths(self, **widths: tuple[int, ...]) -> Self:
        """The same model with these fields set per layer (`layer_widths`' form).

        Raises:
          UserError: widths that would change the architecture beyond the widths.
        """
        ...


def param_path(*keys: str) -> str:
    """"['Block_0']['Dense_1']['kernel']" from its keys: how slices name parameters."""
    return "".join(f"['{key}']" for key in keys)


def layer_slices(*keys: str, axis: int, bias: bool = True) -> tuple[Slice, ...]:
    """A producing layer's slices: its kernel's output `axis` and its bias."""
    kernel = ((param_path(*keys, "kernel"), axis),)
    return kernel + (((param_path(*keys, "bias"), 0),) if bias else ())


def norm_slices(*keys: str) -> tuple[Slice, ...]:
    """A BatchNorm's slices: its scale and shift (surgery moves its statistics with them)."""
    return (param_path(*keys, "scale"), 0), (param_path(*keys, "bias"), 0)


def wire(name: str, members: Iterable[Slice], consumers: Iterable[Slice], field: str,
         entries: Iterable[int]) -> Wiring:
    """A `Wiring` of size 0 (read from the parameters later): the models' shorthand."""
    return Wiring(ChannelGroup(name, tuple(members), 0), tuple(consumers),
                  (field, tuple(entries)))


def conv_stack_wiring(count: int, field: str, spatial: int) -> tuple[Wiring, ...]:
    """A plain stack of `count` convs (kernels of `spatial` + 2 axes, each its own group, entry
    i of `field`) read in turn, the last one by a Dense after a flatten: CNN1D and CNN2D."""
    out = []
    for i in range(count):
        reader = (param_path(f"Conv_{i + 1}", "kernel"), spatial) if i + 1 < count else (
            param_path("Dense_0", "kernel"), 0)
        out.append(wire(f"Conv_{i}", layer_slices(f"Conv_{i}", axis=spatial + 1), [reader],
                        field, [i]))
    return tuple(out)
