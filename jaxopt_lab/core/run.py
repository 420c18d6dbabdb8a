"""Loading a finished or running run back from its workdir: config, data, seams and a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from jaxopt_lab.core.builder import Experiment, build_experiment
from jaxopt_lab.core.checkpoint import Checkpointer
from jaxopt_lab.core.config import validate
from jaxopt_lab.core.distributed import data_mesh
from jaxopt_lab.core.state import TrainState, abstract_sharded_state
from jaxopt_lab.data.sources import Dataset, load_dataset
from jaxopt_lab.errors import UserError


@dataclasses.dataclass(frozen=True)
class Run:
    config: ml_collections.ConfigDict
    dataset: Dataset
    experiment: Experiment
    state: TrainState
    step: int


def load_run(workdir: str, step: int | None = None) -> Run:
    """The run in `workdir` restored from its newest checkpoint (or the one at `step`)."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{workdir} holds no config.json: not a jaxopt-lab run directory")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    validate(config)
    dataset = load_dataset(config.data.name, config.data.dir or None,
                           synthetic_shape=tuple(config.data.synthetic_shape),
                           synthetic_size=config.data.synthetic_size, seed=config.seed)
    experiment = build_experiment(config, dataset)
    target = abstract_sharded_state(experiment, dataset.input_shape, data_mesh())
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
    try:
        restored = checkpointer.restore(target, step)
    finally:
        checkpointer.close()
    if restored is None:
        raise UserError(f"{workdir} holds no readable checkpoint")
    state, restored_step = restored
    return Run(config, dataset, experiment, state, restored_step)
