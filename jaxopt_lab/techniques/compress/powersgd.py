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
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_lab.core.step import Reducer, data_mean
from jaxopt_lab.techniques.compress.exchange import nbytes
from jaxopt_lab.techniques.compress.options import DEFAULT_MIN_SIZE, check, described

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
    """The starting Q of the `index`-th leaf: the same on every device."""
    return jax.random.normal(jax.random.fold_in(jax.random.key(Q_SEED), index), (n, rank))


def powersgd(rank: int = 2, start_step: int = 10, error_feedback: bool = True,
             min_size: int = DEFAULT_MIN_SIZE) -> Reducer:
    """Rank-`rank` PowerSGD with warm start, error feedback by default, and a plain all-reduce
    for the first `start_step` steps."""
    check(rank=rank, start_step=start_step, error_feedback=error_feedback, min_size=min_size)

    def plan(leaves):
        return [matrix_shape(jnp.shape(x), rank, min_size) for x in leaves]

    def init(params):
        leaves = jax.tree.leaves(params)
        q = tuple(initial_q(i, mn[1], rank) for i, mn in enumerate(plan(leaves)) if mn)
        residual = (jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
                    if error_feedback else ())
        return PowerSGDState(jnp.zeros((), jnp.int32), residual, q)

    def compressed(matrices, qs):
        p = data_mean([jnp.matmul(m, q, precision=_EXACT) for m, q in zip(matrices, qs)])
        p = [jnp.linalg.qr(x)[0] for x in p]
        local_q = [jnp.matmul(m.T, x, precision=_EXACT) for m, x in zip(matrices, p)]
        q = data_mean(local_q)
        approx = [jnp.matmul(x, y.T, precision=_EXACT) for x, y in zip(p, q)]
        owed = ([m - jnp.matmul(x, y.T, precision=_EXACT)
                 for m, x, y in zip(matrices, p, local_q)] if error_feedback else [])
        return approx, owed, tuple(q), jnp.float32(nbytes(p) + nbytes(q))

    def uncompressed(matrices, qs):
        owed = [jnp.zeros_like(m) for m in matrices] if error_feedback else []
        return data_mean(matrices), owed, tuple(qs), jnp.float32(nbytes(matrices))

    def reduce(grads, state, rng, hparams):
        del rng, hparams
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
            approx, owed, q, sent = jax.lax.cond(state.step >= start_step, compressed,
                                                 uncompressed, matrices, state.q)
        else:
            approx, owed, q, sent = compressed(matrices, state.q)

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
