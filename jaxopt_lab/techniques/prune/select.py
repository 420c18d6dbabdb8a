"""Keeping the k largest of many scores, with k a traced value, without sorting.

The pruning target is a value in the state (a population varies it), so how many weights to drop
is known only inside the compiled step. A sort would do, but XLA:CPU sorts 10⁵ floats in ~40 ms,
longer than the step it prunes. Instead the k-th smallest key is found by bisection over the bits
of non-negative keys (31 counting passes), and ties at the threshold are broken by position, so
exactly k are dropped, always.

Keys are non-negative int32: a non-negative float32's bit pattern orders as the float does, so
float scores become keys by a bitcast (`float_keys`), exactly, with no rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MAX_KEY = 0x7F800000  # the bits of float32 +inf: above every finite non-negative score


def float_keys(scores: jax.Array) -> jax.Array:
    """int32 keys ordered as the non-negative float `scores` are (NaN and negatives count as 0)."""
    scores = jnp.where(jnp.isfinite(scores) & (scores > 0), scores, 0.0).astype(jnp.float32)
    return jax.lax.bitcast_convert_type(scores, jnp.int32)


def kth_smallest(keys: jax.Array, k: jax.Array) -> jax.Array:
    """The smallest key t with at least k keys <= t (k >= 1), by bisection over [0, +inf]."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(keys <= mid) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), jnp.int32(_MAX_KEY)))
    return lo


def drop_smallest(keys: jax.Array, k: jax.Array) -> jax.Array:
    """A bool mask shaped like `keys`: False for exactly `k` smallest keys (ties by position),
    True for the rest. `k` may be traced; it is clipped to [0, keys.size]."""
    flat = keys.reshape(-1)
    k = jnp.clip(k, 0, flat.size).astype(jnp.int32)
    threshold = kth_smallest(flat, jnp.maximum(k, 1))
    below = flat < threshold
    ties = flat == threshold
    # Of the keys equal to the threshold, drop the first (k - #below) by position.
    tie_rank = jnp.cumsum(ties) - 1
    dropped = below | (ties & (tie_rank < k - jnp.sum(below)))
    return jnp.where(k > 0, ~dropped, True).reshape(keys.shape)


def keep_largest(keys: jax.Array, n: jax.Array) -> jax.Array:
    """True for exactly `n` largest keys."""
    return drop_smallest(keys, keys.size - n)
