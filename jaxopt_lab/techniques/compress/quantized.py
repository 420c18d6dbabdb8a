"""Quantized exchange: each device sends small integers and one float32 scale per tensor.

QSGD (Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization and
Encoding"): with s levels, entry x_i becomes ||x||_2 / s * sign(x_i) * xi_i, where xi_i is
floor(s |x_i| / ||x||_2) rounded up with probability equal to the remainder: unbiased, so it needs
no error feedback (it may still have it). The draws come from the reducer's key, which differs per
device and step.

int8: symmetric round-to-nearest with scale max|x| / 127; each entry is within scale / 2 of x.

Both send one float32 scale per tensor. int8 sends its integers as int8: d + 4 bytes. A QSGD
value sign x level is one of 2s + 1 symbols, packed at b = ceil(log2(2s + 1)) bits each
(`value_bits`: 4 bits for s = 4..7, 6 for s = 16, 8 for s = 64..127) into ceil(d b / 8) bytes:
ceil(d b / 8) + 4 bytes per tensor, what the all-gather carries and the count says. A fixed
width keeps the payload's shape static; the symbols' entropy is less (at most log2 33 = 5.04
bits at s = 16, and the paper's Elias code of the levels uses that), which this leaves unused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopt_lab.core.step import Reducer
from jaxopt_lab.techniques.compress.exchange import Codec, elementwise_reducer
from jaxopt_lab.techniques.compress.options import DEFAULT_MIN_SIZE, check, described

INT8_MAX = 127


def _dequantize(q, scale):
    # Sender and receivers decode through this one function, so `sent` (what error feedback
    # subtracts) is bit for bit what the others add.
    return q.astype(jnp.float32) * scale


def _add_int8(acc, payload):
    return acc + _dequantize(payload["q"], payload["scale"][0])


def value_bits(levels: int) -> int:
    """Bits of one packed QSGD value: ceil(log2(2 levels + 1)), the 2s + 1 symbols' width."""
    return (2 * levels).bit_length()


def _overlaps(bits: int):
    """(byte j, symbol i, shift) for each symbol i of a group of 8 that has bits in byte j of
    the group's `bits` bytes; symbol i holds stream bits [i bits, (i + 1) bits), byte j stream
    bits [8 j, 8 j + 8), each least significant first; shift = i bits - 8 j."""
    return [(j, i, i * bits - 8 * j) for j in range(bits) for i in range(8)
            if -bits < i * bits - 8 * j < 8]


def _shifted(x, shift: int):
    return x << shift if shift >= 0 else x >> -shift


def pack(symbols: jax.Array, bits: int) -> jax.Array:
    """Unsigned `symbols` [d] below 2**bits as uint8 [ceil(d bits / 8)]: each group of 8 in
    `bits` bytes (a few shifts per byte, no per-bit arrays), the last group padded with zeros."""
    d = symbols.shape[0]
    groups = -(-d // 8)
    u = jnp.pad(symbols.astype(jnp.uint32), (0, 8 * groups - d)).reshape(groups, 8)
    out = [jnp.zeros((groups,), jnp.uint32) for _ in range(bits)]
    for j, i, shift in _overlaps(bits):
        out[j] = out[j] | _shifted(u[:, i], shift)
    packed = (jnp.stack(out, axis=1) & 0xFF).astype(jnp.uint8).ravel()
    return packed[:-(-d * bits // 8)]  # the bytes past these hold only padding


def unpack(packed: jax.Array, count: int, bits: int) -> jax.Array:
    """The inverse of `pack`: `count` uint32 symbols."""
    groups = -(-count // 8)
    b = jnp.pad(packed, (0, bits * groups - packed.shape[0])).reshape(groups, bits)
    b = b.astype(jnp.uint32)
    out = [jnp.zeros((groups,), jnp.uint32) for _ in range(8)]
    for j, i, shift in _overlaps(bits):
        out[i] = out[i] | _shifted(b[:, j], -shift)
    return (jnp.stack(out, axis=1) & (2**bits - 1)).ravel()[:count]


def _qsgd_codec(levels: int) -> Codec:
    bits = value_bits(levels)

    def encode(x, key):
        norm = jnp.linalg.norm(x)
        level = jnp.abs(x) / jnp.where(norm > 0, norm, 1.0) * levels
        low = jnp.floor(level)
        up = jax.random.uniform(key, x.shape) < level - low
        magnitude = jnp.minimum(low + up, levels)  # |x_i| <= ||x||_2, up to rounding
        q = (jnp.sign(x) * magnitude).astype(jnp.int32)
        scale = norm / levels
        packed = pack(q + levels, bits)  # symbols 0 .. 2 levels
        return {"q": packed, "scale": scale[None]}, _dequantize(q, scale)

    def add_decoded(acc, payload):
        q = unpack(payload["q"], acc.size, bits).astype(jnp.int32) - levels
        return acc + _dequantize(q, payload["scale"][0])

    return Codec(encode, add_decoded)


def _int8_encode(x, key):
    del key
    scale = jnp.max(jnp.abs(x)) / INT8_MAX
    q = jnp.clip(jnp.round(x / jnp.where(scale > 0, scale, 1.0)), -INT8_MAX, INT8_MAX)
    q = q.astype(jnp.int8)
    return {"q": q, "scale": scale[None]}, _dequantize(q, scale)


def qsgd(levels: int = 16, error_feedback: bool = False,
         min_size: int = DEFAULT_MIN_SIZE) -> Reducer:
    """QSGD stochastic quantization to `levels` levels per tensor (unbiased), its values packed
    at `value_bits(levels)` bits."""
    check(levels=levels, error_feedback=error_feedback, min_size=min_size)
    codec = _qsgd_codec(levels)
    reducer = elementwise_reducer(lambda hparams: codec, error_feedback=error_feedback,
                                  min_size=min_size)
    return described(reducer, "qsgd", levels=levels, error_feedback=error_feedback,
                     min_size=min_size)


def int8(error_feedback: bool = False, min_size: int = DEFAULT_MIN_SIZE) -> Reducer:
    """Symmetric int8 quantization with one float32 scale per tensor."""
    check(error_feedback=error_feedback, min_size=min_size)
    codec = Codec(_int8_encode, _add_int8)
    reducer = elementwise_reducer(lambda hparams: codec, error_feedback=error_feedback,
                                  min_size=min_size)
    return described(reducer, "int8", error_feedback=error_feedback, min_size=min_size)
