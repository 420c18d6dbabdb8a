"""The training loop: `train_run(config, workdir)` trains one run directory.

workdir/config.json, run.json, metrics.jsonl, tensorboard/, checkpoints/, summary.json. Rerunning
on the same workdir resumes from the newest readable checkpoint. The host syncs with the devices
only at log, eval and checkpoint boundaries, so dispatch stays asynchronous in between.

Four stages: build (`run/build.py::build_run` and `run/training.py::prepare_training`), restore
(the newest checkpoint), run (the steps), finish (final evaluation, measurements, summary). A
population (`config.population`) goes through the same stages as one stacked state. Training a
distillation teacher first is a workflow above this loop (`jaxopt_lab.train_and_evaluate`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxopt_lab.compose import TECHNIQUES, with_data_recorded, with_model_recorded
from jaxopt_lab.core.accumulate import check_microbatches
from jaxopt_lab.core.callsize import CallSizeChooser
from jaxopt_lab.core.distributed import data_mesh, initialize_distributed
from jaxopt_lab.core.feed import (
    make_logged_train_fn,
    one_call_in_flight,
    shard_batch,
    zero_totals,
)
from jaxopt_lab.core.interrupt import StopSignals
from jaxopt_lab.core.measure import compiled_memory
from jaxopt_lab.core.metrics import MetricsWriter
from jaxopt_lab.core.population import stop_members
from jaxopt_lab.core.state import model_params
from jaxopt_lab.core.step import Reducer
from jaxopt_lab.core.tasks import EvalFn, LossFn
from jaxopt_lab.errors import UserError
from jaxopt_lab.models.float32_layers import precision_record
from jaxopt_lab.run.build import build_run, merge_splits
from jaxopt_lab.run.records import TrainingDiverged, window_records, write_records
from jaxopt_lab.run.rundir import check_workdir, record_run
from jaxopt_lab.run.summary import best_member, communication, state_fields
from jaxopt_lab.run.training import Training, prepare_training

# `stop_members(step, evaluations per member) -> members to stop`: a search's early stopping
# (for a single run, returning [0] ends the run there).
MemberStopper = Callable[[int, list[dict]], Sequence[int]]


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _build(config, workdir, *, model, until, **objects) -> Training:
    initialize_distributed()
    mesh = data_mesh()
    if config.data.batch_size % mesh.size:
        raise UserError(f"data.batch_size={config.data.batch_size} must be divisible by the "
                        f"{mesh.size} devices of the mesh")
    check_microbatches(config.data.batch_size // mesh.size, config.train.grad_accum_steps)
    if model is not None:
        config = with_model_recorded(config, model)
    if objects.get("dataset") is not None:
        config = with_data_recorded(config, objects["dataset"])
    check_workdir(workdir, config)
    run = build_run(config, model=model, **objects)
    if _simulates_communication(run) and jax.process_index() == 0:
        method = run.experiment.techniques["compress"].get("method")
        print(f"warning: techniques.compress ({method}) on 1 data-parallel device: nothing is "
              "communicated; it changes training as it would on several, and "
              "comm_bytes_per_step / comm_ratio are what each device would send (summary.json "
              "marks them comm_simulated)", file=sys.stderr)
    return prepare_training(run, workdir, until)


def _simulates_communication(run) -> bool:
    """A compressor on a mesh of one device: there is no one to send to."""
    return run.mesh.size == 1 and "compress" in run.experiment.techniques


def _restore(t: Training) -> None:
    """The newest checkpoint that loads (the step every process agreed on), said in one line on
    the chief; then config.json and run.json record this invocation.

    A checkpoint written on another number of data-parallel devices resumes with a fresh
    comm_state (one entry per device: a compressor's residuals cannot be split or merged), as
    one warning line says; everything else is restored.
    """
    is_chief = jax.process_index() == 0

    def comm_state_reset(saved: int, now: int) -> None:
        if is_chief:
            print(f"warning: the checkpoint's comm_state was written on {saved} data-parallel "
                  f"devices; re-initialised for {now}", file=sys.stderr)

    restored = t.checkpointer.restore(t.run.carry, data_iterator=t.streamed,
                                      on_device_count_change=comm_state_reset)
    if restored is not None:
        t.run.carry, t.resumed_from = restored
        if is_chief and t.resumed_from:  # step 0: a start written outside a run, not a resume
            print(f"resumed from step {t.resumed_from} ({t.checkpointer.directory})",
                  file=sys.stderr)
    if is_chief:
        record_run(t.workdir, t.run.config)


class _Caller:
    """Runs k steps per compiled call, summing their metrics into `totals` on the devices; each
    k compiles once (its memory read from that compilation)."""

    def __init__(self, t: Training):
        self.t, self.train_fns = t, {}
        self.streamed = t.streamed is not None
        self.one_in_flight = one_call_in_flight()
        config, mesh = t.run.config, t.run.mesh
        # The streamed feed's shape, for tracing: the first batch, as one step's stack.
        first = {n: v[:config.data.batch_size] for n, v in t.run.dataset.train.items()}
        one_call_source = (shard_batch({n: v[None] for n, v in first.items()}, mesh,
                                       leading_axes=1) if self.streamed else t.source)
        # Placed like the step's outputs, so the second call does not trace again.
        self.zeros = jax.device_put(
            zero_totals(t.step_fn, t.run.carry, one_call_source, self.streamed),
            NamedSharding(mesh, P()))

    def fresh_totals(self):  # the train function donates its totals: each window gets new ones
        return jax.tree.map(jnp.copy, self.zeros)

    def __call__(self, carry, totals, k: int):
        t = self.t
        source = t.streamed.next(k) if self.streamed else t.source
        if k not in self.train_fns:
            self.train_fns[k] = make_logged_train_fn(t.step_fn, k, self.streamed)
            # The compilation the call below reuses: its memory costs nothing more.
            t.step_memory = t.step_memory or compiled_memory(self.train_fns[k], carry, source,
                                                             totals)
        if self.one_in_flight:
            jax.block_until_ready(carry)
        return self.train_fns[k](carry, source, totals)


def _intervals(train: ml_collections.ConfigDict) -> tuple[tuple[str, int], ...]:
    return (("log", train.log_every), ("eval", train.eval_every),
            ("ckpt", train.checkpoint_every))


def _next_boundary(step: int, t: Training) -> int:
    """The first log, eval or checkpoint step after `step`, or the end."""
    intervals = _intervals(t.run.config.train)
    return min(t.until, *((step // every + 1) * every for _, every in intervals))


def _where_last_good(t: Training) -> str:
    last = t.checkpointer.latest_step()
    return f"step {last} in {t.checkpointer.directory}" if last is not None else "none"


_params_finite = jax.jit(lambda p: jnp.all(jnp.asarray(
    [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))


def _train(t: Training, stopper: MemberStopper | None) -> tuple[float, int]:
    """The steps from the restored one to train.steps; returns their wall time and number."""
    run, is_chief = t.run, jax.process_index() == 0
    writer = MetricsWriter(t.workdir, enabled=is_chief,
                           members=len(run.members) if run.members else None)
    writer.truncate_after(int(run.carry.step))
    total = t.until
    chooser = CallSizeChooser.for_config(run.config.train, int(run.carry.step), total)
    caller = _Caller(t)
    step = int(run.carry.step)
    start_step, start_time = step, time.perf_counter()
    t.last_eval = []
    totals = caller.fresh_totals()
    window_start = (step, time.perf_counter())
    with StopSignals(announce=is_chief) as signals:
        bar = tqdm(total=total, initial=step,
                   disable=not (is_chief and run.config.train.progress),
                   desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)
        try:
            boundary = _next_boundary(step, t)
            logged = None  # a log-only window, read once the next call is queued behind it
            while step < total:
                # The per-step path stays this short: on a small CPU, host work between
                # dispatches slows the steps themselves, not only the loop.
                k = chooser.next_k(step)
                run.carry, totals = caller(run.carry, totals, k)
                step += k
                chooser.after_call(step, run.carry)
                bar.update(k)
                if logged is not None:  # waits for the window's last call, not the queued one
                    window_start = _write_window(t, *logged, window_start, writer, bar)
                    logged = None
                if step < boundary:
                    continue
                boundary = _next_boundary(step, t)
                if _log_only(t, step, k) and not _any_process(bool(signals.received)):
                    logged, totals = (step, totals), caller.fresh_totals()
                    continue
                window, totals = jax.device_get(totals), caller.fresh_totals()
                now = time.perf_counter()
                rate = (step - window_start[0]) / (now - window_start[1])
                window_start = (step, now)
                _at_boundary(t, step, k, window, rate, writer, bar, signals, stopper)
                if t.stopped_at:
                    break
            t.call_size = chooser.summary()
            elapsed = time.perf_counter() - start_time
        finally:
            bar.close()
            t.checkpointer.close()
            writer.close()
    return elapsed, step - start_step


def _log_only(t: Training, step: int, k: int) -> bool:
    """Whether the boundary at `step` only logs: no evaluation, checkpoint or end of training."""
    train = t.run.config.train
    return step < t.until and all(step % every >= k for every in
                                  (train.eval_every, train.checkpoint_every))


def _write_window(t: Training, step: int, totals, window_start: tuple[int, float],
                  writer: MetricsWriter, bar) -> tuple[int, float]:
    """A log-only window's records, read after the next call was queued (the device keeps
    working meanwhile); returns the next window's start."""
    window = jax.device_get(totals)
    now = time.perf_counter()
    rate = (step - window_start[0]) / (now - window_start[1])
    records = window_records(t.run, window, step, _where_last_good(t))
    write_records(writer, bar, step, records, rate, t.last_eval, False, bool(t.run.members))
    return step, now


