"""Compression options: one checked, frozen record of which compressor to use and its values.

Every check happens here, before anything traces, so a bad option is one line naming it (the
config path prefixes it with `techniques.`). The factories (`topk`, `powersgd`, ...) run the same
checks on their own arguments, so the Python API fails the same way.

`ratio` and `rank` may differ between the members of a population (`config.population`): they
set array shapes (k, the factors' widths), so the reducer is built for the largest and each
member reads which of the values is its own from `hparams[RATIO]` / `hparams[RANK]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxopt_lab.errors import UserError

METHODS = ("none", "topk", "randomk", "powersgd", "signsgd", "qsgd", "int8")
DEFAULT_MIN_SIZE = 1024  # tensors with fewer elements are all-reduced as they are
# Error feedback is on by default for the biased compressors and off for the unbiased QSGD and
# the near-exact int8, as the papers run them.
UNBIASED = ("qsgd", "int8")
MAX_LEVELS = 2**15 - 1  # QSGD values are packed at ceil(log2(2 levels + 1)) <= 16 bits
RATIO, RANK = "techniques.compress.ratio", "techniques.compress.rank"  # per-member hparams
PER_MEMBER = {"ratio": ("topk", "randomk"), "rank": ("powersgd",)}  # option -> its methods


@dataclasses.dataclass(frozen=True)
class CompressOptions:
    """What `make_reducer` builds; fields that do not apply to `method` are ignored."""

    method: str = "none"  # one of METHODS
    # top-k / random-k: kept fraction of each tensor, in (0, 1]; from Python a tuple is a
    # population's ratios (each member reads its own from hparams[RATIO])
    ratio: float | tuple[float, ...] = 0.01
    rank: int | tuple[int, ...] = 2  # PowerSGD: rank of the approximation (a tuple: as ratio)
    start_step: int = 10  # PowerSGD: plain all-reduce for this many steps first
    levels: int = 16  # QSGD: quantization levels of |g| / ||g||_2
    error_feedback: bool | None = None  # None: the method's default (on, off for qsgd and int8)
    min_size: int = DEFAULT_MIN_SIZE  # tensors with fewer elements go uncompressed

    @property
    def feeds_back_error(self) -> bool:
        """error_feedback, with None resolved to the method's default."""
        if self.error_feedback is None:
            return self.method not in UNBIASED
        return self.error_feedback

    def describe(self) -> dict[str, Any]:
        """The options as summary.json records them (error feedback resolved)."""
        return {**dataclasses.asdict(self), "error_feedback": self.feeds_back_error}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_option(name: str, value: Any) -> None:
    """Raises a one-line UserError when `value` is not allowed for option `name` (ratio and rank
    may be a tuple of allowed values: a population's)."""
    if name in PER_MEMBER and isinstance(value, tuple) and value:
        for one in value:
            check_option(name, one)
    elif name == "method":
        if value not in METHODS:
            raise UserError(f"compress method={value!r} is unknown; allowed: {', '.join(METHODS)}")
    elif name == "ratio":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise UserError(f"compress ratio={value!r} must be a number in (0, 1]")
    elif name in ("rank", "levels"):
        top = MAX_LEVELS if name == "levels" else None
        if not _is_int(value) or value < 1 or (top is not None and value > top):
            limit = f" and at most {top}" if top else ""
            raise UserError(f"compress {name}={value!r} must be an integer >= 1{limit}")
    elif name in ("start_step", "min_size"):
        if not _is_int(value) or value < 0:
            raise UserError(f"compress {name}={value!r} must be an integer >= 0")
    elif name == "error_feedback":
        if value is not None and not isinstance(value, bool):
            raise UserError(f"compress error_feedback={value!r} must be true, false or None "
                            "(the method's default)")
    else:
        fields = ", ".join(f.name for f in dataclasses.fields(CompressOptions))
        raise UserError(f"compress option {name!r} is unknown; allowed: {fields}")


def check(**values: Any) -> None:
    """`check_option` for each of a factory's own arguments; there error_feedback is a bool."""
    for name, value in values.items():
        check_option(name, value)
        if name == "error_feedback" and not isinstance(value, bool):
            raise UserError(f"compress error_feedback={value!r} must be true or false")


def compress_options(**options: Any) -> CompressOptions:
    """Checked options; an unknown name or bad value is a UserError naming it."""
    for name, value in options.items():
        check_option(name, value)
    return CompressOptions(**options)


def described(reducer, method: str, **values: Any):
    """`reducer` carrying what summary.json records of it, on its reduce function, so a run
    given this reducer from Python records the compression it really does."""
    reducer.reduce.compress_record = CompressOptions(method=method, **values).describe()
    return reducer


def values_of(value) -> tuple:
    """A per-member option as the tuple of its values (one for a single run)."""
    return value if isinstance(value, tuple) else (value,)


def member_index(values: tuple, hparams: dict, key: str):
    """Which of `values` is this member's: 0 for a single value, else the index of the one
    nearest hparams[key] (a population sets it from these very values, so one equals it).

    Raises:
      UserError: several values but no hparams[key] to choose by.
    """
    if len(values) == 1:
        return 0
    if key not in hparams:
        raise UserError(f"a compressor built for the values {values} of {key} needs each "
                        f"member's own in hparams[{key!r}]: vary it in config.population")
    return jnp.argmin(jnp.abs(jnp.asarray(values, jnp.float32) - hparams[key]))


def compression_record(reducer) -> dict | None:
    """What a compressing reducer does, as summary.json records it; None for another one."""
    return getattr(reducer.reduce, "compress_record", None)
