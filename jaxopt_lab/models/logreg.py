"""Multinomial logistic regression: the linear floor of the MNIST-1D benchmark (32 % in the paper)."""

from typing import Any

import jax
from flax import linen as nn

from jaxopt_lab.models.pytorch_init import pytorch_init


class LogReg(nn.Module):
    """Flatten, then one Dense layer to the logits.

    Greydanus & Kobak, "Scaling down deep learning with MNIST-1D" (2020 / ICML 2024); torch init.
    """

    num_classes: int
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None  # no convs; kept so every model takes the same seams

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(
            self.num_classes, dot_general_cls=self.dot_general_cls, **pytorch_init(x.shape[-1])
        )(x)
