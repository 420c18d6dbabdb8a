"""One way to build a run: `build_run` composes a config's experiment over its data and makes its
state (initialised to train, or abstract to restore into); `load_run` is `build_run` plus the
newest checkpoint of a run directory. Training (`run/loop.py`), evaluation, lottery tickets,
width NAS, shrink and quantize all build through here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from jaxopt_lab.compose import (
    TECHNIQUES,
    Experiment,
    compose_experiment,
    population_members,
    prepare_dataset,
    swept_keys,
    validate,
)
from jaxopt_lab.compose.experiment import configured_data_seed
from jaxopt_lab.core.checkpoint import Checkpointer
from jaxopt_lab.core.distributed import data_mesh
from jaxopt_lab.core.evaluate import make_evaluator
from jaxopt_lab.core.population import population_init
from jaxopt_lab.core.state import (
    TrainState,
    abstract_sharded_state,
    init_sharded_state,
    model_params,
    sample_input,
)
from jaxopt_lab.core.tasks import train_kwargs
from jaxopt_lab.data.sources import FROM_PYTHON, Dataset
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.contract import Technique


@dataclasses.dataclass
class Run:
    """A run: its config, data, composed experiment and state.

    `carry` is what the loop steps and checkpoints: the TrainState, or for a population a
    `core.population.Population` whose `members` are the stacked states.
    """

    config: ml_collections.ConfigDict
    dataset: Dataset  # with its validation split, as the run trains
    experiment: Experiment
    members: list[dict]  # a population's values per member; [] for a single run
    mesh: Any
    carry: Any  # initialised, restored, or (before a restore) abstract
    step: int = 0  # the step `carry` is at
    workdir: str | None = None  # the run directory it was loaded from
    initialized_from: dict | None = None  # train.init_from's run and step, where it was set

    @property
    def state(self) -> TrainState:
        """The TrainState, stacked over members for a population."""
        return self.carry.members if self.members else self.carry


def build_experiment(config: ml_collections.ConfigDict, dataset: Dataset, **parts) -> Experiment:
    """The composer (`compose.compose_experiment`, which takes the same keywords) with run
    loading plugged in, for a technique that reads another run (a distillation teacher)."""
    return compose_experiment(config, dataset, load_run=run_loader(dataset), **parts)


def run_loader(dataset: Dataset):
    """`load_run` for a technique reading another run (a distillation teacher): a run that was
    trained on a data set passed from Python is handed this run's, the one there is to give."""

    def load(directory: str) -> Run:
        trained_on = str(read_config(directory).data.get("name", ""))
        return load_run(directory, **({"dataset": dataset}
                                      if trained_on.startswith(FROM_PYTHON) else {}))

    return load


def build_run(config: ml_collections.ConfigDict, *, model=None, dataset=None, loss_fn=None,
              eval_fn=None, hparams: dict[str, float] | None = None, reducer=None, tx=None,
              techniques: Sequence[Technique] = TECHNIQUES, train: bool = True) -> Run:
    """A validated config's run, nothing trained or restored.

    Args:
      config: validated (`jaxopt_lab.load_config` / `validate`).
      model, dataset, loss_fn, eval_fn, hparams, reducer, tx: a caller's own parts, as
        `train_and_evaluate` takes them.
      techniques: what may apply, in seam order.
      train: True makes the initial state (and the training data a technique adds, e.g.
        precomputed teacher logits); False an abstract state to restore a checkpoint into.
    """
    mesh = data_mesh()
    dataset = prepare_dataset(config, dataset, techniques)
    if train:
        num_train = len(dataset.train["label"])
        if config.data.batch_size > num_train:
            raise UserError(f"data.batch_size={config.data.batch_size} exceeds the {num_train} "
                            f"training examples of {dataset.name}")
    experiment = compose_experiment(config, dataset, model=model, loss_fn=loss_fn,
                                    eval_fn=eval_fn, hparams=hparams, reducer=reducer, tx=tx,
                                    swept=swept_keys(config), techniques=techniques,
                                    load_run=run_loader(dataset))
    if train and experiment.train_data is not None:
        dataset = experiment.train_data(dataset)
    members = population_members(config, experiment)
    sample_x = sample_input(dataset)
    data_seed = configured_data_seed(config) if train else None
    if members and train and config.train.get("init_from"):
        raise UserError(f"train.init_from={config.train.init_from}: a population cannot start "
                        "from one run's weights")
    if members:
        init, shardings = population_init(experiment, sample_x, mesh, members, seed=config.seed,
                                          data_seed=data_seed)
        if train:
            carry = jax.jit(init, out_shardings=shardings)()
        else:
            carry = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                jax.eval_shape(init), shardings)
    elif train:
        variables, source = starting_weights(config, experiment, sample_x)
        carry = init_sharded_state(experiment, sample_x, mesh, config.seed, data_seed, variables)
        return Run(config, dataset, experiment, members, mesh, carry, initialized_from=source)
    else:
        carry = abstract_sharded_state(experiment, sample_x, mesh)
    return Run(config, dataset, experiment, members, mesh, carry)


