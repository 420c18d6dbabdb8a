"""Search spaces over config keys: how a sweep config writes them, checks them, and how a trial
samples one point of them.

A dimension is a plain 4-tuple, so it survives config.json: (key, kind, spec, when) with kind one
of `KINDS`, spec (low, high) or the choices, and when () or (another key, (its values...)): the
dimension exists only where that earlier categorical key took one of those values (warm-up steps
only for a schedule that warms up). Build them with the functions below:

    config.sweep.space = (log_uniform("optim.lr", 1e-4, 1e-1), *schedule_family(),
                          categorical("data.batch_size", (32, 64, 128)))
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import optuna

from jaxopt_lab.compose.config import validate
from jaxopt_lab.core.keys import get_key, set_key
from jaxopt_lab.errors import UserError

KINDS = ("uniform", "log_uniform", "int", "log_int", "categorical")
Dimension = tuple[str, str, tuple, tuple]


def _when(when: Mapping[str, Sequence] | None) -> tuple:
    if not when:
        return ()
    ((key, values),) = when.items()
    return (key, tuple(values))


def uniform(key: str, low: float, high: float, when=None) -> Dimension:
    return (key, "uniform", (low, high), _when(when))


def log_uniform(key: str, low: float, high: float, when=None) -> Dimension:
    return (key, "log_uniform", (low, high), _when(when))


def integer(key: str, low: int, high: int, log: bool = False, when=None) -> Dimension:
    return (key, "log_int" if log else "int", (low, high), _when(when))


def categorical(key: str, choices: Sequence, when=None) -> Dimension:
    return (key, "categorical", tuple(choices), _when(when))


def schedule_family(schedules: Sequence[str] = ("constant", "cosine", "warmup_cosine",
                                                "one_cycle"),
                    warmup: tuple[int, int] = (10, 500),
                    plateau_patience: tuple[int, int] = (2, 20)) -> tuple[Dimension, ...]:
    """The learning-rate schedule as a categorical dimension, with each schedule's own keys
    conditional on it (warm-up steps only for warmup_cosine, patience only for
    reduce_on_plateau)."""
    dims = [categorical("optim.schedule", schedules)]
    if "warmup_cosine" in schedules:
        dims.append(integer("optim.warmup_steps", *warmup,
                            when={"optim.schedule": ("warmup_cosine",)}))
    if "reduce_on_plateau" in schedules:
        dims.append(integer("optim.plateau_patience", *plateau_patience,
                            when={"optim.schedule": ("reduce_on_plateau",)}))
    return tuple(dims)


def dimensions(space: Sequence) -> list[Dimension]:
    """The space's dimensions as tuples (config.json gives lists back), shape-checked."""
    dims = []
    for entry in space:
        if not isinstance(entry, (tuple, list)) or len(entry) != 4 or not isinstance(
                entry[0], str) or entry[1] not in KINDS:
            raise UserError(f"sweep.space entry {entry!r} is not a dimension: build it with "
                            f"jaxopt_lab.tune.space ({', '.join(KINDS)})")
        key, kind, spec, when = entry
        dims.append((key, kind, tuple(_hashable(v) for v in spec),
                     (when[0], tuple(when[1])) if when else ()))
    return dims


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def config_value(config: ml_collections.ConfigDict, key: str) -> Any:
    """The value at a dotted key; one line naming the key if it is missing or a block."""
    try:
        node = get_key(config, key)
    except KeyError:
        raise UserError(f"sweep.space key {key!r} is not a config key") from None
    if isinstance(node, ml_collections.ConfigDict):
        raise UserError(f"sweep.space key {key!r} is a block, not a value")
    return node


