"""A small Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021).

Every projection — patch embedding, q/k/v/out, MLP, head — is a Dense/DenseGeneral, so an injected
`dot_general_cls` (e.g. AQT int8) reaches all of them. The patch embedding is a Dense on flattened
patches instead of the usual stride-`patch_size` conv: the same linear map, but on the dot_general
seam, so quantizing a ViT needs no conv quantizer.
"""

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxopt_lab.errors import UserError
from jaxopt_lab.models.channels import Wiring, layer_slices, param_path, wire
from jaxopt_lab.models.remat import checkpointed
from jaxopt_lab.models.transformer_block import apply_block, check_heads

_POOLS = ("cls", "mean")


class ViT(nn.Module):
    """Patches → Dense embedding (+ class token) + learned positions → `depth` blocks → LN → head.

    `pool` is "cls" (classify the class token, as in the paper) or "mean" (average the patch tokens).
    Input is [B, H, W] or [B, H, W, C] with H and W multiples of `patch_size`. `layer_heads` and
    `layer_mlp_dims` set the heads and MLP width per block (a ViT pruned by heads and shrunk by
    `prune.shrink` has uneven ones); every head stays dim // heads wide.
    """

    num_classes: int
    patch_size: int = 2
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 128
    pool: str = "cls"
    layer_heads: tuple[int, ...] = ()  # heads per block, each dim // heads wide; () = `heads`
    layer_mlp_dims: tuple[int, ...] = ()  # MLP width per block; () = `mlp_dim`
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32
    remat: str = "none"  # see models/remat.py: each Transformer block is a block
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None  # no convs; kept so every model takes the same seams

    WIDTH_KEYS: ClassVar[tuple[str, ...]] = ("dim", "mlp_dim")  # what a half-width student halves

    def __post_init__(self) -> None:
        if self.pool not in _POOLS:
            raise UserError(f"model.pool={self.pool!r} is unknown; allowed: {', '.join(_POOLS)}")
        check_heads(self.dim, self.heads)
        for name in ("layer_heads", "layer_mlp_dims"):
            value = getattr(self, name)
            if value and len(value) != self.depth:
                raise UserError(f"model.{name}={value!r} needs one entry per block "
                                f"(depth={self.depth}) or () for the same in every block")
        super().__post_init__()

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        return self.layer_heads or (self.heads,) * self.depth

    @property
    def mlp_dims_per_block(self) -> tuple[int, ...]:
        return self.layer_mlp_dims or (self.mlp_dim,) * self.depth

    @nn.nowrap
    def channel_wiring(self) -> tuple[Wiring, ...]:
        """Each block's attention heads (q, k, v and the out projection's rows of a head) and its
        MLP's hidden neurons (`models.channels.ChannelModel`). Heads have no consumers: the out
        projection, their reader, is a member (its rows are the heads' own)."""
        out = []
        for i in range(self.depth):
            block, attention = f"TransformerBlock_{i}", "MultiHeadDotProductAttention_0"
            heads = [s for name in ("query", "key", "value")
                     for s in layer_slices(block, attention, name, axis=1)]
            heads.append((param_path(block, attention, "out", "kernel"), 0))
            out.append(wire(f"{block} heads", heads, [], "layer_heads", [i]))
            out.append(wire(f"{block} Dense_0", layer_slices(block, "Dense_0", axis=1),
                            [(param_path(block, "Dense_1", "kernel"), 0)], "layer_mlp_dims", [i]))
        return tuple(out)

    @nn.nowrap
    def layer_widths(self) -> dict[str, tuple[int, ...]]:
        return {"layer_heads": self.heads_per_block, "layer_mlp_dims": self.mlp_dims_per_block}

    @nn.nowrap
    def with_layer_widths(self, **widths: tuple[int, ...]) -> "ViT":
        return self.clone(**widths)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm
        if x.ndim == 3:
            x = x[..., None]
        b, h, w, c = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise UserError(
                f"model.patch_size={p} does not divide the {h}×{w} input; "
                "allowed: a divisor of both"
            )
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)
        x = nn.Dense(self.dim, dot_general_cls=self.dot_general_cls, dtype=self.dtype,
                     name="embed")(x)
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros_init(), (1, 1, self.dim))
            cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.dim))
            x = jnp.concatenate([cls, x], axis=1)
        positions = self.param("pos_embedding", nn.initializers.normal(0.02),
                               (1, x.shape[1], self.dim))
        x = x + positions.astype(self.dtype)
        block = checkpointed(apply_block, self.remat, static_argnums=(3, 4, 5))
        for heads, mlp_dim in zip(self.heads_per_block, self.mlp_dims_per_block, strict=True):
            x = block(self, x, None, heads, mlp_dim, self.dim // self.heads)
        x = nn.LayerNorm(dtype=self.dtype)(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls, dtype=self.dtype,
                        name="head")(x)
