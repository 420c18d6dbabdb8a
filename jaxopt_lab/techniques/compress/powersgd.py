"""PowerSGD: a rank-r approximation of each gradient matrix from one step of power iteration.

Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization". For each matrix M (a kernel [..., in, out] seen as [prod(leading), out]) = g + e:

    P = mean_w(M_w Q)          all-reduce of an [m, r] matrix
    P = orthogonalise(P)       QR, the same on every device since P is
    Q = mean_w(M_w^T P)        all-reduce of an [n, r] matrix
    approx = P Q^T             every device's mean gradient

Q is warm-started: kept in the state from one step to the next (a power iteration spread over
steps), starting from a fixed key so every device starts from the same Q. Both all-reduces are
linear, so (m + n) r floats per matrix replace m n. Error feedback keeps e' = M_w - P Q_w^T, this
device's part not captured by the shared basis P; its mean over devices is mean(M) - approx, as
with the residual M_w - approx of PyTorch's hook, and PowerSGD's output depends only on that
mean, so both train alike, but this one stays bounded (it is a projection's remainder) where the
other also accumulates each device's difference from the mean.

Like PyTorch's DDP hook (`powerSGD_hook`), the first `start_step` steps are a plain all-reduce
(early gradients change fast and compress badly), and vectors, tensors under `min_size` elements
and matrices whose factors would not be smaller than the matrix ((m + n) r >= m n) go uncompressed.

A population whose members differ in rank (`rank` a tuple) keeps factors as wide as the largest
rank R, and each member zeroes the columns of Q and of the orthogonalised P past its own rank r:
the zero columns add nothing to the products, P's first r columns are the QR of its own [m, r]
(Householder reflectors of a column depend on the columns before it only), and Q's starting
columns are drawn one key per column, so a member computes its own-rank PowerSGD. Equal to float
tolerance, not bit for bit: XLA and LAPACK may pick other kernels (another summation order)
for the [m, R] shapes than for [m, r]. A matrix compressed at the smallest rank but not at a
member's ((m + n) r >= m n) is all-reduced for that member, as it would be alone; each member
counts its own bytes, (m + n) r floats per compressed matrix.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_lab.core.step import Reducer, data_mean
from jaxopt_lab.techniques.compress.exchange import nbytes
from jaxopt_lab.techniques.compress.options import (
    DEFAULT_MIN_SIZE,
    RANK,
    check,
    described,
    member_index,
    values_of,
)

Q_SEED = 0  # every device and every run starts from the same Q
_EXACT = jax.lax.Precision.HIGHEST  # TPUs and TF32 GPUs would otherwise round these products


class PowerSGDState(NamedTuple):
    """One device's PowerSGD state."""

    step: jax.Array  # int32 scalar: reductions so far; compression from `start_step` on
    residual: Any  # float32 pytree shaped like the params; () without error feedback
    q: tuple[jax.Array, ...]  # float32 [n, r] per compressed matrix, in leaf order


def matrix_shape(shape: tuple[int, ...], rank: int, min_size: int) -> tuple[int, int] | None:
    """(m, n) a tensor is compressed as, or None where it goes uncompressed."""
    if len(shape) < 2 or math.prod(shape) < min_size:
        return None
    m, n = math.prod(shape[:-1]), shape[-1]
    return (m, n) if (m + n) * rank < m * n else None


def initial_q(index: int, n: int, rank: int) -> jax.Array:
    """The starting Q of the `index`-th leaf: the same on every device. Each column has a key
    of its own, so a lower rank's Q is the first columns of a higher one's."""
    key = jax.random.fold_in(jax.random.key(Q_SEED), index)
    return jnp.stack([jax.random.normal(jax.random.fold_in(key, j), (n,)) for j in range(rank)],
                     axis=1)


def _own_bytes(shape: tuple[int, int], rank) -> jax.Array:
    """float32 bytes a matrix costs at `rank`: its factors where smaller, else itself."""
    m, n = shape
    return jnp.where((m + n) * rank < m * n, 4.0 * (m + n) * rank, 4.0 * m * n).astype(jnp.float32)


def _plain_where_not_own(matrices, approx, owed, rank, widest):
    """A matrix compressed at a population's smallest rank but not at this member's `rank`
    goes as a plain mean, with nothing owed, as this member alone would send it."""
    shapes = [m.shape for m in matrices]
    disputed = [j for j, (m, n) in enumerate(shapes) if (m + n) * widest >= m * n]
    if not disputed:
        return approx, owed
    approx, owed = list(approx), list(owed)
    for j, mean in zip(disputed, data_mean([matrices[j] for j in disputed]), strict=True):
        m, n = shapes[j]
        own = (m + n) * rank < m * n
        approx[j] = jnp.where(own, approx[j], mean)
        if owed:
            owed[j] = jnp.where(own, owed[j], 0.0)
    return approx, owed


