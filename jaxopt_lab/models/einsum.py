"""A two-operand einsum whose contraction goes through an injected `dot_general_cls`.

Flax's attention computes QKᵀ and weights×V with `jnp.einsum`, outside the `dot_general_cls` seam
its projections take; passing this class as the attention's einsum classes brings both matmuls to
the seam, so a quantizer injected there reaches them. `jnp.einsum(..., _dot_general=...)` cannot
take a Flax module (it hashes its static arguments), hence the small translation here.
"""

from collections.abc import Callable
from typing import Any

import jax
from flax import linen as nn


def einsum_dimension_numbers(eqn: str, lhs_ndim: int, rhs_ndim: int):
    """(dimension_numbers, permutation) such that
    `lax.dot_general(a, b, dimension_numbers).transpose(permutation) == jnp.einsum(eqn, a, b)`.

    Letters in both operands and the output are batch axes, in both but not the output contracted;
    "..." stands for the leading axes, which must be batch axes of equal rank in both operands.

    >>> einsum_dimension_numbers("bqhd,bkhd->bhqk", 4, 4)
    ((((3,), (3,)), ((0, 2), (0, 2))), (0, 1, 2, 3))
    """
    inputs, out = eqn.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eqn]
    lhs_dots = lhs_ndim - len(lhs.replace("...", ""))
    rhs_dots = rhs_ndim - len(rhs.replace("...", ""))
    if "..." in eqn and lhs_dots != rhs_dots:
        raise ValueError(f"einsum {eqn!r}: '...' must cover as many axes in both operands")
    dots = "".join(spare[:lhs_dots])
    lhs, rhs, out = (s.replace("...", dots) for s in (lhs, rhs, out))
    batch = [c for c in lhs if c in rhs and c in out]
    contract = [c for c in lhs if c in rhs and c not in out]
    dimension_numbers = (
        (tuple(lhs.index(c) for c in contract), tuple(rhs.index(c) for c in contract)),
        (tuple(lhs.index(c) for c in batch), tuple(rhs.index(c) for c in batch)),
    )
    produced = batch + [c for c in lhs if c not in rhs] + [c for c in rhs if c not in lhs]
    return dimension_numbers, tuple(produced.index(c) for c in out)


class DotGeneralEinsum(nn.Module):
    """`einsum(eqn, a, b)` computed by `dot_general_cls()` (lax.dot_general when None)."""

    dot_general_cls: Callable[..., Any] | None = None

    @nn.compact
    def __call__(self, eqn: str, lhs: jax.Array, rhs: jax.Array, **_: Any) -> jax.Array:
        dimension_numbers, permutation = einsum_dimension_numbers(eqn, lhs.ndim, rhs.ndim)
        dot_general = self.dot_general_cls() if self.dot_general_cls else jax.lax.dot_general
        return dot_general(lhs, rhs, dimension_numbers, None).transpose(permutation)
