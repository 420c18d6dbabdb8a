"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding, against a random re-init.

IMP (Frankle & Carbin 2019, "The Lottery Ticket Hypothesis"): train; prune a fraction p of the
remaining weights by magnitude; reset the survivors to their values at initialisation; retrain;
repeat, reaching sparsity 1 - (1 - p)^R after R rounds. Late rewinding (Frankle et al. 2020,
"Linear Mode Connectivity and the Lottery Ticket Hypothesis") resets them to their values at step
k > 0 instead, which is what finds tickets in deeper networks. The control trains the same masks
from a fresh random initialisation: where the ticket wins, the survivors' values matter, not
only where they are.

    trainer = make_trainer(lottery_config(config))
    for r in imp(trainer, seeds=(0, 1, 2), rounds=5, fraction=0.37, rewind_steps=(0, 100)):
        print(r.rewind_step, r.index, trainer.evaluate(r.ticket), trainer.evaluate(r.control))

Rewinding restores the whole TrainState of step k, not only the weights: the optimizer's moments
and schedule position, the data position and the keys, so a ticket retrains on exactly the batches
the dense run saw after step k (open_lth restarts the optimizer instead; with k = 0 the two agree).
The masks live in the pruning transform's state with a one-shot schedule that never fires
(`lottery_config`), so the framework's own step trains, through the one training loop, and its
update seam keeps every pruned weight exactly 0. Members (seeds) are stacked, trained as one
vmapped population or one after another (`make_trainer(vmap=False)`, the faster on XLA:CPU).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxopt_lab.core.checkpoint import Checkpointer
from jaxopt_lab.core.evaluate import make_evaluator
from jaxopt_lab.core.population import Population, stack_trials
from jaxopt_lab.core.state import TrainState, create_train_state, sample_input
from jaxopt_lab.errors import UserError
from jaxopt_lab.run.build import build_run
from jaxopt_lab.run.loop import train_run
from jaxopt_lab.techniques.prune import find_state, magnitude_masks, with_masks

SCOPES = ("global", "layer")


def lottery_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with magnitude pruning on but inert (one-shot at train.steps, an update no run
    reaches): the state then carries masks that only `with_masks` changes."""
    config = config.copy_and_resolve_references()
    block = config.techniques.prune
    block.method, block.schedule, block.begin_step = "magnitude", "one_shot", config.train.steps
    return config


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The framework's training for stacked members: each a whole TrainState, one seed each."""

    init: Callable[[int, int], TrainState]  # (seed, data seed) -> a fresh state
    train: Callable[[TrainState, int], TrainState]  # (stacked states, steps) -> trained on
    evaluate: Callable[[TrainState], list[dict]]  # stacked -> test metrics, one dict per member
    steps: int  # train.steps: where every run ends
    workdir: str  # where each training segment is a run directory of its own
    # the temporary directory behind `workdir` where none was given: removed with the trainer
    scratch: tempfile.TemporaryDirectory | None = None


def make_trainer(config: ml_collections.ConfigDict, dataset=None, *, model: nn.Module | None = None,
                 steps_per_call: int = 10, vmap: bool = True,
                 workdir: str | None = None) -> Trainer:
    """`config`'s run (`build_run`), members stacked as a population trained by the one loop,
    `steps_per_call` steps scanned per compiled call. `vmap=False` trains the members one after
    another instead: XLA:CPU runs a vmapped conv slower than the members alone (the 25-channel
    MNIST-1D CNN, 3 members: 300 member-steps/s against 400), and scanned conv steps slower too,
    so there `steps_per_call=1`.

    Each `train(states, steps)` is one segment: the states are written as a population's
    checkpoint at their step into a run directory of their own under `workdir` (default: a
    temporary directory that lives as long as the trainer), and the loop resumes from it and
    stops `steps` later (`train_run(until=)`), its schedules spanning train.steps as one run's.
    """
    if config.techniques.prune.method == "none":
        raise UserError("lottery: techniques.prune is off; build the trainer from "
                        "lottery_config(config)")
    if not config.data.on_device:
        raise UserError("lottery: members have their own data order, which needs "
                        "data.on_device=True")
    run = build_run(config, model=model, dataset=dataset, train=False)
    experiment, mesh = run.experiment, run.mesh
    scratch = None if workdir else tempfile.TemporaryDirectory(prefix="lottery-")
    workdir = workdir or scratch.name
    segments = itertools.count()

    def init(seed: int, data_seed: int) -> TrainState:
        return create_train_state(experiment.model, sample_input(run.dataset), experiment.tx,
                                  experiment.reducer.init, mesh.size, seed,
                                  hparams=experiment.hparams, data_seed=data_seed,
                                  extra_params=experiment.extra_params)

    def train(states: TrainState, steps: int) -> TrainState:
        size = jax.tree.leaves(states)[0].shape[0]
        if vmap or size == 1:
            return segment(states, steps)
        alone = [segment(jax.tree.map(lambda x, i=i: x[i:i + 1], states), steps)
                 for i in range(size)]
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *alone)

    def segment(states: TrainState, steps: int) -> TrainState:
        if steps == 0:
            return states
        directory = os.path.join(workdir, f"segment_{next(segments):04d}")
        steps_now = np.asarray(states.step)
        if np.any(steps_now != steps_now[0]):
            raise UserError(f"lottery: members at steps {steps_now.tolist()} train together only "
                            "from one step")
        size, start = len(steps_now), int(steps_now[0])
        segment_config = _segment_config(config, size, steps_per_call)
        checkpointer = Checkpointer(os.path.join(directory, "checkpoints"), 1)
        try:
            checkpointer.save(start, Population(step=jnp.asarray(start, jnp.int32),
                                                members=states, active=jnp.ones(size, bool)))
        finally:
            checkpointer.close()
        trained = train_run(segment_config, directory, model=model, dataset=dataset,
                            until=start + steps)
        if not all(m["active"] for m in trained.summary["members"]):
            raise UserError("lottery: a member's loss or gradients became non-finite; lower "
                            "optim.lr")
        return trained.run.state

    evaluate = make_evaluator(experiment.eval_fn, run.dataset.test, config.train.eval_batch_size,
                              mesh, "test", members=True)
    return Trainer(init, train, evaluate, config.train.steps, workdir, scratch)


