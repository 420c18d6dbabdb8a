"""Multinomial logistic regression: the linear floor of the MNIST-1D benchmark (32 % in the paper)."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxopt_lab.models.pytorch_init import pytorch_init
from jaxopt_lab.models.remat import checkpointed


def _linear(module: "LogReg", x: jax.Array) -> jax.Array:
    return nn.Dense(module.num_classes, dot_general_cls=module.dot_general_cls,
                    dtype=module.dtype, **pytorch_init(x.shape[-1]))(x)


class LogReg(nn.Module):
    """Flatten, then one Dense layer to the logits (its one block for `remat`).

    Greydanus & Kobak, "Scaling down deep learning with MNIST-1D" (2020 / ICML 2024); torch init.
    """

    num_classes: int
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32
    remat: str = "none"  # see models/remat.py
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None  # no convs; kept so every model takes the same seams

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm
        return checkpointed(_linear, self.remat)(self, x.reshape(x.shape[0], -1))
