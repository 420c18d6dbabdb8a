"""The training loop: `train_and_evaluate(config, workdir)` owns a run directory.

workdir/config.json, run.json, metrics.jsonl, tensorboard/, checkpoints/, summary.json. Rerunning
on the same workdir resumes from the newest readable checkpoint. The host syncs with the devices
only at log, eval and checkpoint boundaries, so dispatch stays asynchronous in between.

Four stages, each a function below: build (data, seams, state, feed), restore (the newest
checkpoint), run (the steps), finish (final evaluation, measurements, summary). A population
(`config.population`) goes through the same stages as one stacked state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxopt_lab.core.accumulate import check_microbatches
from jaxopt_lab.core.builder import (
    Experiment,
    build_experiment,
    data_seed,
    population_members,
    prepare_dataset,
    swept_keys,
    with_model_recorded,
)
from jaxopt_lab.core.callsize import CallSizeChooser
from jaxopt_lab.core.checkpoint import Checkpointer
from jaxopt_lab.core.distributed import data_mesh, initialize_distributed
from jaxopt_lab.core.evaluate import make_evaluator
from jaxopt_lab.core.feed import (
    NO_STEP,
    StreamedFeed,
    device_sampler,
    make_logged_train_fn,
    one_call_in_flight,
    replicate,
    sampled_step,
    shard_batch,
    zero_totals,
)
from jaxopt_lab.core.interrupt import Preempted, StopSignals
from jaxopt_lab.core.measure import compiled_memory
from jaxopt_lab.core.metrics import MetricsWriter
from jaxopt_lab.core.population import (
    population_init,
    population_step,
    stop_members,
)
from jaxopt_lab.core.rundir import check_workdir, record_run
from jaxopt_lab.core.state import init_sharded_state, model_params, sample_input
from jaxopt_lab.core.step import Reducer, make_train_step
from jaxopt_lab.core.summary import best_member, communication, state_fields
from jaxopt_lab.core.tasks import EvalFn, LossFn
from jaxopt_lab.data.pipeline import make_grain_loader
from jaxopt_lab.data.sources import Dataset
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.distill import train_teacher_first

# `stop_members(step, evaluations per member) -> members to stop`: a search's early stopping
# (for a single run, returning [0] ends the run there).
MemberStopper = Callable[[int, list[dict]], Sequence[int]]


class TrainingDiverged(UserError):
    """The loss or the parameters became NaN/inf; the last good checkpoint is kept."""


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


@dataclasses.dataclass
class _Run:
    """What the build stage makes for the others."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    dataset: Dataset
    experiment: Experiment
    members: list[dict]  # one dict of values per population member; [] for a single run
    carry: Any  # the TrainState, or a core.population.Population
    step_fn: Callable  # (carry, source) -> (carry, metrics)
    source: Any  # the on-device data, or None when streamed
    streamed: StreamedFeed | None
    evaluators: dict[str, Callable]  # split -> evaluate(state or stacked members)
    checkpointer: Checkpointer
    resumed_from: int | None = None
    call_size: dict = dataclasses.field(default_factory=lambda: {"steps_per_call": 1})
    step_memory: dict = dataclasses.field(default_factory=dict)  # compiled_memory of one call
    last_eval: list[dict] = dataclasses.field(default_factory=list)  # per member
    stopped_at: int | None = None  # a single run ended early by its stopper

    @property
    def state(self):
        """The TrainState, stacked over members for a population."""
        return self.carry.members if self.members else self.carry


