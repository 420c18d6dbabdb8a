"""The MNIST-1D paper's MLP (40 → 100 → 100 → 10, ReLU, a skip around the second layer; 68 %)."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm
        x = x.reshape(x.shape[0], -1)
        hidden = checkpointed(_hidden, self.remat, static_argnums=(2, 3))
        for i, features in enumerate(self.hidden):
            x = hidden(self, x, features, self.residual and i > 0 and features == x.shape[-1])
        return _dense(self, self.num_classes, x)
