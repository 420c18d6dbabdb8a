"""Pruning options: one checked, frozen record of what to prune, how, and when.

Every check happens here, before anything traces, so a bad option is one line naming it (the
config path prefixes it with `techniques.prune.`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jaxopt_lab.core.layers import check_patterns
from jaxopt_lab.errors import UserError
from jaxopt_lab.importpath import is_import_path

METHODS = ("magnitude", "random", "snip", "set", "rigl", "ste")
SPARSE_TRAINING = ("set", "rigl")  # drop and regrow at a fixed sparsity
SCOPES = ("layer", "global")
DISTRIBUTIONS = ("uniform", "erk")
SCHEDULES = ("one_shot", "gradual")
NORMS = ("l1", "l2")
_N_OF_M = re.compile(r"^(\d+):(\d+)$")


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    """What `prune.wrap` does (see its docstring for each field)."""

    method: str = "magnitude"
    pattern: str = "unstructured"  # unstructured | "N:M" (e.g. "2:4") | channels
    scope: str = "layer"
    distribution: str = "uniform"
    sparsity: float = 0.9
    schedule: str = "gradual"
    initial_sparsity: float = 0.0
    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    drop_fraction: float = 0.3
    norm: str = "l1"
    skip: tuple[str, ...] | None = None

    @property
    def n_of_m(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern: N weights kept in every M along the input."""
        match = _N_OF_M.match(self.pattern)
        return (int(match[1]), int(match[2])) if match else None

    def describe(self) -> dict[str, Any]:
        """The options as summary.json records them."""
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


def prune_options(**options: Any) -> PruneOptions:
    """Checked options; an unknown name or bad value is a UserError naming it."""
    fields = {f.name for f in dataclasses.fields(PruneOptions)}
    for key in options:
        if key not in fields:
            raise UserError(f"prune option {key!r} is unknown; allowed: {', '.join(sorted(fields))}")
    if isinstance(options.get("skip"), list):
        options["skip"] = tuple(options["skip"])
    o = PruneOptions(**options)
    if not is_import_path(o.method):  # "module:function": a score of your own (transform.py)
        _choice("method", o.method, METHODS)
    _choice("scope", o.scope, SCOPES)
    _choice("distribution", o.distribution, DISTRIBUTIONS)
    _choice("schedule", o.schedule, SCHEDULES)
    _choice("norm", o.norm, NORMS)
    if o.pattern not in ("unstructured", "channels") and o.n_of_m is None:
        raise UserError(f"prune pattern={o.pattern!r} is unknown; allowed: unstructured, "
                        "channels, or N:M such as 2:4")
    if o.n_of_m is not None:
        n, m = o.n_of_m
        if not 0 < n < m:
            raise UserError(f"prune pattern={o.pattern!r} needs 0 < N < M")
    for name in ("sparsity", "initial_sparsity", "drop_fraction"):
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise UserError(f"prune {name}={value!r} must be a number in [0, 1)")
    for name in ("begin_step", "end_step", "frequency"):
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"prune {name}={value!r} must be an integer >= 0")
    if o.frequency < 1:
        raise UserError(f"prune frequency={o.frequency} must be >= 1")
    if o.schedule == "gradual" and o.end_step <= o.begin_step:
        raise UserError(f"prune end_step={o.end_step} must be after begin_step={o.begin_step} "
                        "for the gradual schedule")
    if o.schedule == "gradual" and o.initial_sparsity > o.sparsity:
        raise UserError(f"prune initial_sparsity={o.initial_sparsity} is above "
                        f"sparsity={o.sparsity}")
    _check_combination(o)
    check_patterns("prune skip", o.skip, "the first and last layers")
    return o


def _check_combination(o: PruneOptions) -> None:
    """Combinations that would silently mean something else are refused."""
    if is_import_path(o.method) and o.pattern == "channels":
        raise UserError(f"prune method={o.method!r}: a score of your own ranks single weights; "
                        "pattern='channels' ranks filters by their norm: use unstructured or N:M")
    if o.method in SPARSE_TRAINING and o.pattern != "unstructured":
        raise UserError(f"prune method={o.method!r} drops and regrows single weights; "
                        f"pattern={o.pattern!r} needs magnitude, random, snip or ste")
    if o.method in SPARSE_TRAINING and o.schedule != "one_shot":
        raise UserError(f"prune method={o.method!r} trains at a fixed sparsity from begin_step "
                        "(its topology changes every `frequency` steps until end_step); "
                        "use schedule=one_shot")
    if o.n_of_m is not None and o.schedule != "one_shot":
        raise UserError(f"prune pattern={o.pattern!r} fixes the sparsity at 1 - N/M; "
                        "use schedule=one_shot")
    if o.scope == "global" and o.pattern != "unstructured":
        raise UserError(f"prune scope='global' ranks single weights across layers; "
                        f"pattern={o.pattern!r} is layer-wise: use scope=layer")
    if o.scope == "global" and o.distribution != "uniform":
        raise UserError("prune distribution='erk' sets per-layer sparsities; scope='global' "
                        "ranks across layers instead: use one or the other")
    if o.distribution == "erk" and o.pattern != "unstructured":
        raise UserError(f"prune distribution='erk' applies to unstructured sparsity, not "
                        f"pattern={o.pattern!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"prune {name}={value!r} is unknown; allowed: {', '.join(allowed)}")
