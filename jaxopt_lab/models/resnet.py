"""A CIFAR-style ResNet (He et al., "Deep Residual Learning for Image Recognition", 2016, §4.2).

Three stages of basic blocks at `width`, 2·`width` and 4·`width` channels, the last two starting
with stride 2; depth = 6n + 2 (20 → 3 blocks per stage). Meant for throughput work, so it also
runs on tiny inputs (8×8 → 8, 4, 2 spatially).
"""

import functools
from typing import Any

import jax
from flax import linen as nn

from jaxopt_lab.errors import UserError

# BatchNorm's shift makes a conv bias redundant; He init suits the ReLUs that follow.
_Conv = functools.partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.he_normal())
# torch's BatchNorm2d constants, the ones CIFAR ResNet recipes were tuned with.
_BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class _BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers and a shortcut; a 1×1 conv-BN projection where the shape changes."""

    features: int
    strides: int
    conv_general_dilated_cls: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(
            _Conv, self.features, conv_general_dilated_cls=self.conv_general_dilated_cls
        )
        norm = functools.partial(_BatchNorm, use_running_average=not train)
        y = nn.relu(norm()(conv((3, 3), self.strides)(x)))
        y = norm()(conv((3, 3))(y))
        if x.shape != y.shape:
            x = norm()(conv((1, 1), self.strides)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """3×3 conv-BN-ReLU stem → 3 stages of (depth - 2) / 6 basic blocks → global mean → Dense.

    BatchNorm statistics live in the `batch_stats` collection and update when `train` is True.
    Input is [B, H, W] or [B, H, W, C].
    """

    num_classes: int
    depth: int = 20
    width: int = 16
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None

    def __post_init__(self) -> None:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise UserError(
                f"model.depth={self.depth} is not a CIFAR ResNet depth; allowed: 6n + 2 with n ≥ 1 "
                "(8, 14, 20, 32, 44, 56, 110, …)"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        x = _Conv(self.width, (3, 3), conv_general_dilated_cls=self.conv_general_dilated_cls)(x)
        x = nn.relu(_BatchNorm(use_running_average=not train)(x))
        blocks_per_stage = (self.depth - 2) // 6
        for stage in range(3):
            for block in range(blocks_per_stage):
                x = _BasicBlock(
                    self.width * 2**stage,
                    strides=2 if stage and not block else 1,
                    conv_general_dilated_cls=self.conv_general_dilated_cls,
                )(x, train)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls)(x)
