"""Random-access shuffling: the i-th element of a seeded permutation of range(n) in O(1).

A step needs only its batch's B indices of the epoch's permutation. Materializing the permutation
(`jax.random.permutation`, a sort) costs ~5 ms per call on a CPU for n=4000 — longer than a
whole MNIST-1D training step — so instead a keyed Feistel network permutes the smallest
even-bit-width power-of-two domain >= n, and cycle-walking (re-applying it until the value is < n)
restricts that bijection to range(n) (Black & Rogaway, "Ciphers with arbitrary finite domains",
CT-RSA 2002). Any block of positions costs O(block) work, on device, inside jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_ROUNDS = 4


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash (the "lowbias32" finalizer): good avalanche for a round function."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def permuted_indices(key: jax.Array, positions: jax.Array, n: int) -> jax.Array:
    """`perm[positions]` for the permutation `perm` of range(n) that `key` selects.

    Args:
      key: a typed PRNG key; one key, one permutation.
      positions: int array of positions in [0, n).
      n: the size of the permuted range (static).
    Returns:
      int32 array shaped like `positions`: distinct positions map to distinct indices.
    """
    half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = jnp.uint32((1 << half_bits) - 1)
    round_keys = jax.random.bits(key, (_ROUNDS,), jnp.uint32)

    def feistel(x):
        left, right = x >> half_bits, x & mask
        for i in range(_ROUNDS):
            left, right = right, left ^ (_mix(right ^ round_keys[i]) & mask)
        return (left << half_bits) | right

    def walk(x):
        return jnp.where(x >= n, feistel(x), x)

    x = feistel(positions.astype(jnp.uint32))
    x = jax.lax.while_loop(lambda x: jnp.any(x >= n), walk, x)
    return x.astype(jnp.int32)
