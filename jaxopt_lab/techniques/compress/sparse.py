"""Sparsification: each device sends k = max(1, ceil(ratio * size)) entries of each tensor.

Top-k keeps the entries of largest magnitude (Lin et al. 2018, "Deep Gradient Compression"; Aji &
Heafield 2017); random-k keeps k entries drawn uniformly without replacement (Stich et al. 2018,
"Sparsified SGD with Memory"). Both are biased (they send only part of the gradient), which error
feedback repairs: what was not sent stays in the residual and is added back next step.

Each device picks its own indices (its own top-k; random-k from its own key, which differs per
device and step) and sends (int32 indices, float32 values): 8k bytes per tensor. Devices sharing
random-k's indices could all-reduce the values alone (4k bytes) but would keep the same k
coordinates of the whole model per step instead of up to n x k; sharing is left for later.
Random-k sends the k entries unscaled: without error feedback that shrinks the mean gradient by
k / size (the unbiased variant, scaled by size / k, has size / k times the variance).

A population whose members differ in ratio (`ratio` a tuple) selects the largest k of them, in
`lax.top_k`'s order (by magnitude, or by random key; ties to the lower index), and each member
zeroes the values past its own k: its first k are exactly the top_k it would pick alone, so it
sends, decodes and owes what it would alone, bit for bit, and counts its own 8k bytes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxopt_lab.core.step import Reducer
from jaxopt_lab.techniques.compress.exchange import Codec, elementwise_reducer
from jaxopt_lab.techniques.compress.options import (
    DEFAULT_MIN_SIZE,
    RATIO,
    check,
    described,
    member_index,
    values_of,
)


def kept(ratio: float, size: int) -> int:
    """k = max(1, ceil(ratio * size)); `ratio * size` rounded to 6 decimals first, so a product
    such as 0.07 * 100 = 7.000000000000001 keeps 7, not 8."""
    return max(1, math.ceil(round(ratio * size, 6)))


def _sparse_codec(ratios: tuple[float, ...], choose, member) -> Codec:
    """`choose(x, k, key)` gives the k distinct indices a device sends, in top_k's order;
    `member` is which of `ratios` this member keeps."""

    def own_k(size):
        return jnp.asarray([kept(r, size) for r in ratios], jnp.int32)[member]

    def encode(x, key):
        largest = max(kept(r, x.size) for r in ratios)
        index = choose(x, largest, key).astype(jnp.int32)
        value = jnp.where(jnp.arange(largest) < own_k(x.size), x[index], 0.0)
        sent = jnp.zeros_like(x).at[index].set(value, unique_indices=True)
        return {"index": index, "value": value}, sent

    def add_decoded(acc, payload):
        # One device's indices are distinct, so this scatter-add has no collisions.
        return acc.at[payload["index"]].add(payload["value"], unique_indices=True)

    def sent_bytes(size):  # an int32 index and a float32 value per entry of its own k
        return 8.0 * own_k(size).astype(jnp.float32)

    return Codec(encode, add_decoded, sent_bytes)


def _reducer(ratio, choose, error_feedback: bool, min_size: int) -> Reducer:
    ratios = values_of(ratio)

    def codec_for(hparams):
        return _sparse_codec(ratios, choose, member_index(ratios, hparams, RATIO))

    return elementwise_reducer(codec_for, error_feedback=error_feedback, min_size=min_size)


def _largest(x, k, key):
    del key
    return jax.lax.top_k(jnp.abs(x), k)[1]


def _uniform(x, k, key):
    # The k largest of iid uniform keys are a uniform k-subset: a top-k, where
    # `random.choice(replace=False)` permutes the whole tensor (14x slower steps on the wide CNN).
    return jax.lax.top_k(jax.random.uniform(key, x.shape), k)[1]


def topk(ratio: float | tuple[float, ...] = 0.01, error_feedback: bool = True,
         min_size: int = DEFAULT_MIN_SIZE) -> Reducer:
    """Top-k sparsification by magnitude, per tensor, with error feedback by default (`ratio` a
    tuple: a population's ratios, each member's own in hparams[RATIO])."""
    check(ratio=ratio, error_feedback=error_feedback, min_size=min_size)
    reducer = _reducer(ratio, _largest, error_feedback, min_size)
    return described(reducer, "topk", ratio=ratio, error_feedback=error_feedback,
                     min_size=min_size)


def randomk(ratio: float | tuple[float, ...] = 0.01, error_feedback: bool = True,
            min_size: int = DEFAULT_MIN_SIZE) -> Reducer:
    """Random-k sparsification from the reducer's key (per device and step), with error
    feedback by default (`ratio` a tuple: as for `topk`)."""
    check(ratio=ratio, error_feedback=error_feedback, min_size=min_size)
    reducer = _reducer(ratio, _uniform, error_feedback, min_size)
    return described(reducer, "randomk", ratio=ratio, error_feedback=error_feedback,
                     min_size=min_size)
