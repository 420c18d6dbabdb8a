"""The training loop: `train_and_evaluate(config, workdir)` owns a run directory.

workdir/config.json, metrics.jsonl, tensorboard/, checkpoints/, summary.json. Rerunning on the same
workdir resumes from the newest readable checkpoint. The host syncs with the devices only at log,
eval and checkpoint boundaries, so dispatch stays asynchronous in between.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxopt_lab.core.builder import build_experiment
from jaxopt_lab.core.checkpoint import Checkpointer
from jaxopt_lab.core.distributed import data_mesh, initialize_distributed
from jaxopt_lab.core.evaluate import make_evaluator
from jaxopt_lab.core.feed import (
    NO_STEP,
    StreamedFeed,
    device_sampler,
    make_logged_train_fn,
    make_train_fn,
    pick_steps_per_call,
    replicate,
    shard_batch,
    zero_totals,
)
from jaxopt_lab.core.metrics import MetricsWriter
from jaxopt_lab.core.state import init_sharded_state
from jaxopt_lab.core.step import make_train_step
from jaxopt_lab.data.pipeline import make_grain_loader
from jaxopt_lab.data.sources import load_dataset
from jaxopt_lab.errors import UserError


class TrainingDiverged(UserError):
    """The loss or the parameters became NaN/inf; the last good checkpoint is kept."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved and rerunning the command resumes.

    The signal is acted on at the next log boundary (train.log_every), where all processes agree.
    """


def _auto_steps_per_call(train: ml_collections.ConfigDict) -> int:
    """The largest K <= 50 dividing every logging interval, so boundaries fall on call ends."""
    interval = math.gcd(train.log_every, train.eval_every, train.checkpoint_every)
    return max(k for k in range(1, 51) if interval % k == 0)


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the summary."""
    initialize_distributed()
    mesh = data_mesh()
    is_chief = jax.process_index() == 0
    if config.data.batch_size % mesh.size:
        raise UserError(f"data.batch_size={config.data.batch_size} must be divisible by the "
                        f"{mesh.size} devices of the mesh")
    os.makedirs(workdir, exist_ok=True)
    if is_chief:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    dataset = load_dataset(config.data.name, config.data.dir or None,
                           synthetic_shape=tuple(config.data.synthetic_shape),
                           synthetic_size=config.data.synthetic_size, seed=config.seed)
    num_train = len(dataset.train["label"])
    if config.data.batch_size > num_train:
        raise UserError(f"data.batch_size={config.data.batch_size} exceeds the {num_train} "
                        f"training examples of {dataset.name}")
    experiment = build_experiment(config, dataset)
    train_step = make_train_step(experiment.loss_fn, experiment.reducer, experiment.tx, mesh)
    state = init_sharded_state(experiment, dataset.input_shape, mesh, config.seed)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

    if config.data.on_device:
        source = replicate(dataset.train, mesh)
        sample = device_sampler(num_train, config.data.batch_size, config.seed, mesh,
                                config.data.shuffle)
        streamed = None
    else:
        sample = None
        streamed = StreamedFeed(make_grain_loader(
            dataset.train, batch_size=config.data.batch_size // jax.process_count(),
            seed=config.seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
            worker_count=config.data.workers, shuffle=config.data.shuffle), mesh,
            prefetch=config.data.prefetch)

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
    restored = checkpointer.restore(state, data_iterator=streamed)
    resumed_from = None
    if restored is not None:
        state, resumed_from = restored
    writer = MetricsWriter(workdir, enabled=is_chief)
    writer.truncate_after(int(state.step))

    # The streamed feed's shape, for measuring and tracing: the first batch, stacked per step.
    first = {n: v[:config.data.batch_size] for n, v in dataset.train.items()}

    def fixed_source(k):
        return source if sample else shard_batch(
            {n: np.stack([v] * k) for n, v in first.items()}, mesh, leading_axes=1)

    finished = int(state.step) >= config.train.steps  # a rerun of a finished run measures nothing
    steps_per_call = config.train.steps_per_call or (1 if finished else pick_steps_per_call(
        lambda k: make_train_fn(train_step, k, sample), state, fixed_source,
        candidates=(1, _auto_steps_per_call(config.train))))
    train_fns = {}

    def run(state, totals, k):
        if k not in train_fns:
            train_fns[k] = make_logged_train_fn(train_step, k, sample)
        return train_fns[k](state, source if sample else streamed.next(k), totals)

    # Placed like the step's outputs, so the second call does not trace again.
    zeros = jax.device_put(zero_totals(train_step, state, fixed_source(1), sample),
                           NamedSharding(mesh, P()))

    def fresh_totals():  # the train function donates its totals: each window gets new buffers
        return jax.tree.map(jnp.copy, zeros)

    params_finite = jax.jit(lambda p: jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))

    def where_last_good() -> str:
        last = checkpointer.latest_step()
        return f"step {last} in {checkpointer.directory}" if last is not None else "none"

    evaluate = make_evaluator(experiment.model, dataset.test, config.train.eval_batch_size, mesh)
    stop_requested = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    total = config.train.steps
    intervals = (("log", config.train.log_every), ("eval", config.train.eval_every),
                 ("ckpt", config.train.checkpoint_every))

    def next_boundary(step: int) -> int:  # the first log, eval or checkpoint step after `step`
        return min(total, *((step // every + 1) * every for _, every in intervals))

    step = int(state.step)
    start_step, start_time = step, time.perf_counter()
    last_eval: dict[str, float] = {}
    totals = fresh_totals()
    window_start = (step, time.perf_counter())
    bar = tqdm(total=total, initial=step, disable=not (is_chief and config.train.progress),
               desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)
    try:
        boundary = next_boundary(step)
        while step < total:
            # The per-step path stays this short: on a small CPU, host work between dispatches
            # slows the steps themselves, not only the loop.
            k = steps_per_call if total - step >= steps_per_call else 1
            state, totals = run(state, totals, k)
            step += k
            bar.update(k)
            if step < boundary:
                continue
            boundary = next_boundary(step)
            at = {name: step % every < k or step == total for name, every in intervals}
            stop = _any_process(bool(stop_requested))  # every process stops at the same step
            window, totals = jax.device_get(totals), fresh_totals()
            if window["first_nonfinite"] != NO_STEP:
                raise TrainingDiverged(f"loss or gradients became non-finite at step "
                                       f"{window['first_nonfinite']}; stopped. "
                                       f"Last good checkpoint: {where_last_good()}")
            record = {k: float(v) / int(window["count"]) for k, v in window["sums"].items()}
            now = time.perf_counter()
            record["steps_per_s"] = (step - window_start[0]) / (now - window_start[1])
            window_start = (step, now)
            if at["eval"]:
                last_eval = evaluate(state)
                record.update(last_eval)
            writer.write(step, record)
            postfix = {"loss": f"{record['loss']:.4f}"}
            if last_eval:
                postfix["test_acc"] = f"{last_eval['test_accuracy']:.4f}"
            bar.set_postfix(postfix)
            if at["ckpt"] or stop or step == total:
                if not bool(params_finite(state.params)):  # an overflowing update, say
                    raise TrainingDiverged(f"parameters became non-finite by step {step}; stopped. "
                                           f"Last good checkpoint: {where_last_good()}")
                checkpointer.save(step, state, streamed)
            if stop and step < total:
                checkpointer.wait()
                raise Preempted(f"SIGTERM: checkpoint saved at step {step} in "
                                f"{checkpointer.directory}; rerun the same command to resume")
        train_wall_s = time.perf_counter() - start_time
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous_handler)
        checkpointer.close()
        writer.close()

    final = last_eval or evaluate(state)
    summary = {
        **final, "steps": int(state.step), "train_wall_s": train_wall_s,
        "steps_per_s": (step - start_step) / train_wall_s if train_wall_s > 0 else 0.0,
        "num_params": num_params, "steps_per_call": steps_per_call, "devices": mesh.size,
        "processes": jax.process_count(), "resumed_from": resumed_from,
        "backend": jax.default_backend(),
    }
    if is_chief:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
