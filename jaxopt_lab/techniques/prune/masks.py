"""Masks from scores: which weights survive at a given sparsity, for each pattern and scope.

Everything here is a pure function of arrays, with the sparsity a traced value, so masks are
recomputed inside the compiled step and a population of targets is one program. Masks are dicts
{parameter path: bool array}, True = kept; the paths are the prunable leaves (`Layout`).

Per-layer sparsities follow `distribution`: uniform (every layer at the target), or ERK (Evci et
al. 2020, "Rigging the Lottery"): a layer's density proportional to (sum of its dimensions) /
(product of its dimensions), so small layers stay denser, scaled so the total matches the target
and capped at fully dense.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxopt_lab.techniques.prune.select import drop_smallest, float_keys, keep_largest


@dataclasses.dataclass(frozen=True)
class ChannelMembers:
    """The parameters sharing one group's channels: (path, axis) pairs and the channel count."""

    name: str
    members: tuple[tuple[str, int], ...]
    size: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """What is pruned: the kernels (by path) and, for the channels pattern, their groups."""

    kernels: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    groups: tuple[ChannelMembers, ...] = ()

    @property
    def masked(self) -> tuple[str, ...]:
        """Every path that carries a mask: the kernels, plus biases and norms of channel groups."""
        extra = [path for g in self.groups for path, _ in g.members if path not in self.kernels]
        return (*self.kernels, *dict.fromkeys(extra))

    @property
    def size(self) -> int:
        return sum(math.prod(self.shapes[p]) for p in self.kernels)


def layer_sparsities(layout: Layout, sparsity: jax.Array, distribution: str) -> dict[str, jax.Array]:
    """Each kernel's sparsity so that the whole layout reaches `sparsity`."""
    if distribution == "uniform":
        return {p: sparsity for p in layout.kernels}
    sizes = jnp.array([math.prod(layout.shapes[p]) for p in layout.kernels], jnp.float32)
    raw = jnp.array([sum(layout.shapes[p]) / math.prod(layout.shapes[p])
                     for p in layout.kernels], jnp.float32)
    budget = (1.0 - sparsity) * sizes.sum()  # weights kept in all
    dense = jnp.zeros(sizes.shape, bool)
    for _ in layout.kernels:  # each pass caps at least one more layer, or changes nothing
        scale = (budget - jnp.sum(jnp.where(dense, sizes, 0.0))) / jnp.maximum(
            jnp.sum(jnp.where(dense, 0.0, raw * sizes)), 1e-12)
        dense = dense | (scale * raw >= 1.0)
    density = jnp.where(dense, 1.0, jnp.clip(scale * raw, 0.0, 1.0))
    return {p: 1.0 - density[i] for i, p in enumerate(layout.kernels)}


def unstructured(scores: dict[str, jax.Array], layout: Layout, sparsity: jax.Array,
                 scope: str, distribution: str) -> dict[str, jax.Array]:
    """Single weights: the lowest-scored fraction of each layer, or of all layers together. Every
    tensor keeps at least its top-scored weight, as jaxpruner does (max(1, round(n(1 - s))) kept):
    a layer with no weight left cuts the network, and no sparsity target means that."""
    if scope == "global":
        flat = jnp.concatenate([float_keys(scores[p]).reshape(-1) for p in layout.kernels])
        kept = drop_smallest(flat, jnp.round(sparsity * flat.size))
        out, start = {}, 0
        for p in layout.kernels:
            n = math.prod(layout.shapes[p])
            mask = kept[start:start + n].reshape(layout.shapes[p])
            out[p] = mask | (keep_largest(float_keys(scores[p]), 1) & ~jnp.any(mask))
            start += n
        return out
    per_layer = layer_sparsities(layout, sparsity, distribution)
    return {p: drop_smallest(float_keys(scores[p]), jnp.minimum(
        jnp.round(per_layer[p] * scores[p].size), scores[p].size - 1)) for p in layout.kernels}


def n_of_m(scores: dict[str, jax.Array], layout: Layout, n: int, m: int) -> dict[str, jax.Array]:
    """N kept in every M consecutive weights along the input (all kernel axes but the last, which
    is a conv's window × input channels, as a GEMM's reduction runs): what sparse tensor cores
    take at N:M = 2:4."""
    out = {}
    for p in layout.kernels:
        shape = layout.shapes[p]
        s = scores[p].reshape(-1, m, shape[-1])  # [K / M, M, out]
        # rank within a group: larger scores first, ties by position
        bigger = s[:, None, :, :] > s[:, :, None, :]
        equal_before = (s[:, None, :, :] == s[:, :, None, :]) & jnp.tril(
            jnp.ones((m, m), bool), -1)[None, :, :, None]
        rank = jnp.sum(bigger | equal_before, axis=2)
        out[p] = (rank < n).reshape(shape)
    return out


def channel_norms(params: dict[str, jax.Array], group: ChannelMembers, norm: str) -> jax.Array:
    """A channel's score: the L1 or L2 norm of its slices of the group's kernels."""
    total = jnp.zeros((group.size,), jnp.float32)
    for path, axis in group.members:
        if not path.endswith("['kernel']"):
            continue
        w = jnp.moveaxis(params[path], axis, 0).reshape(group.size, -1)
        total = total + (jnp.sum(jnp.abs(w), 1) if norm == "l1" else jnp.sum(w * w, 1))
    return total if norm == "l1" else jnp.sqrt(total)


def channels(scores: dict[str, jax.Array], layout: Layout, sparsity: jax.Array
             ) -> dict[str, jax.Array]:
    """Whole channels (filters, neurons, heads) per group, at least one kept: every member of a
    group masked along its axis, so a removed filter takes its bias and norm with it."""
    out = {}
    for group in layout.groups:
        drop = jnp.minimum(jnp.round(sparsity * group.size), group.size - 1)
        kept = drop_smallest(float_keys(scores[group.name]), drop)
        for path, axis in group.members:
            shape = layout.shapes[path]
            line = [1] * len(shape)
            line[axis] = group.size
            mask = jnp.broadcast_to(kept.reshape(line), shape)
            out[path] = out[path] & mask if path in out else mask
    return out


def drop_and_regrow(masks: dict[str, jax.Array], magnitudes: dict[str, jax.Array],
                    regrow_scores: dict[str, jax.Array], fraction: jax.Array
                    ) -> dict[str, jax.Array]:
    """Sparse training's topology update (SET, RigL): in each layer, the `fraction` of kept
    weights with the smallest magnitude are dropped and as many connections regrown where
    `regrow_scores` are highest among the rest (just-dropped ones included), so each layer's
    sparsity is unchanged."""
    out = {}
    for p, mask in masks.items():
        active = jnp.sum(mask)
        n_drop = jnp.round(fraction * active).astype(jnp.int32)
        # Kept weights rank above pruned ones (key 0) by magnitude, exactly, even at zero.
        kept_keys = jnp.where(mask, float_keys(magnitudes[p]) + 1, 0)
        after_drop = drop_smallest(kept_keys, mask.size - active + n_drop)
        grow_keys = jnp.where(after_drop, 0, float_keys(regrow_scores[p]) + 1)
        out[p] = after_drop | keep_largest(grow_keys, n_drop)
    return out