def _segment_config(config: ml_collections.ConfigDict, members: int,
                    steps_per_call: int) -> ml_collections.ConfigDict:
    """`config` as the loop trains a segment: a population of `members` (their values come
    from the checkpoint the segment starts from), `steps_per_call` fixed, nothing measured."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.population = (("seed", tuple(range(members))),)
        config.train.steps_per_call = steps_per_call
        config.train.measure = False
        config.train.progress = False
    return config


class Round(NamedTuple):
    rewind_step: int  # k: the step whose state the survivors were reset to
    index: int  # 0 = the dense run; r = after r prunings
    masks: Any  # stacked over members, like params: bool array per pruned kernel, True elsewhere
    ticket: TrainState  # stacked: trained from the rewound state under `masks`, to train.steps
    control: TrainState | None  # stacked: a fresh initialisation under `masks`, trained from
    # step 0 on the ticket's data order; None at round 0


def imp(trainer: Trainer, seeds: Sequence[int], *, rounds: int, fraction: float,
        rewind_steps: Sequence[int] = (0,), scope: str = "global",
        control_seed_offset: int = 1000) -> Iterator[Round]:
    """Iterative magnitude pruning, one chain of rounds per rewind step, rounds yielded as done.

    The dense run (round 0) is shared: one training from each seed, its state kept at every
    rewind step. Round r prunes `fraction` of the weights round r - 1's ticket kept
    (`magnitude_masks`), rewinds to step k and retrains to `trainer.steps`; its control starts
    from seed + `control_seed_offset` with the same masks and the seed's data order.
    """
    rewind_steps = sorted(set(rewind_steps))
    if not seeds or not rewind_steps:
        raise UserError("lottery: imp needs at least one seed and one rewind step")
    if rewind_steps[0] < 0 or rewind_steps[-1] >= trainer.steps:
        raise UserError(f"lottery rewind_steps={rewind_steps} must lie in [0, "
                        f"train.steps={trainer.steps})")
    state = stack_trials([trainer.init(s, s) for s in seeds])
    controls = stack_trials([trainer.init(s + control_seed_offset, s) for s in seeds])
    saved, at = {}, 0
    for k in rewind_steps:
        state = trainer.train(state, k - at) if k > at else state
        saved[k], at = state, k
    dense = trainer.train(state, trainer.steps - at)
    masks0 = jax.vmap(lambda s: find_state(s.opt_state).masks)(dense)
    last = {}
    for k in rewind_steps:
        yield Round(k, 0, masks0, dense, None)
        last[k] = (masks0, dense)
    prune = jax.jit(jax.vmap(lambda p, m: magnitude_masks(p, m, fraction, scope)))
    for index in range(1, rounds + 1):
        for k in rewind_steps:
            masks = prune(last[k][1].params, last[k][0])
            ticket = trainer.train(jax.vmap(with_masks)(saved[k], masks), trainer.steps - k)
            control = trainer.train(jax.vmap(with_masks)(controls, masks), trainer.steps)
            last[k] = (masks, ticket)
            yield Round(k, index, masks, ticket, control)