def _at_boundary(t: Training, step: int, k: int, window: dict, rate: float,
                 writer: MetricsWriter, bar, signals: StopSignals,
                 stopper: MemberStopper | None) -> None:
    """An evaluation, checkpoint, end or stop boundary: write the window's records, evaluate,
    stop members, save, and on a stop signal save and raise `Preempted`."""
    run, total = t.run, t.until
    at = {name: step % every < k or step == total
          for name, every in _intervals(run.config.train)}
    stop = _any_process(bool(signals.received))  # all processes stop at one step
    records = window_records(run, window, step, _where_last_good(t))
    if at["eval"]:
        t.last_eval = _evaluate(t)
        if stopper is not None and step < total:
            stopped = stopper(step, t.last_eval)
            if run.members:
                run.carry = stop_members(run.carry, stopped)
            elif stopped:
                t.stopped_at = step
    write_records(writer, bar, step, records, rate, t.last_eval, at["eval"], bool(run.members))
    if at["ckpt"] or stop or step == total or t.stopped_at:
        if not bool(_params_finite(run.state.params)):  # an overflowing update, say
            raise TrainingDiverged(f"parameters became non-finite by step {step}; stopped. "
                                   f"Last good checkpoint: {_where_last_good(t)}")
        t.checkpointer.save(step, run.carry, t.streamed)
    if stop and step < total:
        t.checkpointer.wait()
        signals.stop_if_received(f"checkpoint saved at step {step} in "
                                 f"{t.checkpointer.directory}; rerun the same command to resume")


