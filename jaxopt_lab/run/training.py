"""What training a built run needs beyond the run itself: its step wrapped for the feed, the data
on the devices (or the streamed feed), an evaluator per split and the checkpointer. The loop
(`run/loop.py`) and the profiler (`profile/`) build it the same way."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax

from jaxopt_lab.compose import data_seed
from jaxopt_lab.core.checkpoint import Checkpointer
from jaxopt_lab.core.evaluate import make_evaluator
from jaxopt_lab.core.feed import StreamedFeed, device_sampler, replicate, sampled_step
from jaxopt_lab.core.population import population_step
from jaxopt_lab.core.step import make_train_step
from jaxopt_lab.data.pipeline import make_grain_loader
from jaxopt_lab.errors import UserError
from jaxopt_lab.run.build import Run


@dataclasses.dataclass
class Training:
    """A run ready to train in `workdir`, and what the loop learns about it as it goes."""

    run: Run
    workdir: str
    step_fn: Callable  # (carry, source) -> (carry, metrics)
    source: Any  # the on-device data, or None when streamed
    streamed: StreamedFeed | None
    evaluators: dict[str, Callable]  # split -> evaluate(state or stacked members)
    checkpointer: Checkpointer
    until: int  # the step training stops at: train.steps, or earlier for a run's segment
    resumed_from: int | None = None
    call_size: dict = dataclasses.field(default_factory=lambda: {"steps_per_call": 1})
    step_memory: dict = dataclasses.field(default_factory=dict)  # compiled_memory of one call
    last_eval: list[dict] = dataclasses.field(default_factory=list)  # per member
    stopped_at: int | None = None  # a single run ended early by its stopper
    summary: dict = dataclasses.field(default_factory=dict)  # summary.json, once finished


def prepare_training(run: Run, workdir: str, until: int | None = None) -> Training:
    """The step, feed, evaluators and checkpointer of `run` in `workdir`, training until step
    `until` (default: train.steps; the schedules still span train.steps)."""
    config, mesh, dataset, experiment = run.config, run.mesh, run.dataset, run.experiment
    train_step = make_train_step(experiment.loss_fn, experiment.reducer, experiment.tx, mesh,
                                 experiment.state_metrics,
                                 grad_accum_steps=config.train.grad_accum_steps)
    if config.data.on_device:
        source, streamed = replicate(dataset.train, mesh), None
        sample = device_sampler(len(dataset.train["label"]), config.data.batch_size, mesh,
                                config.data.shuffle)
    else:
        source, sample = None, None
        streamed = StreamedFeed(make_grain_loader(
            dataset.train, batch_size=config.data.batch_size // jax.process_count(),
            seed=data_seed(config), shard_index=jax.process_index(),
            shard_count=jax.process_count(), worker_count=config.data.workers,
            shuffle=config.data.shuffle), mesh, prefetch=config.data.prefetch)
    step_fn = sampled_step(train_step, sample)
    if run.members:
        step_fn = population_step(step_fn)
    splits = {"validation": dataset.validation, "test": dataset.test}
    evaluators = {split: make_evaluator(experiment.eval_fn, arrays, config.train.eval_batch_size,
                                        mesh, split, members=bool(run.members))
                  for split, arrays in splits.items() if arrays is not None}
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
    until = config.train.steps if until is None else until
    if not 0 < until <= config.train.steps:
        raise UserError(f"train until step {until}: must be in [1, train.steps="
                        f"{config.train.steps}]")
    return Training(run, workdir, step_fn, source, streamed, evaluators, checkpointer, until)
