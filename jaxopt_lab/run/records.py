"""What the training loop writes for each log window: one record per run or population member
(loss and metrics averaged over the window's steps), checked for divergence."""

from __future__ import annotations

import sys

import jax
import numpy as np

from jaxopt_lab.core.feed import NO_STEP
from jaxopt_lab.core.metrics import MetricsWriter
from jaxopt_lab.errors import UserError


class TrainingDiverged(UserError):
    """The loss or the parameters became NaN/inf; the last good checkpoint is kept."""


def window_records(run, window: dict, step: int, last_good: str) -> list[dict | None]:
    """The window's records: one for a run, one per member of a population (`run.members`).

    Raises:
      TrainingDiverged: the run's loss or gradients became non-finite, or every member stopped.
    """
    if run.members:
        return _population_records(run, window, step, last_good)
    return [_single_record(window, last_good)]


def write_records(writer: MetricsWriter, bar, step: int, records: list[dict | None], rate: float,
                  evaluations: list[dict], evaluated: bool, population: bool) -> None:
    """Each record with the window's rate (and, where `evaluated`, its member's evaluation) to
    metrics.jsonl and TensorBoard; the progress bar's postfix."""
    for member, record in enumerate(records):
        if record is not None:
            record["steps_per_s"] = rate
            record.update(evaluations[member] if evaluated else {})
            writer.write(step, record, member=member if population else None)
    bar.set_postfix(_postfix(records, evaluations))


def _single_record(window: dict, last_good: str) -> dict:
    if window["first_nonfinite"] != NO_STEP:
        raise TrainingDiverged(f"loss or gradients became non-finite at step "
                               f"{window['first_nonfinite']}; stopped. Last good checkpoint: "
                               f"{last_good}")
    return {k: float(v) / int(window["count"]) for k, v in window["sums"].items()}


def _population_records(run, window: dict, step: int, last_good: str) -> list[dict | None]:
    """One record per member (None for a member stopped for the whole window); a member that
    diverged is reported once and stays stopped at its last good state."""
    active = np.asarray(jax.device_get(run.carry.active))
    for member, bad_step in enumerate(window["first_nonfinite"]):
        if bad_step != NO_STEP:
            print(f"population member {member} {run.members[member]}: loss or gradients became "
                  f"non-finite at step {bad_step}; it stays at its last good state, the others "
                  "go on", file=sys.stderr)
    if not active.any():
        raise TrainingDiverged(f"every member of the population has stopped by step {step}. "
                               f"Last good checkpoint: {last_good}")
    records = []
    for member, count in enumerate(window["count"]):
        if count == 0:
            records.append(None)
            continue
        record = {k: float(v[member]) / int(count) for k, v in window["sums"].items()}
        records.append({**record, "active": bool(active[member])})
    return records


def _postfix(records: list[dict | None], evaluations: list[dict]) -> dict:
    """The progress bar's: the first member's loss and its main evaluation metric."""
    first = next((r for r in records if r is not None), None)
    postfix = {"loss": f"{first['loss']:.4f}"} if first else {}
    if evaluations:
        split = "validation" if any(k.startswith("validation_") for k in evaluations[0]) else "test"
        for name in ("accuracy", "bits_per_char", "mse", "loss"):
            if f"{split}_{name}" in evaluations[0]:
                postfix[f"{split[:3]}_{name}"] = f"{evaluations[0][f'{split}_{name}']:.4f}"
                break
    return postfix
