"""The MNIST-1D paper's 1-D CNN (three strided convs of 25 channels, then Dense; 94 % in the paper)."""

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxopt_lab.errors import UserError
from jaxopt_lab.models.channels import Wiring, conv_stack_wiring
from jaxopt_lab.models.pytorch_init import pytorch_init
from jaxopt_lab.models.remat import checkpointed

# (kernel, stride, padding) of the paper's three Conv1d layers; a length-40 signal ends at length 5.
_CONVS = ((5, 2, 1), (3, 2, 1), (3, 2, 1))


def _conv(module: "CNN1D", x: jax.Array, channels: int, kernel: int, stride: int,
          padding: int) -> jax.Array:
    """Conv → ReLU, the block `remat` recomputes."""
    return nn.relu(nn.Conv(channels, (kernel,), strides=stride, padding=padding,
                           conv_general_dilated_cls=module.conv_general_dilated_cls,
                           dtype=module.dtype, **pytorch_init(x.shape[-1] * kernel))(x))


class CNN1D(nn.Module):
    """Conv1d(k5,s2,p1) → ReLU → 2 × [Conv1d(k3,s2,p1) → ReLU] → flatten → Dense.

    Greydanus & Kobak, "Scaling down deep learning with MNIST-1D" (2020 / ICML 2024): the paper's
    `ConvBase`, with torch init, so its parameter count (5,210 for 10 classes) matches exactly.
    `channels` is one width for all three convs, or a tuple of three (a channel-pruned model
    shrunk by `prune.shrink` has uneven widths). Input is [B, L] (a channel axis is added) or
    [B, L, C].
    """

    num_classes: int
    channels: int | tuple[int, ...] = 25
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32
    remat: str = "none"  # see models/remat.py: each conv is a block
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None

    WIDTH_KEYS: ClassVar[tuple[str, ...]] = ("channels",)  # what a half-width student halves

    def __post_init__(self) -> None:
        if isinstance(self.channels, tuple) and len(self.channels) != len(_CONVS):
            raise UserError(f"model.channels={self.channels!r} needs one width per conv; "
                            f"allowed: an int or a tuple of {len(_CONVS)}")
        super().__post_init__()

    @property
    def channels_per_conv(self) -> tuple[int, ...]:
        """The width of each conv."""
        if isinstance(self.channels, tuple):
            return self.channels
        return (self.channels,) * len(_CONVS)

    @nn.nowrap
    def channel_wiring(self) -> tuple[Wiring, ...]:
        """Each conv's filters (`models.channels.ChannelModel`), read by the next conv or, after
        the flatten, by the Dense layer."""
        return conv_stack_wiring(len(self.channels_per_conv), "channels", spatial=1)

    @nn.nowrap
    def layer_widths(self) -> dict[str, tuple[int, ...]]:
        return {"channels": self.channels_per_conv}

    @nn.nowrap
    def with_layer_widths(self, **widths: tuple[int, ...]) -> "CNN1D":
        return self.clone(**widths)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm
        if x.ndim == 2:
            x = x[..., None]
        conv = checkpointed(_conv, self.remat, static_argnums=(2, 3, 4, 5))
        for channels, (kernel, stride, padding) in zip(self.channels_per_conv, _CONVS, strict=True):
            x = conv(self, x, channels, kernel, stride, padding)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls, dtype=self.dtype,
                        **pytorch_init(x.shape[-1]))(x)
