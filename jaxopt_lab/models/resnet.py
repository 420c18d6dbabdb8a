"""A CIFAR-style ResNet (He et al., "Deep Residual Learning for Image Recognition", 2016, §4.2).

Three stages of basic blocks at `width`, 2·`width` and 4·`width` channels, the last two starting
with stride 2; depth = 6n + 2 (20 → 3 blocks per stage). Meant for throughput work, so it also
runs on tiny inputs (8×8 → 8, 4, 2 spatially). `stage_widths` and `inner_widths` override the
widths per stage and per block: a channel-pruned ResNet shrunk by `prune.shrink` has uneven ones.
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
    """Two 3×3 conv-BN layers and a shortcut; a 1×1 conv-BN projection where the shape changes.

    `inner_features` is the first conv's width, `features` the second's (the residual stream's).
    """

    features: int
    strides: int
    conv_general_dilated_cls: Any
    inner_features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(_Conv, conv_general_dilated_cls=self.conv_general_dilated_cls)
        norm = functools.partial(_BatchNorm, use_running_average=not train)
        y = nn.relu(norm()(conv(self.inner_features, (3, 3), self.strides)(x)))
        y = norm()(conv(self.features, (3, 3))(y))
        # Decided by the block's arguments, not by whether shapes happen to match, so a shrunk
        # stage as wide as the one before still has the projection its parameters hold.
        if self.strides != 1 or x.shape[-1] != self.features:
            x = norm()(conv(self.features, (1, 1), self.strides)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """3×3 conv-BN-ReLU stem → 3 stages of (depth - 2) / 6 basic blocks → global mean → Dense.

    BatchNorm statistics live in the `batch_stats` collection and update when `train` is True.
    Input is [B, H, W] or [B, H, W, C].

    `stage_widths`: the residual width of each stage (the stem's is the first); () = `width`·(1,
    2, 4). `inner_widths`: each block's first-conv width, one per block; () = its stage's width.
    """

    num_classes: int
    depth: int = 20
    width: int = 16
    stage_widths: tuple[int, ...] = ()
    inner_widths: tuple[int, ...] = ()
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None

    def __post_init__(self) -> None:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise UserError(
                f"model.depth={self.depth} is not a CIFAR ResNet depth; allowed: 6n + 2 with n ≥ 1 "
                "(8, 14, 20, 32, 44, 56, 110, …)"
            )
        if self.stage_widths and len(self.stage_widths) != 3:
            raise UserError(f"model.stage_widths={self.stage_widths!r} needs 3 widths (one per "
                            "stage) or () for width·(1, 2, 4)")
        blocks = 3 * self.blocks_per_stage
        if self.inner_widths and len(self.inner_widths) != blocks:
            raise UserError(f"model.inner_widths={self.inner_widths!r} needs {blocks} widths for "
                            f"depth {self.depth} (one per block) or () for the stage widths")
        super().__post_init__()

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6

    @property
    def widths_per_stage(self) -> tuple[int, ...]:
        """The residual width of each stage."""
        return self.stage_widths or tuple(self.width * 2**stage for stage in range(3))

    @property
    def inner_widths_per_block(self) -> tuple[int, ...]:
        """The first-conv width of each block, in call order."""
        return self.inner_widths or tuple(
            w for w in self.widths_per_stage for _ in range(self.blocks_per_stage))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        stages = self.widths_per_stage
        x = _Conv(stages[0], (3, 3), conv_general_dilated_cls=self.conv_general_dilated_cls)(x)
        x = nn.relu(_BatchNorm(use_running_average=not train)(x))
        inner = iter(self.inner_widths_per_block)
        for stage, features in enumerate(stages):
            for block in range(self.blocks_per_stage):
                x = _BasicBlock(
                    features,
                    strides=2 if stage and not block else 1,
                    conv_general_dilated_cls=self.conv_general_dilated_cls,
                    inner_features=next(inner),
                )(x, train)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls)(x)
