"""Quantized exchange: each device sends small integers and one float32 scale per tensor.

QSGD (Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization and
Encoding"): with s levels, entry x_i becomes ||x||_2 / s * sign(x_i) * xi_i, where xi_i is
floor(s |x_i| / ||x||_2) rounded up with probability equal to the remainder: unbiased, so it needs
no error feedback (it may still have it). The draws come from the reducer's key, which differs per
device and step.

int8: symmetric round-to-nearest with scale max|x| / 127; each entry is within scale / 2 of x.

Both send the integers as int8 (int16 for QSGD above 127 levels) and the scale as float32:
d + 4 bytes per tensor for int8 payloads. QSGD's values need only log2(2s + 1) bits (and less
after the paper's Elias coding); they are not packed below a byte here, and the count says so.
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


def _add_decoded(acc, payload):
    return acc + _dequantize(payload["q"], payload["scale"][0])


def _qsgd_codec(levels: int) -> Codec:
    dtype = jnp.int8 if levels <= INT8_MAX else jnp.int16

    def encode(x, key):
        norm = jnp.linalg.norm(x)
        level = jnp.abs(x) / jnp.where(norm > 0, norm, 1.0) * levels
        low = jnp.floor(level)
        up = jax.random.uniform(key, x.shape) < level - low
        magnitude = jnp.minimum(low + up, levels)  # |x_i| <= ||x||_2, up to rounding
        q = (jnp.sign(x) * magnitude).astype(dtype)
        scale = norm / levels
        return {"q": q, "scale": scale[None]}, _dequantize(q, scale)

    return Codec(encode, _add_decoded)


def _int8_encode(x, key):
    del key
    scale = jnp.max(jnp.abs(x)) / INT8_MAX
    q = jnp.clip(jnp.round(x / jnp.where(scale > 0, scale, 1.0)), -INT8_MAX, INT8_MAX)
    q = q.astype(jnp.int8)
    return {"q": q, "scale": scale[None]}, _dequantize(q, scale)


def qsgd(levels: int = 16, error_feedback: bool = False,
         min_size: int = DEFAULT_MIN_SIZE) -> Reducer:
    """QSGD stochastic quantization to `levels` levels per tensor (unbiased)."""
    check(levels=levels, error_feedback=error_feedback, min_size=min_size)
    reducer = elementwise_reducer(_qsgd_codec(levels), error_feedback=error_feedback,
                                  min_size=min_size)
    return described(reducer, "qsgd", levels=levels, error_feedback=error_feedback,
                     min_size=min_size)


def int8(error_feedback: bool = False, min_size: int = DEFAULT_MIN_SIZE) -> Reducer:
    """Symmetric int8 quantization with one float32 scale per tensor."""
    check(error_feedback=error_feedback, min_size=min_size)
    reducer = elementwise_reducer(Codec(_int8_encode, _add_decoded),
                                  error_feedback=error_feedback, min_size=min_size)
    return described(reducer, "int8", error_feedback=error_feedback, min_size=min_size)
