"""Gradient compression in a composed experiment: the `techniques.compress` block and its
adapter. The block is `CompressOptions` as it is; `method="none"` is the exact all-reduce.

A population may vary `techniques.compress.ratio` (top-k, random-k) and `.rank` (PowerSGD):
the reducer is built for all the population's values and each member reads its own from its
hparams (`options.RATIO`, `options.RANK`), which `config.population` sets like any other."""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.compress import compression_record, make_reducer
from jaxopt_lab.techniques.compress.options import (
    PER_MEMBER,
    CompressOptions,
    check_option,
    compress_options,
)
from jaxopt_lab.techniques.contract import Parts, Technique

PREFIX = "techniques.compress."


def per_member(config: ml_collections.ConfigDict, method: str) -> dict[str, tuple]:
    """{option: the population's distinct values} of the compression options
    `config.population` varies, each checked; {} where it varies none.

    Raises:
      UserError: an option that sets the compressor's shapes for every member alike, or one
        that `method` does not read.
    """
    allowed = "; ".join(f"{PREFIX}{k} ({', '.join(v)})" for k, v in PER_MEMBER.items())
    values = {}
    for key, column in config.population:
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        if name not in PER_MEMBER:
            raise UserError(f"population varies {key}, which is one value for every member; a "
                            f"population may vary {allowed}")
        if method not in PER_MEMBER[name]:
            raise UserError(f"population varies {key}, which {PREFIX}method={method!r} does not "
                            f"use; a population may vary {allowed}")
        for value in column:
            check_option(name, value)
        values[name] = tuple(dict.fromkeys(column))
    return values


def check(config: ml_collections.ConfigDict) -> CompressOptions | None:
    """The block's options (checked), or None where gradients go uncompressed."""
    options = compress_options(**TECHNIQUE.block(config))
    if options.method != "none" and config.train.shard_params:
        raise UserError(f"techniques.compress.method={options.method!r} cannot reduce sharded "
                        "gradients (train.shard_params=True): a compressor exchanges whole "
                        "tensors; set one of them off")
    if options.method == "none":  # a population's ratio or rank then is no per-trial value
        return None  # (refused where members are made, unless a reducer passed in reads it)
    per_member(config, options.method)
    return options


def apply(parts: Parts, options: CompressOptions) -> Parts:
    """A compressing reducer at the communication seam; the options a population varies go
    into hparams, one value per member."""
    if parts.caller_reducer:
        raise UserError(f"techniques.compress.method={options.method!r}, but you passed a "
                        "reducer of your own: set the method to none, or pass its reducer")
    varied = per_member(parts.config, options.method)
    built = dataclasses.replace(options, **varied)
    hparams = {PREFIX + name: values[0] for name, values in varied.items()}
    return dataclasses.replace(parts, reducer=make_reducer(**dataclasses.asdict(built)),
                               hparams={**parts.hparams, **hparams},
                               record={**parts.record, "compress": built.describe()})


def recognise(parts: Parts) -> Parts | None:
    """A compressing reducer the caller passed (`compress.topk(...)`, ...)."""
    record = compression_record(parts.reducer) if parts.reducer is not None else None
    if record is None:
        return None
    return dataclasses.replace(parts, record={**parts.record, "compress": record})


TECHNIQUE = Technique(name="compress", options=CompressOptions, check=check, apply=apply,
                      seam="communication", recognise=recognise)
