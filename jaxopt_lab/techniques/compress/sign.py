"""EF-signSGD: each device sends the signs of its gradient and one scale per tensor.

Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes":
p = g + e; sent = (||p||_1 / d) sign(p); e' = p - sent. The l1 scale makes the sent tensor as
large on average as p, and the residual carries what the signs got wrong, so the method converges
where plain signSGD (Bernstein et al. 2018) can fail. The paper folds the learning rate into p;
here the optimizer applies it after the exchange, which is the same for plain SGD at a fixed rate.

The mean over devices is of the scaled signs (not a majority vote). Signs travel as bits packed
into uint8 (`jnp.packbits`, ceil(d / 8) bytes) beside a float32 scale: ceil(d / 8) + 4 bytes per
tensor per device. A zero entry is sent as +scale: one bit has no third value, and error
feedback takes back the difference.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_lab.core.step import Reducer
from jaxopt_lab.techniques.compress.exchange import Codec, elementwise_reducer
from jaxopt_lab.techniques.compress.options import DEFAULT_MIN_SIZE, check, described


def _signed(positive, scale):
    return jnp.where(positive, scale, -scale)


def _encode(x, key):
    del key
    scale = jnp.mean(jnp.abs(x))  # ||x||_1 / d
    positive = x >= 0
    return {"bits": jnp.packbits(positive), "scale": scale[None]}, _signed(positive, scale)


def _add_decoded(acc, payload):
    positive = jnp.unpackbits(payload["bits"], count=acc.size).astype(bool)
    return acc + _signed(positive, payload["scale"][0])


def signsgd(error_feedback: bool = True, min_size: int = DEFAULT_MIN_SIZE) -> Reducer:
    """Scaled-sign compression, per tensor, with error feedback by default (EF-signSGD)."""
    check(error_feedback=error_feedback, min_size=min_size)
    codec = Codec(_encode, _add_decoded)
    reducer = elementwise_reducer(lambda hparams: codec, error_feedback=error_feedback,
                                  min_size=min_size)
    return described(reducer, "signsgd", error_feedback=error_feedback, min_size=min_size)