def starting_weights(config, experiment, sample_x) -> tuple[dict | None, dict | None]:
    """`train.init_from`'s model variables (params and collections such as BatchNorm
    statistics, from its newest checkpoint) and {"run", "step"}; (None, None) where it is unset.
    Refused in one line: a population there, or variables that are not this model's."""
    path = config.train.get("init_from")
    if not path:
        return None, None
    name = f"train.init_from={path}"
    try:
        source = load_run(path)
    except UserError as error:
        raise UserError(f"{name}: {error}") from None
    if source.members:
        raise UserError(f"{name} holds a population of {len(source.members)}: start from a "
                        "single run's weights")
    variables = jax.device_get({"params": model_params(source.state.params),
                                **source.state.model_state})
    wanted = jax.eval_shape(lambda: experiment.model.init(
        jax.random.key(0), sample_x, **train_kwargs(experiment.model, False)))
    have, want = _leaf_shapes(variables), _leaf_shapes(wanted)
    for key in sorted(have.keys() | want.keys()):
        if have.get(key) != want.get(key):
            raise UserError(f"{name}: its weights are not this model's at {key} "
                            f"(there {have.get(key, 'absent')}, here {want.get(key, 'absent')})")
    return variables, {"run": os.path.abspath(path), "step": int(source.step)}


def _leaf_shapes(tree) -> dict[str, str]:
    return {jax.tree_util.keystr(path): f"{tuple(leaf.shape)} {leaf.dtype}"
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """A run directory's config.json (not yet validated)."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{workdir} holds no config.json: not a jaxopt-lab run directory")
    with open(config_path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, step: int | None = None, *,
             techniques: Sequence[Technique] = TECHNIQUES, **objects) -> Run:
    """The run in `workdir` restored from its newest checkpoint (or the one at `step`).

    `objects` are what the run was trained with from Python, if anything (`model`, `dataset`,
    `loss_fn`, `eval_fn`, `hparams`, as `train_and_evaluate` took them), and `techniques` the
    tuple it was trained with where that was not the default.
    """
    config = read_config(workdir)
    validate(config, check_model="model" not in objects, techniques=techniques)
    run = build_run(config, train=False, techniques=techniques, **objects)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
    try:
        # Evaluation and export never read comm_state: another device count restores the rest.
        restored = checkpointer.restore(run.carry, step, on_device_count_change=lambda *_: None)
    finally:
        checkpointer.close()
    if restored is None:
        raise UserError(f"{workdir} holds no readable checkpoint")
    run.carry, run.step = restored
    run.workdir = workdir
    return run


def evaluate_run(run: Run, split: str = "test") -> dict:
    """`<split>_<metric>` means of the run's checkpoint on `split` ("validation" or "test"); for
    a population, {"members": [one such dict per member]}."""
    arrays = {"validation": run.dataset.validation, "test": run.dataset.test}.get(split)
    if arrays is None:
        have = [s for s in ("validation", "test") if getattr(run.dataset, s) is not None]
        raise UserError(f"the run has no {split!r} split; it has: {', '.join(have)}")
    evaluate = make_evaluator(run.experiment.eval_fn, arrays, run.config.train.eval_batch_size,
                              run.mesh, split, members=bool(run.members))
    result = evaluate(run.state)
    return {"members": result} if run.members else result


def evaluate_splits(run: Run) -> dict:
    """Validation (where the run has the split) and test metrics in one dict; for a population,
    {"members": [one such dict per member]}."""
    splits = [s for s in ("validation", "test") if getattr(run.dataset, s) is not None]
    results = [evaluate_run(run, s) for s in splits]
    if run.members:
        return {"members": [merge_splits(r["members"][i] for r in results)
                            for i in range(len(run.members))]}
    return merge_splits(results)


def merge_splits(results) -> dict:
    """Per-split metric dicts ({"validation_loss": ...}, {"test_loss": ...}) as one."""
    return {k: v for split in results for k, v in split.items()}


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
