"""A small causal, decoder-only Transformer for character-level language modelling.

The GPT shape (Radford et al. 2018; Vaswani et al., "Attention Is All You Need", NeurIPS 2017) with
pre-LayerNorm blocks: token embedding + learned positions → `depth` blocks of causal multi-head
self-attention and an MLP → LayerNorm → a Dense head to the vocabulary. Every projection (q, k, v,
out, the MLP's two layers, the head) takes `dot_general_cls`, so an injected quantizer reaches all
of them; the embedding is a lookup, not a matrix product, and stays float.
"""

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxopt_lab.errors import UserError
from jaxopt_lab.models.remat import checkpointed
from jaxopt_lab.models.transformer_block import apply_block, check_heads


class TransformerLM(nn.Module):
    """Tokens [B, T] (int, T <= `max_len`) → next-token logits [B, T, num_classes].

    `num_classes` is the vocabulary size (input ids and output classes alike). Position t attends
    to positions <= t only, so the logits at t depend on tokens[:t+1] alone.
    """

    num_classes: int
    dim: int = 128
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 512
    max_len: int = 128
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32
    remat: str = "none"  # see models/remat.py: each Transformer block is a block
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None  # no convs; kept so every model takes the same seams

    WIDTH_KEYS: ClassVar[tuple[str, ...]] = ("dim", "mlp_dim")  # what a half-width student halves
    # Not a `models.channels.ChannelModel`: its heads are not described yet, and the generic
    # reading of a Dense stack would take the attention projections for independent layers.
    CHANNEL_PRUNING_REFUSED: ClassVar[str] = (
        "structured pruning of transformer_lm is not supported; use an unstructured or N:M pattern")

    def __post_init__(self) -> None:
        check_heads(self.dim, self.heads)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm
        if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
            raise UserError(
                f"model transformer_lm takes integer token ids [batch, length], not {x.dtype} "
                f"{list(x.shape)}; allowed: a language_model data set such as python_text"
            )
        length = x.shape[1]
        if length > self.max_len:
            raise UserError(
                f"the input has {length} tokens, more than model.max_len={self.max_len}; "
                "allowed: a max_len at least the sequence length"
            )
        h = nn.Embed(self.num_classes, self.dim, dtype=self.dtype, name="embed")(x)
        positions = self.param(
            "pos_embedding", nn.initializers.normal(0.02), (1, self.max_len, self.dim)
        )
        h = h + positions[:, :length].astype(self.dtype)
        mask = nn.make_causal_mask(x)  # [B, 1, T, T]: query t sees keys <= t
        block = checkpointed(apply_block, self.remat, static_argnums=(3, 4, 5))
        for _ in range(self.depth):
            h = block(self, h, mask, self.heads, self.mlp_dim, None)
        h = nn.LayerNorm(dtype=self.dtype)(h)
        return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls, dtype=self.dtype,
                        name="head")(h)
