"""The pre-LayerNorm Transformer block both Transformers here use (ViT's encoder, the LM's decoder).

x + MHSA(LN(x)), then x + MLP(LN(x)) with a GELU (Xiong et al. 2020 on pre-LN). Every projection —
q, k, v, out and the MLP's two layers — takes `dot_general_cls`, the quantization seam, and so do
the attention's own matmuls (QKᵀ and weights×V, through `DotGeneralEinsum`).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxopt_lab.errors import UserError
from jaxopt_lab.models.einsum import DotGeneralEinsum


def check_heads(dim: int, heads: int) -> None:
    """Attention splits the width over the heads: say so when a config's do not divide."""
    if dim % heads:
        raise UserError(f"model.dim={dim} is not divisible by model.heads={heads}; "
                        "allowed: heads dividing dim")


class TransformerBlock(nn.Module):
    """One block; `mask` ([B, 1, T, T], True = may attend) makes it causal, None attends to all.

    `head_dim` (None: the width over `heads`) fixes each head's width, so a block with heads
    removed by pruning keeps the head size of its trained weights.
    """

    heads: int
    mlp_dim: int
    dot_general_cls: Any
    head_dim: int | None = None
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        einsum = (functools.partial(DotGeneralEinsum, self.dot_general_cls)
                  if self.dot_general_cls else None)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            qkv_features=None if self.head_dim is None else self.heads * self.head_dim,
            qkv_dot_general_cls=self.dot_general_cls,
            out_dot_general_cls=self.dot_general_cls,
            qk_attn_weights_einsum_cls=einsum,
            attn_weights_value_einsum_cls=einsum,
            dtype=self.dtype,
        )(nn.LayerNorm(dtype=self.dtype)(x), mask=mask)
        x = x + y
        dense = functools.partial(nn.Dense, dot_general_cls=self.dot_general_cls, dtype=self.dtype)
        y = dense(self.mlp_dim)(nn.LayerNorm(dtype=self.dtype)(x))
        y = dense(x.shape[-1])(nn.gelu(y))
        return x + y


def apply_block(module: nn.Module, x: jax.Array, mask: jax.Array | None, heads: int,
                mlp_dim: int, head_dim: int | None) -> jax.Array:
    """`module`'s next TransformerBlock on `x`, with its seam and dtype: the function both
    Transformers lift through `remat` (`models/remat.py`), so the blocks keep their names."""
    return TransformerBlock(heads, mlp_dim, module.dot_general_cls, head_dim,
                            dtype=module.dtype)(x, mask)
