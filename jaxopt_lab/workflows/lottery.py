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
(`lottery_config`), so the framework's own step trains and its update seam keeps every pruned
weight exactly 0. Members (seeds) are stacked, trained as one vmapped population or one after
another (`make_trainer(vmap=False)`, the faster on XLA:CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxopt_lab.compose import prepare_dataset
from jaxopt_lab.core.distributed import data_mesh
from jaxopt_lab.core.evaluate import make_evaluator
from jaxopt_lab.core.feed import compile_k_steps, device_sampler, replicate, sampled_step
from jaxopt_lab.core.population import Population, population_step, stack_trials
from jaxopt_lab.core.state import TrainState, create_train_state, sample_input
from jaxopt_lab.core.step import make_train_step
from jaxopt_lab.errors import UserError
from jaxopt_lab.run.build import build_experiment
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


def make_trainer(config: ml_collections.ConfigDict, dataset=None, *, model: nn.Module | None = None,
                 steps_per_call: int = 10, vmap: bool = True) -> Trainer:
    """`config`'s seams (`build_experiment`), step (`make_train_step`) and on-device data order,
    vmapped over members as a population, `steps_per_call` steps scanned per compiled call.
    `vmap=False` trains the members one after another instead: XLA:CPU runs a vmapped conv
    slower than the members alone (the 25-channel MNIST-1D CNN, 3 members: 300 member-steps/s
    against 400), and scanned conv steps slower too, so there `steps_per_call=1`.

    A second loop beside `core/loop.py` because a run there starts from a seed, and a ticket
    starts from given weights and masks; everything it runs is the core's.
    """
    if config.techniques.prune.method == "none":
        raise UserError("lottery: techniques.prune is off; build the trainer from "
                        "lottery_config(config)")
    if not config.data.on_device:
        raise UserError("lottery: members have their own data order, which needs "
                        "data.on_device=True")
    mesh = data_mesh()
    dataset = prepare_dataset(config, dataset)
    experiment = build_experiment(config, dataset, model=model)
    step = make_train_step(experiment.loss_fn, experiment.reducer, experiment.tx, mesh,
                           experiment.state_metrics)
    sample = device_sampler(len(dataset.train["label"]), config.data.batch_size, mesh,
                            config.data.shuffle)
    step_fn = population_step(sampled_step(step, sample))
    data = replicate(dataset.train, mesh)
    compiled: dict[int, Callable] = {}

    def init(seed: int, data_seed: int) -> TrainState:
        return create_train_state(experiment.model, sample_input(dataset), experiment.tx,
                                  experiment.reducer.init, mesh.size, seed,
                                  hparams=experiment.hparams, data_seed=data_seed,
                                  extra_params=experiment.extra_params)

    def train(states: TrainState, steps: int) -> TrainState:
        size = jax.tree.leaves(states)[0].shape[0]
        if vmap or size == 1:
            return train_together(states, size, steps)
        alone = [train_together(jax.tree.map(lambda x, i=i: x[i:i + 1], states), 1, steps)
                 for i in range(size)]
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *alone)

    def train_together(states: TrainState, size: int, steps: int) -> TrainState:
        # Copied: each call donates its carry, and `states` may be a rewind point kept for later.
        population = Population(step=jnp.zeros((), jnp.int32),
                                members=jax.tree.map(jnp.copy, states),
                                active=jnp.ones((size,), bool))
        k = steps_per_call
        for calls, per_call in ((steps // k, k), (steps % k, 1)):
            if calls and per_call not in compiled:
                compiled[per_call] = compile_k_steps(step_fn, per_call, False)
            for _ in range(calls):
                population, _ = compiled[per_call](population, data)
        if not bool(jnp.all(population.active)):
            raise UserError("lottery: a member's loss or gradients became non-finite; lower "
                            "optim.lr")
        return population.members

    evaluate = make_evaluator(experiment.eval_fn, dataset.test, config.train.eval_batch_size,
                              mesh, "test", members=True)
    return Trainer(init, train, evaluate, config.train.steps)


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