def check_space(config: ml_collections.ConfigDict) -> list[Dimension]:
    """Every dimension checked against the config before any trial runs: the key exists, the
    range is non-empty (log ranges positive), the kind fits the key's type, a condition names an
    earlier categorical, and each bound or choice makes a valid config.

    Raises:
      UserError: one line naming the dimension.
    """
    dims = dimensions(config.sweep.space)
    if not dims:
        raise UserError("sweep.space is empty: nothing to search (see jaxopt_lab/tune/space.py)")
    _check_warmup_range(config, dims)
    seen: dict[str, Dimension] = {}
    for key, kind, spec, when in dims:
        if key in seen:
            raise UserError(f"sweep.space names {key!r} twice")
        if key in ("sweep", "population") or key.startswith(("sweep.", "population")):
            raise UserError(f"sweep.space key {key!r}: a sweep cannot search its own settings")
        current = config_value(config, key)
        if kind == "categorical":
            if not spec:
                raise UserError(f"sweep.space {key!r}: no choices")
        else:
            if len(spec) != 2 or not all(isinstance(v, (int, float)) for v in spec):
                raise UserError(f"sweep.space {key!r}: {kind} needs (low, high), got {spec!r}")
            low, high = spec
            if not low < high:
                raise UserError(f"sweep.space {key!r}: empty range [{low}, {high}]")
            if kind.startswith("log") and low <= 0:
                raise UserError(f"sweep.space {key!r}: a log range needs low > 0, got {low}")
            if kind in ("int", "log_int") and not all(isinstance(v, int) for v in spec):
                raise UserError(f"sweep.space {key!r}: an int range needs int bounds, got {spec}")
            if isinstance(current, (bool, str, tuple)) or (
                    isinstance(current, int) and kind in ("uniform", "log_uniform")):
                raise UserError(f"sweep.space {key!r} holds {type(current).__name__} values; "
                                f"a {kind} range does not fit (use categorical)")
        if when:
            parent = seen.get(when[0])
            if parent is None or parent[1] != "categorical":
                raise UserError(f"sweep.space {key!r}: its condition names {when[0]!r}, which "
                                "is not an earlier categorical dimension")
            if unknown := set(when[1]) - set(parent[2]):
                raise UserError(f"sweep.space {key!r}: condition values {sorted(unknown)} are "
                                f"not choices of {when[0]!r}")
        seen[key] = (key, kind, spec, when)
        for value in spec:  # each bound or choice
            _check_value(config, key, value)
    return dims


def _check_warmup_range(config: ml_collections.ConfigDict, dims: Sequence[Dimension]) -> None:
    """A warm-up the space can sample longer than train.steps is refused before any trial: such
    a trial never reaches optim.lr (a config's own value only gets a warning, but a sampler
    would learn from values that never warmed up). Where train.steps is swept too, each
    trial is checked (`trials.job_config`)."""
    by_key = {d[0]: d for d in dims}
    warmup, schedule = by_key.get("optim.warmup_steps"), by_key.get("optim.schedule")
    if warmup is None or "train.steps" in by_key:
        return
    schedules = schedule[2] if schedule and schedule[1] == "categorical" else ()
    if config.optim.schedule != "warmup_cosine" and "warmup_cosine" not in schedules:
        return
    numbers = [v for v in warmup[2] if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numbers and max(numbers) > config.train.steps:
        raise UserError(f"sweep.space 'optim.warmup_steps' reaches {max(numbers)}, more than "
                        f"train.steps={config.train.steps}: a trial would never reach optim.lr; "
                        "lower its high")


def _check_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    try:
        validate(apply(config, {key: value}))
    except UserError as e:
        raise UserError(f"sweep.space {key!r}={value!r}: {e}") from None


def _encode(value: Any) -> Any:
    """Optuna's categorical choices are scalars: a tuple choice (model.channels) goes as text."""
    return repr(tuple(value)) if isinstance(value, (tuple, list)) else value


def decode(key: str, value: Any, config: ml_collections.ConfigDict) -> Any:
    """A trial's param back to its config value (a tuple choice from its text)."""
    if isinstance(value, str) and not isinstance(config_value(config, key), str):
        return ast.literal_eval(value)  # model.channels: 25 in the config, "(16, 32, 64)" here
    return value


def suggest(trial: optuna.Trial, dims: Sequence[Dimension]) -> dict[str, Any]:
    """One point of the space, define-by-run: a conditional dimension only where it applies."""
    values: dict[str, Any] = {}
    for key, kind, spec, when in dims:
        if when and values.get(when[0]) not in {_encode(v) for v in when[1]}:
            continue
        if kind == "categorical":
            values[key] = trial.suggest_categorical(key, [_encode(v) for v in spec])
        elif kind in ("int", "log_int"):
            values[key] = trial.suggest_int(key, spec[0], spec[1], log=kind == "log_int")
        else:
            values[key] = trial.suggest_float(key, spec[0], spec[1], log=kind == "log_uniform")
    return values


def grid(dims: Sequence[Dimension]) -> dict[str, list]:
    """The grid sampler's search space: categorical and int dimensions only (every value of an
    int range); a float range has no grid."""
    space = {}
    for key, kind, spec, _ in dims:
        if kind == "categorical":
            space[key] = [_encode(v) for v in spec]
        elif kind == "int":
            space[key] = list(range(spec[0], spec[1] + 1))
        else:
            raise UserError(f"sweep.sampler='grid' needs categorical or int dimensions; "
                            f"{key!r} is {kind} (list its values with categorical)")
    return space


def apply(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with each key set (params as a trial holds them); a value may change
    its key's type (model.channels: an int or one width per conv)."""
    tree = config.to_dict()
    for key, value in values.items():
        set_key(tree, key, decode(key, value, config), convert=_int_to_float)
    return ml_collections.ConfigDict(tree)


def _int_to_float(old: Any, value: Any) -> Any:
    """An int where the config holds a float becomes a float (an int range over a float key)."""
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
