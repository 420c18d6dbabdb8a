"""Gradient compression at the communication seam: Reducers that send fewer bytes than a mean.

    reducer = compress.powersgd(rank=2)   # or topk(0.01), randomk(0.01), signsgd(), qsgd(16), int8()
    reducer = compress.make_reducer("topk", ratio=0.01)   # by name: what the config path calls
    step = make_train_step(loss_fn, reducer, tx, mesh)

Each is a `core.step.Reducer(init, reduce)` of pure functions. `reduce` runs per device inside
`jax.shard_map` over the "data" axis and exchanges only through JAX's collectives (`pmean`,
`all_gather`), so the same code runs on one device, on simulated devices and on processes joined
by `jax.distributed`. Every device ends with the same mean gradient. On one device the
compression still runs (its effect on accuracy can be studied on one machine).

Methods: top-k / random-k sparsification (`sparse.py`), PowerSGD (`powersgd.py`), EF-signSGD
(`sign.py`), QSGD and int8 (`quantized.py`; QSGD's values packed at ceil(log2(2 levels + 1))
bits); the shared all-gather exchange and error feedback are in `exchange.py`. `ratio` and `rank`
may be tuples, a population's values: the reducer is built for the largest and each member reads
its own from hparams (`options.RATIO`, `options.RANK`), as `config.population` sets them.
comm_state (one device's; the step stacks it over devices) holds the
error-feedback residuals (float32, shaped like the params) and, for PowerSGD, the step count and
each matrix's warm-started Q. Stats: `comm_bytes` (payload of every array this device hands to a
collective, indices included) and `comm_bytes_uncompressed` (the plain all-reduce's).
"""

from __future__ import annotations

from typing import Any

from jaxopt_lab.core.step import Reducer, pmean_reducer
from jaxopt_lab.techniques.compress.exchange import Codec, ResidualState, elementwise_reducer
from jaxopt_lab.techniques.compress.options import (
    DEFAULT_MIN_SIZE,
    METHODS,
    CompressOptions,
    compress_options,
    compression_record,
)
from jaxopt_lab.techniques.compress.powersgd import PowerSGDState, powersgd
from jaxopt_lab.techniques.compress.quantized import int8, qsgd
from jaxopt_lab.techniques.compress.sign import signsgd
from jaxopt_lab.techniques.compress.sparse import randomk, topk

__all__ = ["DEFAULT_MIN_SIZE", "METHODS", "Codec", "CompressOptions", "PowerSGDState",
           "ResidualState", "allreduce", "compress_options", "compression_record", "elementwise_reducer", "int8",
           "make_reducer", "powersgd", "qsgd", "randomk", "signsgd", "topk"]

def allreduce() -> Reducer:
    """The plain mean (`core.step.pmean_reducer`); it reports the same stats as the
    compressors, so a comparison reads one pair of keys."""
    return pmean_reducer()


def make_reducer(method: str = "none", **options: Any) -> Reducer:
    """The Reducer `method` names, from `CompressOptions` fields (those that do not apply to the
    method are checked and ignored, so a config block can carry them all).

    >>> make_reducer("powersgd", rank=4, start_step=0).init({})
    PowerSGDState(step=Array(0, dtype=int32), residual={}, q=())
    """
    o = compress_options(method=method, **options)
    ef = o.feeds_back_error
    if o.method == "none":
        return allreduce()
    if o.method == "topk":
        return topk(o.ratio, error_feedback=ef, min_size=o.min_size)
    if o.method == "randomk":
        return randomk(o.ratio, error_feedback=ef, min_size=o.min_size)
    if o.method == "powersgd":
        return powersgd(o.rank, start_step=o.start_step, error_feedback=ef, min_size=o.min_size)
    if o.method == "signsgd":
        return signsgd(error_feedback=ef, min_size=o.min_size)
    if o.method == "qsgd":
        return qsgd(o.levels, error_feedback=ef, min_size=o.min_size)
    return int8(error_feedback=ef, min_size=o.min_size)
