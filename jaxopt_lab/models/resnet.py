"""ResNets of basic blocks with a CIFAR stem (He et al., "Deep Residual Learning for Image
Recognition", 2016).

`ResNet` is the paper's CIFAR family (§4.2): three stages at `width`, 2·`width` and 4·`width`
channels, depth = 6n + 2 (20 → 3 blocks per stage). Meant for throughput work, so it also runs on
tiny inputs (8×8 → 8, 4, 2 spatially). `stage_widths` and `inner_widths` override the widths per
stage and per block: a channel-pruned ResNet shrunk by `prune.shrink` has uneven ones.

`ResNet18` is the ImageNet ResNet-18 (four stages of two basic blocks at 64, 128, 256 and 512
channels) with the same CIFAR stem, the usual shape for 32×32 images: a 3×3 stride-1 conv and no
max-pool in place of the 7×7 stride-2 conv and max-pool meant for 224×224 inputs.

Both start each stage after the first with a stride-2 block and end in a global mean and a Dense
layer; every basic block is one block for `remat`.
"""

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxopt_lab.errors import UserError
from jaxopt_lab.models.channels import Wiring, layer_slices, norm_slices, param_path, wire
from jaxopt_lab.models.remat import checkpointed

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
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(_Conv, conv_general_dilated_cls=self.conv_general_dilated_cls,
                                 dtype=self.dtype)
        norm = functools.partial(_BatchNorm, use_running_average=not train, dtype=self.dtype)
        y = nn.relu(norm()(conv(self.inner_features, (3, 3), self.strides)(x)))
        y = norm()(conv(self.features, (3, 3))(y))
        # Decided by the block's arguments, not by whether shapes happen to match, so a shrunk
        # stage as wide as the one before still has the projection its parameters hold.
        if self.strides != 1 or x.shape[-1] != self.features:
            x = norm()(conv(self.features, (1, 1), self.strides)(x))
        return nn.relu(x + y)


def _block(module: nn.Module, x: jax.Array, features: int, strides: int, inner: int,
           train: bool) -> jax.Array:
    return _BasicBlock(features, strides, module.conv_general_dilated_cls, inner,
                       dtype=module.dtype)(x, train)


def _forward(module: nn.Module, x: jax.Array, train: bool, stage_widths: tuple[int, ...],
             stage_sizes: tuple[int, ...], inner_widths: tuple[int, ...]) -> jax.Array:
    """3×3 conv-BN-ReLU stem → stages of basic blocks → global mean → Dense, in `module`'s
    scope (so both ResNets name their layers alike: Conv_0, BatchNorm_0, _BasicBlock_i, Dense_0)."""
    if x.ndim == 3:
        x = x[..., None]
    x = _Conv(stage_widths[0], (3, 3), conv_general_dilated_cls=module.conv_general_dilated_cls,
              dtype=module.dtype)(x)
    x = nn.relu(_BatchNorm(use_running_average=not train, dtype=module.dtype)(x))
    block = checkpointed(_block, module.remat, static_argnums=(2, 3, 4, 5))
    inner = iter(inner_widths)
    for stage, (features, blocks) in enumerate(zip(stage_widths, stage_sizes, strict=True)):
        for b in range(blocks):
            x = block(module, x, features, 2 if stage and not b else 1, next(inner), train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(module.num_classes, dot_general_cls=module.dot_general_cls,
                    dtype=module.dtype)(x)


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
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32
    remat: str = "none"  # see models/remat.py
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None

    WIDTH_KEYS: ClassVar[tuple[str, ...]] = ("width",)  # what a half-width student halves

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

    @nn.nowrap
    def channel_wiring(self) -> tuple[Wiring, ...]:
        """One group per stage, then one per block (`models.channels.ChannelModel`).

        The stem (stage 0) or the first block's projection, and every block's second conv-BN,
        write a stage's residual stream, so they share its channels; its readers are the blocks'
        first convs, the next stage's first block (both its convs) or the Dense layer. Each
        block's first conv-BN is a group of its own, read by its second conv.
        """
        n = self.blocks_per_stage
        blocks = [f"_BasicBlock_{b}" for b in range(3 * n)]
        stages = []
        for stage in range(3):
            own = blocks[stage * n:(stage + 1) * n]
            if stage:  # the projection starts the stream; the first block reads the stage before
                writers = [*layer_slices(own[0], "Conv_2", axis=3, bias=False),
                           *norm_slices(own[0], "BatchNorm_2")]
            else:
                writers = [*layer_slices("Conv_0", axis=3, bias=False),
                           *norm_slices("BatchNorm_0")]
            for b in own:
                writers += [*layer_slices(b, "Conv_1", axis=3, bias=False),
                            *norm_slices(b, "BatchNorm_1")]
            readers = [(param_path(b, "Conv_0", "kernel"), 2) for b in (own[1:] if stage else own)]
            if stage < 2:
                first = blocks[(stage + 1) * n]
                readers += [(param_path(first, "Conv_0", "kernel"), 2),
                            (param_path(first, "Conv_2", "kernel"), 2)]
            else:
                readers.append((param_path("Dense_0", "kernel"), 0))
            stages.append(wire(f"stage {stage} residual", writers, readers, "stage_widths",
                               [stage]))
        inner = [wire(f"{b} inner", [*layer_slices(b, "Conv_0", axis=3, bias=False),
                                     *norm_slices(b, "BatchNorm_0")],
                      [(param_path(b, "Conv_1", "kernel"), 2)], "inner_widths", [i])
                 for i, b in enumerate(blocks)]
        return (*stages, *inner)

    @nn.nowrap
    def layer_widths(self) -> dict[str, tuple[int, ...]]:
        return {"stage_widths": self.widths_per_stage,
                "inner_widths": self.inner_widths_per_block}

    @nn.nowrap
    def with_layer_widths(self, **widths: tuple[int, ...]) -> "ResNet":
        return self.clone(**widths)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return _forward(self, x, train, self.widths_per_stage, (self.blocks_per_stage,) * 3,
                        self.inner_widths_per_block)


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 images: CIFAR stem → 4 stages of `stage_sizes` basic blocks at
    `width`·(1, 2, 4, 8) channels → global mean → Dense (11.2 M parameters for 10 classes).

    BatchNorm statistics live in `batch_stats`. Input is [B, H, W] or [B, H, W, C].
    """

    num_classes: int
    width: int = 64
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32
    remat: str = "none"  # see models/remat.py
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None

    WIDTH_KEYS: ClassVar[tuple[str, ...]] = ("width",)  # what a half-width student halves

    def __post_init__(self) -> None:
        if not self.stage_sizes or min(self.stage_sizes) < 1:
            raise UserError(f"model.stage_sizes={self.stage_sizes!r} needs one block count >= 1 "
                            "per stage, e.g. (2, 2, 2, 2)")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        widths = tuple(self.width * 2**stage for stage in range(len(self.stage_sizes)))
        inner = tuple(w for w, n in zip(widths, self.stage_sizes, strict=True) for _ in range(n))
        return _forward(self, x, train, widths, self.stage_sizes, inner)