def powersgd(rank: int | tuple[int, ...] = 2, start_step: int = 10, error_feedback: bool = True,
             min_size: int = DEFAULT_MIN_SIZE) -> Reducer:
    """Rank-`rank` PowerSGD with warm start, error feedback by default, and a plain all-reduce
    for the first `start_step` steps (`rank` a tuple: a population's ranks, each member's own in
    hparams[RANK])."""
    check(rank=rank, start_step=start_step, error_feedback=error_feedback, min_size=min_size)
    ranks = values_of(rank)
    widest = max(ranks)

    def plan(leaves):  # what some member compresses: at the smallest rank
        return [matrix_shape(jnp.shape(x), min(ranks), min_size) for x in leaves]

    def init(params):
        leaves = jax.tree.leaves(params)
        q = tuple(initial_q(i, mn[1], widest) for i, mn in enumerate(plan(leaves)) if mn)
        residual = (jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
                    if error_feedback else ())
        return PowerSGDState(jnp.zeros((), jnp.int32), residual, q)

    def compressed(matrices, qs, own):
        columns = jnp.arange(widest) < own  # this member's rank of the widest factors
        p = data_mean([jnp.matmul(m, q * columns, precision=_EXACT)
                       for m, q in zip(matrices, qs)])
        p = [jnp.linalg.qr(x)[0] * columns for x in p]
        local_q = [jnp.matmul(m.T, x, precision=_EXACT) for m, x in zip(matrices, p)]
        q = data_mean(local_q)
        approx = [jnp.matmul(x, y.T, precision=_EXACT) for x, y in zip(p, q)]
        owed = ([m - jnp.matmul(x, y.T, precision=_EXACT)
                 for m, x, y in zip(matrices, p, local_q)] if error_feedback else [])
        approx, owed = _plain_where_not_own(matrices, approx, owed, own, widest)
        return approx, owed, tuple(q), sum(_own_bytes(m.shape, own) for m in matrices)

    def uncompressed(matrices, qs):
        owed = [jnp.zeros_like(m) for m in matrices] if error_feedback else []
        return data_mean(matrices), owed, tuple(qs), jnp.float32(nbytes(matrices))

    def reduce(grads, state, rng, hparams):
        del rng
        own = jnp.asarray(ranks, jnp.int32)[member_index(ranks, hparams, RANK)]
        leaves, treedef = jax.tree.flatten(grads)
        shapes = plan(leaves)
        residuals = (jax.tree.leaves(state.residual) if error_feedback
                     else [None] * len(leaves))
        corrected = [g.astype(jnp.float32) if e is None else g.astype(jnp.float32) + e
                     for g, e in zip(leaves, residuals, strict=True)]
        chosen = [i for i, mn in enumerate(shapes) if mn]
        plain = [i for i, mn in enumerate(shapes) if not mn]
        matrices = [corrected[i].reshape(shapes[i]) for i in chosen]

        if not chosen:
            approx, owed, q, sent = [], [], state.q, jnp.float32(0)
        elif start_step > 0:  # the same branch on every device: their step counts agree
            approx, owed, q, sent = jax.lax.cond(state.step >= start_step,
                                                 functools.partial(compressed, own=own),
                                                 uncompressed, matrices, state.q)
        else:
            approx, owed, q, sent = compressed(matrices, state.q, own)

        # Tensors sent as they are keep their own dtype (their residual stays zero).
        unsent = [corrected[i].astype(leaves[i].dtype) for i in plain]
        outputs = dict(zip(chosen, approx, strict=True))
        if plain:
            outputs.update(zip(plain, data_mean(unsent), strict=True))
        mean = [outputs[i].reshape(g.shape).astype(g.dtype) for i, g in enumerate(leaves)]
        stats = {"comm_bytes": sent + nbytes(unsent),
                 "comm_bytes_uncompressed": jnp.float32(nbytes(leaves))}
        residual = state.residual
        if error_feedback:
            new = list(residuals)
            for i, e in zip(chosen, owed, strict=True):
                new[i] = e.reshape(leaves[i].shape)
            residual = jax.tree.unflatten(treedef, new)
        state = PowerSGDState(state.step + 1, residual, q)
        return jax.tree.unflatten(treedef, mean), state, stats

    return described(Reducer(init, reduce), "powersgd", rank=rank, start_step=start_step,
                     error_feedback=error_feedback, min_size=min_size)
