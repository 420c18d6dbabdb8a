"""The MNIST-1D paper's MLP (40 → 100 → 100 → 10, ReLU, a skip around the second layer; 68 %)."""

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxopt_lab.errors import UserError
from jaxopt_lab.models.channels import Wiring, layer_slices, param_path, wire
from jaxopt_lab.models.pytorch_init import pytorch_init
from jaxopt_lab.models.remat import checkpointed


def _dense(module: "MLP", features: int, x: jax.Array) -> jax.Array:
    return nn.Dense(features, dot_general_cls=module.dot_general_cls, dtype=module.dtype,
                    **pytorch_init(x.shape[-1]))(x)


def _hidden(module: "MLP", x: jax.Array, features: int, residual: bool) -> jax.Array:
    """One hidden layer, the block `remat` recomputes."""
    h = nn.relu(_dense(module, features, x))
    return x + h if residual else h


class MLP(nn.Module):
    """Flatten, `hidden` ReLU layers, then a Dense layer to the logits.

    With `residual`, a hidden layer as wide as its input adds its input back (`h + relu(W h)`),
    as the paper's `MLPBase` does around its second layer (`configs/mnist1d_mlp.py` turns it on).
    Greydanus & Kobak, "Scaling down deep learning with MNIST-1D" (2020 / ICML 2024); torch init.
    """

    num_classes: int
    hidden: tuple[int, ...] = (100, 100)
    residual: bool = False
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32
    remat: str = "none"  # see models/remat.py: each hidden layer is a block
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None  # no convs; kept so every model takes the same seams

    WIDTH_KEYS: ClassVar[tuple[str, ...]] = ("hidden",)  # what a half-width student halves

    @nn.nowrap
    def channel_wiring(self) -> tuple[Wiring, ...]:
        """Each hidden layer's neurons (`models.channels.ChannelModel`); with `residual`,
        layers adding to their input share the stream's neurons with the layer that started it."""
        chains: list[list[int]] = []
        for i, features in enumerate(self.hidden):
            if self.residual and i and features == self.hidden[i - 1]:
                chains[-1].append(i)
            else:
                chains.append([i])
        out = []
        for chain in chains:
            name = " + ".join(f"Dense_{i}" for i in chain) + (
                " (residual)" if len(chain) > 1 else "")
            out.append(wire(name, [s for i in chain for s in layer_slices(f"Dense_{i}", axis=1)],
                            [(param_path(f"Dense_{i + 1}", "kernel"), 0) for i in chain],
                            "hidden", chain))
        return tuple(out)

    @nn.nowrap
    def layer_widths(self) -> dict[str, tuple[int, ...]]:
        return {"hidden": self.hidden}

    @nn.nowrap
    def with_layer_widths(self, **widths: tuple[int, ...]) -> "MLP":
        """The MLP at `widths`, refused where a layer would gain a skip: one is added wherever a
        layer is as wide as its input, so layers pruned to the width of the one before would get
        one (a residual chain shrinks as one group, so none is lost)."""
        smaller = self.clone(**widths)
        for i in range(1, len(self.hidden)):
            if (self.residual and self.hidden[i] != self.hidden[i - 1]
                    and smaller.hidden[i] == smaller.hidden[i - 1]):
                raise UserError(f"shrink: layer Dense_{i} would gain a residual connection at "
                                f"its pruned width {smaller.hidden[i]} (residual=True adds one "
                                "wherever a layer is as wide as its input); surgery refused")
        return smaller

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm
        x = x.reshape(x.shape[0], -1)
        hidden = checkpointed(_hidden, self.remat, static_argnums=(2, 3))
        for i, features in enumerate(self.hidden):
            x = hidden(self, x, features, self.residual and i > 0 and features == x.shape[-1])
        return _dense(self, self.num_classes, x)
