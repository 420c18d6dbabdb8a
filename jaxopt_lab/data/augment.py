"""On-device data augmentation: pure, vectorized functions of (key, batch) that run inside the jit.

Each draws one random parameter per example from `jax.random` and applies it to the whole batch at
once, so augmentation costs a few fused device ops per step and no host work; given the same key
it gives the same batch, which keeps training a pure function of (state, batch).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxopt_lab.errors import UserError

Augment = Callable[[jax.Array, jax.Array], jax.Array]


def random_shift_1d(key: jax.Array, x: jax.Array, max_shift: int,
                    circular: bool = False) -> jax.Array:
    """Shifts each signal of x ([B, L] or [B, L, C]) by its own offset in [-max_shift, max_shift].

    Zero padding by default (what enters at an edge is silence, not the other end of the signal);
    `circular=True` rolls the signal instead.
    """
    _check_rank(x, (2, 3), "shift", "signals [B, L] or [B, L, C]")
    length = x.shape[1]
    shifts = jax.random.randint(key, (x.shape[0],), -max_shift, max_shift + 1)
    source = jnp.arange(length)[None, :] - shifts[:, None]  # [B, L]: where each output reads
    if circular:
        source = source % length
    inside = (source >= 0) & (source < length)
    source = jnp.clip(source, 0, length - 1)
    extra = (1,) * (x.ndim - 2)  # broadcast over channels
    gathered = jnp.take_along_axis(x, source.reshape(source.shape + extra), axis=1)
    return jnp.where(inside.reshape(inside.shape + extra), gathered, jnp.zeros((), x.dtype))


def gaussian_noise(key: jax.Array, x: jax.Array, std: float) -> jax.Array:
    """Adds independent N(0, std^2) noise to every element."""
    return x + std * jax.random.normal(key, x.shape, x.dtype)


def random_crop(key: jax.Array, x: jax.Array, pad: int) -> jax.Array:
    """Zero-pads images x [B, H, W, C] by `pad` on each side, then crops each back at its own offset.

    The standard translation augmentation for small images (as for CIFAR ResNets); the crop is a
    per-example `dynamic_slice` under vmap, so no padded copy per offset is materialized.
    """
    _check_rank(x, (4,), "crop", "images [B, H, W, C]")
    _, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (x.shape[0], 2), 0, 2 * pad + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
    """Mirrors each image of x [B, H, W, C] left-right with probability 1/2."""
    _check_rank(x, (4,), "flip", "images [B, H, W, C]")
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def make_augment(shift: int = 0, noise: float = 0.0, crop: int = 0,
                 flip: bool = False) -> Augment | None:
    """Composes the enabled augmentations into one `augment(key, x) -> x`; None when all are off.

    Order: geometric ones first (crop, flip, shift), then noise, so the noise is not moved
    around with the signal. Each gets its own key split from `key`.
    """
    for name, value in (("shift", shift), ("noise", noise), ("crop", crop)):
        if value < 0:
            raise UserError(f"data.augment.{name}={value} must be >= 0 (0 = off)")
    steps: list[Callable[[jax.Array, jax.Array], jax.Array]] = []
    if crop:
        steps.append(lambda k, x: random_crop(k, x, crop))
    if flip:
        steps.append(random_flip)
    if shift:
        steps.append(lambda k, x: random_shift_1d(k, x, shift))
    if noise:
        steps.append(lambda k, x: gaussian_noise(k, x, noise))
    if not steps:
        return None

    def augment(key: jax.Array, x: jax.Array) -> jax.Array:
        for step, step_key in zip(steps, jax.random.split(key, len(steps))):
            x = step(step_key, x)
        return x

    return augment


def _check_rank(x: jax.Array, ranks: tuple[int, ...], name: str, expected: str) -> None:
    """Names the augmentation when the data have the wrong shape (checked once, while tracing)."""
    if x.ndim not in ranks:
        raise UserError(f"data.augment.{name} needs {expected}; got inputs of shape {x.shape}")
