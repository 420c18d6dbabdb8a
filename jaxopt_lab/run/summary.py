"""What summary.json says of a finished run beyond its evaluation: the model's measurements,
the techniques' own counts from the final state, the bytes its gradients cost, and a population's
best member. The loop's `_finish` assembles them."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxopt_lab.core.measure import measure_model
from jaxopt_lab.core.metrics import read_metrics
from jaxopt_lab.core.state import model_params, sample_input
from jaxopt_lab.selection import choose


def state_fields(run) -> tuple[dict, list[dict]]:
    """(`measurements` where train.measure asks, on the chief process, else {};
    `state_summaries`), from one host copy of the final state. Every process calls it: sharded
    parameters (train.shard_params) are gathered from all of them."""
    measure = run.config.train.measure
    if run.experiment.state_summary is None and not measure:
        return {}, state_summaries(run, None)
    # The measurements read only the model's variables: the optimizer state stays on the devices.
    state = run.state if run.experiment.state_summary else run.state.replace(opt_state=None)
    host = jax.tree.map(_host_copy, state)
    measured = measurements(run, host) if measure and jax.process_index() == 0 else {}
    return measured, state_summaries(run, host)


def _host_copy(a: jax.Array) -> np.ndarray:
    if a.sharding.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def measurements(run, host) -> dict:
    """model_bytes, FLOPs per example and latency of one model (a population's members share
    shapes) on this process's first device, from the host copy of the state."""
    state = jax.tree.map(lambda a: a[0], host) if run.members else host
    variables = {"params": model_params(state.params), **state.model_state}
    return measure_model(run.experiment.model, variables, sample_input(run.dataset))


def state_summaries(run, host) -> list[dict]:
    """The techniques' summary fields (sparsity, ...), one dict per member (one for a run)."""
    if run.experiment.state_summary is None:
        return [{} for _ in run.members or [None]]
    if not run.members:
        return [run.experiment.state_summary(host)]
    return [run.experiment.state_summary(jax.tree.map(lambda a, i=i: a[i], host))
            for i in range(len(run.members))]


def communication(workdir: str, members: int = 1) -> list[dict]:
    """comm_bytes_per_step (the mean over the run's logged steps, per device) and comm_ratio
    (the exact all-reduce's bytes over those), from metrics.jsonl: one dict per member of a
    population (a compressor's ratio or rank may differ between them), one for a run."""
    records = [r for r in read_metrics(workdir) if "comm_bytes" in r]
    return [_communication([r for r in records if r.get("member", 0) == member])
            for member in range(members)]


def _communication(records: list[dict]) -> dict:
    if not records:
        return {}
    steps = np.diff([0] + [r["step"] for r in records])
    sent = float(np.dot(steps, [r["comm_bytes"] for r in records]) / steps.sum())
    summary = {"comm_bytes_per_step": sent}
    if all("comm_bytes_uncompressed" in r for r in records) and sent > 0:
        full = float(np.dot(steps, [r["comm_bytes_uncompressed"] for r in records]) / steps.sum())
        summary["comm_ratio"] = full / sent
    return summary


def best_member(members: list[dict]) -> int | None:
    """The member with the lowest validation loss: selection is on validation, never on test."""
    rows = [{"index": i, "validation_loss": m["validation_loss"]} for i, m in enumerate(members)
            if not math.isnan(m.get("validation_loss", math.nan))]
    return choose(rows, "validation_loss", maximize=False)["index"] if rows else None
