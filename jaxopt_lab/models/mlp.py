"""The MNIST-1D paper's MLP (40 → 100 → 100 → 10, ReLU, a skip around the second layer; 68 %)."""

from typing import Any

import jax
from flax import linen as nn

from jaxopt_lab.models.pytorch_init import pytorch_init


class MLP(nn.Module):
    """Flatten, `hidden` ReLU layers, then a Dense layer to the logits.

    With `residual`, a hidden layer as wide as its input adds its input back (`h + relu(W h)`),
    as the paper's `MLPBase` does around its second layer (`configs/mnist1d_mlp.py` turns it on).
    Greydanus & Kobak, "Scaling down deep learning with MNIST-1D" (2020 / ICML 2024); torch init.
    """

    num_classes: int
    hidden: tuple[int, ...] = (100, 100)
    residual: bool = False
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None  # no convs; kept so every model takes the same seams

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm
        x = x.reshape(x.shape[0], -1)
        for i, features in enumerate(self.hidden):
            h = nn.relu(self._dense(features, x))
            x = x + h if self.residual and i and features == x.shape[-1] else h
        return self._dense(self.num_classes, x)

    def _dense(self, features: int, x: jax.Array) -> jax.Array:
        return nn.Dense(
            features, dot_general_cls=self.dot_general_cls, **pytorch_init(x.shape[-1])
        )(x)
