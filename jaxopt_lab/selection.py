"""Choosing a "best" (a method, a variant, a candidate) on validation figures only.

A best picked by its test accuracy overstates that accuracy: the test set took part in the choice.
Every choice of a best in jaxopt_lab and in experiments/ goes through `choose`, which refuses a
metric that is not a validation figure; the chosen row's test figures are then only reported.
tests/test_selection.py scans the code for choices made any other way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

VALIDATION = "validation_"
SLACK = 1e-9  # a bound is met within float rounding: rounding must not decide a choice

Row = TypeVar("Row", bound=Mapping)


def figure(row: Mapping, name: str) -> float:
    """`row[name]` as a number: a mean where it is a summary over seeds ({"mean": ...})."""
    value = row[name]
    return float(value["mean"]) if isinstance(value, Mapping) else float(value)


def choose(rows: Sequence[Row], metric: str, *, maximize: bool = True,
           at_least: float | None = None, prefer: str | Callable[[Row], float] | None = None,
           ) -> Row | None:
    """The row with the best validation `metric` (the first of equals).

    With `at_least`, the rows whose metric reaches it (within `SLACK`) are admissible, and among
    them the one with the largest `prefer` (a property of the model itself, such as its size
    ratio or speed-up, never a split's figure) is chosen; None when no row is admissible.
    """
    if not metric.startswith(VALIDATION):
        raise ValueError(f"choose: {metric!r} is not a validation figure: a best is chosen on "
                         f"the validation split (a {VALIDATION}* metric), never on test or train")
    if isinstance(prefer, str) and names_a_split(prefer):
        raise ValueError(f"choose: prefer={prefer!r} names a split's figure; prefer a property "
                         "of the model (its size, its speed)")
    if not rows:
        raise ValueError("choose: no rows to choose from")
    if at_least is not None and prefer is None:
        raise ValueError("choose: at_least needs prefer (what to maximise among the rows that "
                         "reach it)")
    if at_least is None:
        sign = 1.0 if maximize else -1.0
        return max(rows, key=lambda row: sign * figure(row, metric))
    admissible = [row for row in rows if figure(row, metric) >= at_least - SLACK]
    if not admissible:
        return None
    key = prefer if callable(prefer) else (lambda row: figure(row, prefer))
    return max(admissible, key=key)


def names_a_split(name: str) -> bool:
    """Whether `name` is a figure measured on a held-out split (test_accuracy, validation_loss)."""
    return any(part in ("test", "validation") for part in name.split("_"))