def _build(config, workdir, *, model, dataset, loss_fn, eval_fn, hparams, reducer) -> _Run:
    initialize_distributed()
    mesh = data_mesh()
    if config.data.batch_size % mesh.size:
        raise UserError(f"data.batch_size={config.data.batch_size} must be divisible by the "
                        f"{mesh.size} devices of the mesh")
    check_microbatches(config.data.batch_size // mesh.size, config.train.grad_accum_steps)
    if model is not None:
        config = with_model_recorded(config, model)
    check_workdir(workdir, config)
    dataset = prepare_dataset(config, dataset)
    num_train = len(dataset.train["label"])
    if config.data.batch_size > num_train:
        raise UserError(f"data.batch_size={config.data.batch_size} exceeds the {num_train} "
                        f"training examples of {dataset.name}")
    experiment = build_experiment(config, dataset, model=model, loss_fn=loss_fn, eval_fn=eval_fn,
                                  hparams=hparams, reducer=reducer, swept=swept_keys(config))
    if experiment.train_data is not None:
        dataset = experiment.train_data(dataset)
    members = population_members(config, experiment)
    train_step = make_train_step(experiment.loss_fn, experiment.reducer, experiment.tx, mesh,
                                 experiment.state_metrics,
                                 grad_accum_steps=config.train.grad_accum_steps)
    sample_x = sample_input(dataset)
    configured_data_seed = config.data.seed if config.data.seed >= 0 else None
    if members:
        init, shardings = population_init(experiment, sample_x, mesh, members, seed=config.seed,
                                          data_seed=configured_data_seed)
        carry = jax.jit(init, out_shardings=shardings)()
    else:
        carry = init_sharded_state(experiment, sample_x, mesh, config.seed, configured_data_seed)

    if config.data.on_device:
        source, streamed = replicate(dataset.train, mesh), None
        sample = device_sampler(num_train, config.data.batch_size, mesh, config.data.shuffle)
    else:
        source, sample = None, None
        streamed = StreamedFeed(make_grain_loader(
            dataset.train, batch_size=config.data.batch_size // jax.process_count(),
            seed=data_seed(config), shard_index=jax.process_index(),
            shard_count=jax.process_count(), worker_count=config.data.workers,
            shuffle=config.data.shuffle), mesh, prefetch=config.data.prefetch)
    step_fn = sampled_step(train_step, sample)
    if members:
        step_fn = population_step(step_fn)

    splits = {"validation": dataset.validation, "test": dataset.test}
    evaluators = {split: make_evaluator(experiment.eval_fn, arrays, config.train.eval_batch_size,
                                        mesh, split, members=bool(members))
                  for split, arrays in splits.items() if arrays is not None}
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
    return _Run(config, workdir, mesh, dataset, experiment, members, carry, step_fn, source,
                streamed, evaluators, checkpointer)


def build_run(config: ml_collections.ConfigDict, workdir: str) -> _Run:
    """The build stage alone, for tools that time the step (`profile/`): the run's data, seams,
    initial state, step and feed, nothing trained or restored."""
    return _build(config, workdir, model=None, dataset=None, loss_fn=None, eval_fn=None,
                  hparams=None, reducer=None)


def _restore(run: _Run) -> None:
    """The newest checkpoint that loads; then config.json and run.json record this invocation."""
    restored = run.checkpointer.restore(run.carry, data_iterator=run.streamed)
    if restored is not None:
        run.carry, run.resumed_from = restored
    if jax.process_index() == 0:
        record_run(run.workdir, run.config)


def _train(run: _Run, stopper: MemberStopper | None) -> tuple[float, int]:
    """The steps from the restored one to train.steps; returns their wall time and number."""
    config, mesh, checkpointer = run.config, run.mesh, run.checkpointer
    is_chief = jax.process_index() == 0
    streamed = run.streamed is not None
    population = bool(run.members)
    writer = MetricsWriter(run.workdir, enabled=is_chief,
                           members=len(run.members) if population else None)
    writer.truncate_after(int(run.carry.step))
    total = config.train.steps

    # The streamed feed's shape, for tracing: the first batch, as one step's stack.
    first = {n: v[:config.data.batch_size] for n, v in run.dataset.train.items()}
    one_call_source = (shard_batch({n: v[None] for n, v in first.items()}, mesh, leading_axes=1)
                       if streamed else run.source)
    chooser = CallSizeChooser.for_config(config.train, int(run.carry.step))
    train_fns = {}

    one_in_flight = one_call_in_flight()

    def call(carry, totals, k):
        source = run.streamed.next(k) if streamed else run.source
        if k not in train_fns:
            train_fns[k] = make_logged_train_fn(run.step_fn, k, streamed)
            # The compilation the call below reuses: its memory costs nothing more.
            run.step_memory = run.step_memory or compiled_memory(train_fns[k], carry, source,
                                                                 totals)
        if one_in_flight:
            jax.block_until_ready(carry)
        return train_fns[k](carry, source, totals)

    # Placed like the step's outputs, so the second call does not trace again.
    zeros = jax.device_put(zero_totals(run.step_fn, run.carry, one_call_source, streamed),
                           NamedSharding(mesh, P()))

    def fresh_totals():  # the train function donates its totals: each window gets new buffers
        return jax.tree.map(jnp.copy, zeros)

    params_finite = jax.jit(lambda p: jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))

    def where_last_good() -> str:
        last = checkpointer.latest_step()
        return f"step {last} in {checkpointer.directory}" if last is not None else "none"

    intervals = (("log", config.train.log_every), ("eval", config.train.eval_every),
                 ("ckpt", config.train.checkpoint_every))

    def next_boundary(step: int) -> int:  # the first log, eval or checkpoint step after `step`
        return min(total, *((step // every + 1) * every for _, every in intervals))

    step = int(run.carry.step)
    start_step, start_time = step, time.perf_counter()
    run.last_eval = []
    totals = fresh_totals()
    window_start = (step, time.perf_counter())
    with StopSignals(announce=is_chief) as signals:
        bar = tqdm(total=total, initial=step, disable=not (is_chief and config.train.progress),
                   desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)
        try:
            boundary = next_boundary(step)
            while step < total:
                # The per-step path stays this short: on a small CPU, host work between
                # dispatches slows the steps themselves, not only the loop.
                k = chooser.next_k(step)
                run.carry, totals = call(run.carry, totals, k)
                step += k
                chooser.after_call(step, run.carry)
                bar.update(k)
                if step < boundary:
                    continue
                boundary = next_boundary(step)
                at = {name: step % every < k or step == total for name, every in intervals}
                stop = _any_process(bool(signals.received))  # all processes stop at one step
                window, totals = jax.device_get(totals), fresh_totals()
                now = time.perf_counter()
                rate = (step - window_start[0]) / (now - window_start[1])
                window_start = (step, now)
                records = (_population_records(run, window, step, where_last_good())
                           if population else [_single_record(window, where_last_good())])
                if at["eval"]:
                    run.last_eval = _evaluate(run)
                    if stopper is not None and step < total:
                        stopped = stopper(step, run.last_eval)
                        if population:
                            run.carry = stop_members(run.carry, stopped)
                        elif stopped:
                            run.stopped_at = step
                for member, record in enumerate(records):
                    if record is None:
                        continue
                    record["steps_per_s"] = rate
                    if at["eval"]:
                        record.update(run.last_eval[member])
                    writer.write(step, record, member=member if population else None)
                bar.set_postfix(_postfix(records, run.last_eval))
                if at["ckpt"] or stop or step == total or run.stopped_at:
                    if not bool(params_finite(run.state.params)):  # an overflowing update, say
                        raise TrainingDiverged(f"parameters became non-finite by step {step}; "
                                               f"stopped. Last good checkpoint: "
                                               f"{where_last_good()}")
                    checkpointer.save(step, run.carry, run.streamed)
                if stop and step < total:
                    checkpointer.wait()
                    signum = signals.received[0]
                    raise Preempted(f"{signal.Signals(signum).name}: checkpoint saved at step "
                                    f"{step} in {checkpointer.directory}; rerun the same command "
                                    "to resume", StopSignals.EXIT_CODES[signum])
                if run.stopped_at:
                    break
            run.call_size = chooser.summary()
            return time.perf_counter() - start_time, step - start_step
        finally:
            bar.close()
            checkpointer.close()
            writer.close()


def _single_record(window: dict, last_good: str) -> dict:
    if window["first_nonfinite"] != NO_STEP:
        raise TrainingDiverged(f"loss or gradients became non-finite at step "
                               f"{window['first_nonfinite']}; stopped. Last good checkpoint: "
                               f"{last_good}")
    return {k: float(v) / int(window["count"]) for k, v in window["sums"].items()}


def _population_records(run: _Run, window: dict, step: int, last_good: str) -> list[dict | None]:
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


def _evaluate(run: _Run) -> list[dict]:
    """Every split's metrics, one dict per member (one in all for a single run)."""
    results = {split: evaluate(run.state) for split, evaluate in run.evaluators.items()}
    if not run.members:
        return [{k: v for split in results.values() for k, v in split.items()}]
    return [{k: v for split in results.values() for k, v in split[m].items()}
            for m in range(len(run.members))]


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


def _finish(run: _Run, train_wall_s: float, steps_run: int) -> dict:
    evaluations = run.last_eval or _evaluate(run)
    num_params = sum(int(np.prod(x.shape[1:] if run.members else x.shape))
                     for x in jax.tree.leaves(model_params(run.state.params)))
    summary = {
        "steps": int(run.carry.step), "train_wall_s": train_wall_s,
        "steps_per_s": steps_run / train_wall_s if train_wall_s > 0 else 0.0,
        "num_params": num_params, **run.call_size, "devices": run.mesh.size,
        "processes": jax.process_count(), "resumed_from": run.resumed_from,
        "backend": jax.default_backend(), "task": run.dataset.task,
        "techniques": run.experiment.techniques, **communication(run.workdir),
        "step_memory": run.step_memory,
    }
    if run.stopped_at is not None:
        summary["stopped_at"] = run.stopped_at
    is_chief = jax.process_index() == 0
    measured, counted = state_fields(run)
    summary.update(measured)
    if run.members:
        active = np.asarray(jax.device_get(run.carry.active))
        summary["members"] = [{"values": values, "active": bool(active[i]), **evaluations[i],
                               **counted[i]} for i, values in enumerate(run.members)]
        summary["best_member"] = best_member(summary["members"])
    else:
        summary = {**evaluations[0], **counted[0], **summary}
    if is_chief:
        with open(os.path.join(run.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, model=None,
                       dataset=None, loss_fn: LossFn | None = None, eval_fn: EvalFn | None = None,
                       hparams: dict[str, float] | None = None, reducer: Reducer | None = None,
                       stop_members: MemberStopper | None = None) -> dict:
    """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the summary.

    Args:
      config: a validated config (`core/config.py`).
      workdir: the run directory.
      model: a Flax linen module of your own, called as `model.apply(variables, x, train=...)`
        (a module without a `train` argument is called without it); default: `config.model`.
      dataset: a `data.sources.Dataset`, or a mapping of split names to TFDS/grain data sources
        (`as_dataset`); default: `config.data`.
      loss_fn: `loss_fn(params, model_state, batch, rng, hparams) -> (loss, aux)`, aux holding
        at least {"metrics": {...}, "model_state": ...}; default: the data set's task.
      eval_fn: `eval_fn(params, model_state, batch) -> {metric: per-example values}`; default:
        the data set's task's evaluation.
      hparams: per-trial scalars your loss reads from its `hparams` argument (a population may
        vary them by name).
      reducer: a `core.step.Reducer` of your own (gradient communication); default: the
        config's `techniques.compress`, an exact all-reduce unless it names a compressor.
      stop_members: called at every evaluation before the last step with (step, per-member
        metrics; one dict for a single run); the members it returns are stopped (a single run
        returning [0] ends there, checkpointed, its summary's `stopped_at` set).
    Pass the same objects again to resume.
    """
    config = train_teacher_first(config, workdir)
    run = _build(config, workdir, model=model, dataset=dataset, loss_fn=loss_fn,
                 eval_fn=eval_fn, hparams=hparams, reducer=reducer)
    _restore(run)
    train_wall_s, steps_run = _train(run, stop_members)
    return _finish(run, train_wall_s, steps_run)
