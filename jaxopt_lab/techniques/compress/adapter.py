"""Gradient compression in a composed experiment: the `techniques.compress` block and its
adapter. The block is `CompressOptions` as it is; `method="none"` is the exact all-reduce."""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.compress import compression_record, make_reducer
from jaxopt_lab.techniques.compress.options import CompressOptions, compress_options
from jaxopt_lab.techniques.contract import Parts, Technique


def check(config: ml_collections.ConfigDict) -> CompressOptions | None:
    """The block's options (checked), or None where gradients go uncompressed."""
    options = compress_options(**TECHNIQUE.block(config))
    if options.method != "none" and config.train.shard_params:
        raise UserError(f"techniques.compress.method={options.method!r} cannot reduce sharded "
                        "gradients (train.shard_params=True): a compressor exchanges whole "
                        "tensors; set one of them off")
    return None if options.method == "none" else options


def apply(parts: Parts, options: CompressOptions) -> Parts:
    """A compressing reducer at the communication seam."""
    if parts.caller_reducer:
        raise UserError(f"techniques.compress.method={options.method!r}, but you passed a "
                        "reducer of your own: set the method to none, or pass its reducer")
    return dataclasses.replace(parts, reducer=make_reducer(**dataclasses.asdict(options)),
                               record={**parts.record, "compress": options.describe()})


def recognise(parts: Parts) -> Parts | None:
    """A compressing reducer the caller passed (`compress.topk(...)`, ...)."""
    record = compression_record(parts.reducer) if parts.reducer is not None else None
    if record is None:
        return None
    return dataclasses.replace(parts, record={**parts.record, "compress": record})


TECHNIQUE = Technique(name="compress", options=CompressOptions, check=check, apply=apply,
                      seam="communication", recognise=recognise)