def _evaluate(t: Training) -> list[dict]:
    """Every split's metrics, one dict per member (one in all for a single run)."""
    results = [evaluate(t.run.state) for evaluate in t.evaluators.values()]
    if not t.run.members:
        return [merge_splits(results)]
    return [merge_splits(split[m] for split in results) for m in range(len(t.run.members))]


def _finish(t: Training, train_wall_s: float, steps_run: int) -> dict:
    run = t.run
    evaluations = t.last_eval or _evaluate(t)
    num_params = sum(int(np.prod(x.shape[1:] if run.members else x.shape))
                     for x in jax.tree.leaves(model_params(run.state.params)))
    sent = communication(t.workdir, len(run.members) or 1)  # the first member's at the top
    summary = {
        "steps": int(run.carry.step), "train_wall_s": train_wall_s,
        "steps_per_s": steps_run / train_wall_s if train_wall_s > 0 else 0.0,
        "num_params": num_params, **t.call_size, "devices": run.mesh.size,
        "processes": jax.process_count(), "resumed_from": t.resumed_from,
        "backend": jax.default_backend(), "task": run.dataset.task,
        "techniques": run.experiment.techniques, **precision_record(run.experiment.model),
        **sent[0],
        "step_memory": t.step_memory,
        **({"initialized_from": run.initialized_from} if run.initialized_from else {}),
    }
    if t.stopped_at is not None:
        summary["stopped_at"] = t.stopped_at
    if _simulates_communication(run):  # multi-device summaries keep their keys
        summary["comm_simulated"] = True
    is_chief = jax.process_index() == 0
    measured, counted = state_fields(run)
    summary.update(measured)
    if run.members:
        active = np.asarray(jax.device_get(run.carry.active))
        summary["members"] = [{"values": values, "active": bool(active[i]), **evaluations[i],
                               **counted[i], **sent[i]}
                              for i, values in enumerate(run.members)]
        summary["best_member"] = best_member(summary["members"])
    else:
        summary = {**evaluations[0], **counted[0], **summary}
    if is_chief:
        with open(os.path.join(t.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    t.summary = summary
    return summary


def train_run(config: ml_collections.ConfigDict, workdir: str, *, model=None, dataset=None,
              loss_fn: LossFn | None = None, eval_fn: EvalFn | None = None,
              hparams: dict[str, float] | None = None, reducer: Reducer | None = None,
              tx=None, stop_members: MemberStopper | None = None, techniques=TECHNIQUES,
              until: int | None = None) -> Training:
    """Trains `config` in `workdir` (resuming if it holds a checkpoint) until step `until`
    (default train.steps); returns the finished `Training`: its run (the final state) and
    `summary`. (`jaxopt_lab.train_and_evaluate` is this, after training a distillation teacher
    first, returning the summary.)

    Arguments as `jaxopt_lab.train_and_evaluate` takes them (see there).
    """
    t = _build(config, workdir, model=model, dataset=dataset, loss_fn=loss_fn,
               eval_fn=eval_fn, hparams=hparams, reducer=reducer, tx=tx,
               techniques=techniques, until=until)
    _restore(t)
    train_wall_s, steps_run = _train(t, stop_members)
    _finish(t, train_wall_s, steps_run)
    return t
