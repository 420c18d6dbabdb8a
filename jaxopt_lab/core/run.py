"""Loading a finished or running run back from its workdir: config, data, seams and a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections

from jaxopt_lab.core.builder import (
    Experiment,
    build_experiment,
    population_members,
    prepare_dataset,
    swept_keys,
)
from jaxopt_lab.core.checkpoint import Checkpointer
from jaxopt_lab.core.config import validate
from jaxopt_lab.core.distributed import data_mesh
from jaxopt_lab.core.evaluate import make_evaluator
from jaxopt_lab.core.population import population_init
from jaxopt_lab.core.state import TrainState, abstract_sharded_state, sample_input
from jaxopt_lab.data.sources import Dataset
from jaxopt_lab.errors import UserError


@dataclasses.dataclass(frozen=True)
class Run:
    config: ml_collections.ConfigDict
    dataset: Dataset  # with its validation split, as the run trained
    experiment: Experiment
    state: TrainState  # stacked over members for a population
    step: int
    members: list[dict]  # a population's values per member; [] for a single run


def load_run(workdir: str, step: int | None = None, **objects) -> Run:
    """The run in `workdir` restored from its newest checkpoint (or the one at `step`).

    `objects` are what the run was trained with from Python, if anything (`model`, `dataset`,
    `loss_fn`, `eval_fn`, `hparams`, as `train_and_evaluate` took them).
    """
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{workdir} holds no config.json: not a jaxopt-lab run directory")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    validate(config, check_model="model" not in objects)
    dataset = prepare_dataset(config, objects.pop("dataset", None))
    experiment = build_experiment(config, dataset, swept=swept_keys(config), **objects)
    members = population_members(config, experiment)
    mesh = data_mesh()
    if members:
        init, shardings = population_init(experiment, sample_input(dataset), mesh, members,
                                          seed=config.seed, data_seed=None)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              jax.eval_shape(init), shardings)
    else:
        target = abstract_sharded_state(experiment, sample_input(dataset), mesh)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
    try:
        restored = checkpointer.restore(target, step)
    finally:
        checkpointer.close()
    if restored is None:
        raise UserError(f"{workdir} holds no readable checkpoint")
    carry, restored_step = restored
    return Run(config, dataset, experiment, carry.members if members else carry, restored_step,
               members)


def evaluate_run(run: Run, split: str = "test") -> dict:
    """`<split>_<metric>` means of the run's checkpoint on `split` ("validation" or "test"); for
    a population, {"members": [one such dict per member]}."""
    arrays = {"validation": run.dataset.validation, "test": run.dataset.test}.get(split)
    if arrays is None:
        have = [s for s in ("validation", "test") if getattr(run.dataset, s) is not None]
        raise UserError(f"the run has no {split!r} split; it has: {', '.join(have)}")
    evaluate = make_evaluator(run.experiment.eval_fn, arrays, run.config.train.eval_batch_size,
                              data_mesh(), split, members=bool(run.members))
    result = evaluate(run.state)
    return {"members": result} if run.members else result


def member_state(run: Run, member: int | None, workdir: str) -> TrainState:
    """The state of one run: a single run's own (`member` None), or member `member` of a
    population's; anything else is refused in one line naming `--member`."""
    if not run.members:
        if member is not None:
            raise UserError(f"--member {member}: {workdir} holds one run, not a population")
        return run.state
    if member is None or not 0 <= member < len(run.members):
        raise UserError(f"{workdir} holds a population of {len(run.members)}; choose one with "
                        f"--member i (0 <= i < {len(run.members)})")
    return jax.tree.map(lambda a: a[member], run.state)
