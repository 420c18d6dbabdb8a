"""The composer: an experiment's four seams from a config, a data set and what the caller passes.

What a caller passes (its own Flax module, loss, evaluation or reducer) takes the place of what the
config would build; every technique in `techniques` (seam order, `compose/techniques.py`) then
applies itself through its adapter (`techniques/contract.py`). This floor stands above the
techniques and knows none of them by name.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Collection, Sequence
from typing import Any

import flax.linen as nn
import ml_collections
import optax

from jaxopt_lab.compose.techniques import TECHNIQUES
from jaxopt_lab.core.layers import without_seams
from jaxopt_lab.core.optim import INJECTED, build_optimizer, check_swept
from jaxopt_lab.core.population import member_values
from jaxopt_lab.core.precision import (
    compute_dtype,
    loss_scale_summary,
    scales_loss,
    with_layer_policy,
)
from jaxopt_lab.core.state import sample_input
from jaxopt_lab.core.step import Reducer, pmean_reducer, sharded_mean_reducer
from jaxopt_lab.core.tasks import LABEL_SMOOTHING, EvalFn, LossFn, make_task
from jaxopt_lab.data.augment import make_augment
from jaxopt_lab.data.generated import with_generated_validation
from jaxopt_lab.data.sources import (
    FROM_PYTHON,
    Dataset,
    as_dataset,
    load_dataset,
    with_validation,
)
from jaxopt_lab.errors import UserError
from jaxopt_lab.importpath import is_import_path
from jaxopt_lab.models import NOT_HPARAMS, build_model, with_execution
from jaxopt_lab.techniques.contract import Parts, StateFn, Technique, takes_apply_fn

LOSS_ARGS = ("params", "model_state", "batch", "rng", "hparams")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The four seams, ready for `make_train_step(loss_fn, reducer, tx, mesh, state_metrics)`,
    with the evaluation that goes with the loss and the per-trial values the loss reads."""

    model: nn.Module
    loss_fn: LossFn
    eval_fn: EvalFn
    reducer: Reducer
    tx: optax.GradientTransformationExtraArgs
    hparams: dict[str, float] = dataclasses.field(default_factory=dict)
    state_metrics: Callable[[Any], dict] | None = None
    techniques: dict[str, dict] = dataclasses.field(default_factory=dict)  # for summary.json
    # summary.json fields a technique counts from a final (host) TrainState, e.g. sparsity
    state_summary: Callable[[Any], dict] | None = None
    # `key -> {name: subtree}`: params a technique trains beside the model's (core.state.HINTS)
    extra_params: Callable[[Any], dict] | None = None
    # Dataset -> Dataset: what a technique adds to the training arrays before training
    # (distillation's precomputed teacher logits)
    train_data: Callable[[Dataset], Dataset] | None = None
    # config key -> name of a per-trial value injected into the optimizer state
    injected: dict[str, str] = dataclasses.field(default_factory=lambda: dict(INJECTED))


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The model hyperparameters a config sets (everything in `model` but its name)."""
    return {k: v for k, v in config.model.items() if k != "name"}


def with_model_recorded(config: ml_collections.ConfigDict,
                        model: nn.Module) -> ml_collections.ConfigDict:
    """`config` with its model block describing a caller's own module: its import path and
    hyperparameters, so config.json names what was trained and `load_run` / `jaxopt-lab eval` can
    rebuild it where that path imports."""
    cls = type(model)
    block = {"name": f"{cls.__module__}:{cls.__qualname__}"}
    for field in dataclasses.fields(model):
        value = getattr(model, field.name)
        if field.init and field.name not in NOT_HPARAMS and isinstance(
                value, (bool, int, float, str, tuple, list)):
            block[field.name] = tuple(value) if isinstance(value, list) else value
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model = ml_collections.ConfigDict(block)
    return config


def with_data_recorded(config: ml_collections.ConfigDict, dataset) -> ml_collections.ConfigDict:
    """`config` whose data.name says the run's data came from Python (unless it names an import
    path, which rebuilds them), so config.json does not claim the config's own data set."""
    if is_import_path(config.data.name):
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.name = FROM_PYTHON + str(getattr(dataset, "name", None) or "custom")
    return config


def check_loss_signature(loss_fn: Callable) -> None:
    """A user's loss must take the seam's five arguments (and may take `apply_fn`, the composed
    model's apply); say so before anything traces."""
    extra = {"apply_fn": None} if takes_apply_fn(loss_fn) else {}
    try:
        inspect.signature(loss_fn).bind(*LOSS_ARGS, **extra)
    except TypeError:
        raise UserError(f"loss_fn {getattr(loss_fn, '__name__', loss_fn)!r} must take "
                        f"({', '.join(LOSS_ARGS)}) and return (loss, aux); it may also take "
                        "the keyword apply_fn, the composed model's apply") from None
    except ValueError:
        pass  # no signature to inspect (a builtin or C callable): let the trace tell


def _combined(fns: Sequence[StateFn]) -> StateFn | None:
    """One state_metrics (or state_summary) from each technique's."""
    if not fns:
        return None
    return lambda state: {k: v for f in fns for k, v in f(state).items()}


def _default_loss_hparams(config: ml_collections.ConfigDict, dataset: Dataset,
                          swept: Collection[str]) -> dict[str, float]:
    """The per-trial values the task's loss reads (label smoothing, where it is used)."""
    smoothing = config.loss.label_smoothing
    if dataset.task == "regression" and (smoothing or LABEL_SMOOTHING in swept):
        raise UserError(f"loss.label_smoothing applies to class labels; data set "
                        f"{dataset.name!r} is a regression task")
    # Like a zero weight decay, zero smoothing stays out of the graph unless it is swept.
    return {LABEL_SMOOTHING: float(smoothing)} if smoothing or LABEL_SMOOTHING in swept else {}


def _initial_parts(config: ml_collections.ConfigDict, dataset: Dataset, *,
                   model: nn.Module | None, loss_fn: LossFn | None, eval_fn: EvalFn | None,
                   reducer: Reducer | None, tx: optax.GradientTransformation | None,
                   swept: Collection[str], load_run: Callable[..., Any] | None) -> Parts:
    """The experiment before any technique: the config's (or the caller's) model, loss,
    optimizer and reducer."""
    execution = {"dtype": compute_dtype(config.train.compute_dtype), "remat": config.train.remat}
    if model is None:
        model = build_model(config.model.name, dataset.num_classes, **execution,
                            **model_kwargs(config))
    else:
        model = with_execution(model, **execution)
    sample_x = sample_input(dataset)
    model = with_layer_policy(model, config.train, sample_x)
    if loss_fn is None:
        hparams = _default_loss_hparams(config, dataset, swept)
    else:
        check_loss_signature(loss_fn)
        hparams = {}
    if tx is None:
        tx = build_optimizer(config.optim, config.train.steps, swept)
    return Parts(
        config=config, dataset=dataset, model=model, float_model=without_seams(model),
        loss_fn=None, user_loss=loss_fn, augment=make_augment(**config.data.augment.to_dict()),
        eval_fn=eval_fn, tx=optax.with_extra_args_support(tx), reducer=reducer,
        caller_reducer=reducer is not None, sample_x=sample_x, hparams=hparams,
        state_summary=(loss_scale_summary,) if scales_loss(model) else (), load_run=load_run)


def compose_experiment(config: ml_collections.ConfigDict, dataset: Dataset, *,
                       model: nn.Module | None = None, loss_fn: LossFn | None = None,
                       eval_fn: EvalFn | None = None, hparams: dict[str, float] | None = None,
                       reducer: Reducer | None = None,
                       tx: optax.GradientTransformation | None = None,
                       swept: Collection[str] = (), techniques: Sequence[Technique] = TECHNIQUES,
                       load_run: Callable[..., Any] | None = None) -> Experiment:
    """Composes model, loss, evaluation, reduction and update from a validated config.

    Args:
      config, dataset: the run's; `dataset.task` picks the default loss and evaluation.
      model, loss_fn, eval_fn, reducer, tx: a caller's own, used instead of the config's (a
        model computes in train.compute_dtype with train.remat where they are not the defaults).
        A loss without an eval_fn is evaluated with the data set's task on the model; a loss
        taking an `apply_fn` keyword is handed the composed model's apply (a five-argument loss
        is refused where a technique changes the model); a reducer is a `core.step.Reducer`
        (gradient communication), e.g. one of `techniques.compress`; tx any optax
        transformation (then the config's optim block is not used). A technique the caller
        applied from Python (a wrapped model, loss, tx or reducer) is recorded like one the
        config applies, and the config may not apply it again.
      hparams: the per-trial values a caller's own loss reads (with the config's loss, its
        `loss.label_smoothing`).
      swept: the config keys a population varies (a swept optimizer value stays in the graph).
      techniques: what may apply, in seam order; each applies where its config block is on.
      load_run: `directory -> run`, for a technique that reads another run (a distillation
        teacher); `jaxopt_lab.build_experiment` passes `jaxopt_lab.load_run`.
    """
    parts = _initial_parts(config, dataset, model=model, loss_fn=loss_fn, eval_fn=eval_fn,
                           reducer=reducer, tx=tx, swept=swept, load_run=load_run)
    for technique in techniques:
        parts = _apply(technique, parts)
    injected = {**INJECTED, **{k: v for t in techniques for k, v in t.injected.items()}}
    return _experiment(parts, hparams, injected)


def _apply(technique: Technique, parts: Parts) -> Parts:
    """`technique` at its seam: as the config says, or as the caller already applied it."""
    options = technique.check(parts.config)
    recognised = technique.recognise(parts) if technique.recognise else None
    if recognised is not None and options is not None:
        raise UserError(f"techniques.{technique.name} is on in the config and already applied to "
                        f"what you passed from Python ({technique.name}.wrap): apply it once")
    applied = recognised or (technique.apply(parts, options) if options is not None else None)
    if applied is None:
        return parts
    if technique.seam == "model":
        applied = dataclasses.replace(
            applied, model_changed_by=(*applied.model_changed_by, technique.name))
    return applied


def _experiment(parts: Parts, hparams: dict[str, float] | None,
                injected: dict[str, str]) -> Experiment:
    reducer = parts.reducer
    if parts.config.train.shard_params:
        if reducer is not None and not reducer.sharded:
            raise UserError("train.shard_params=True needs a sharded reducer: yours returns whole "
                            "gradients (see core.step.sharded_mean_reducer)")
        reducer = reducer or sharded_mean_reducer()
    task = make_task(parts.dataset.task, parts.model, parts.augment)
    return Experiment(
        model=parts.model,
        loss_fn=parts.loss(),
        eval_fn=parts.eval_fn or task.eval_fn,
        reducer=reducer or pmean_reducer(),
        tx=parts.tx,
        hparams={**parts.hparams, **(hparams or {})},
        state_metrics=_combined(parts.state_metrics),
        techniques=parts.record,
        state_summary=_combined(parts.state_summary),
        extra_params=parts.extra_params,
        train_data=parts.train_data,
        injected=injected,
    )


def configured_data_seed(config: ml_collections.ConfigDict) -> int | None:
    """data.seed where the config sets one, else None: each run (each population member) orders
    its data by its own seed."""
    return config.data.seed if config.data.seed >= 0 else None


def data_seed(config: ml_collections.ConfigDict) -> int:
    """The seed of the training data's order: data.seed, or the run's seed where it is -1."""
    seed = configured_data_seed(config)
    return config.seed if seed is None else seed


def prepare_dataset(config: ml_collections.ConfigDict, dataset=None,
                    techniques: Sequence[Technique] = TECHNIQUES) -> Dataset:
    """The run's data: a caller's own (see `as_dataset`) or the config's, with its validation
    split carved out (or generated) and what the techniques add (a distillation transfer set)."""
    if dataset is None:
        dataset = load_dataset(config.data.name, config.data.dir or None,
                               synthetic_shape=tuple(config.data.synthetic_shape),
                               synthetic_size=config.data.synthetic_size, seed=config.seed)
    dataset = with_generated_validation(as_dataset(dataset), config.data.generated_validation,
                                        config.data.dir or None)
    dataset = with_validation(dataset, config.data.validation_fraction)
    for technique in techniques:
        if technique.prepare_data is not None:
            dataset = technique.prepare_data(config, dataset)
    return dataset


def population_members(config: ml_collections.ConfigDict, experiment: Experiment) -> list[dict]:
    """Each member's values from `config.population` (empty for a single run), checked against
    what the run can vary."""
    members = member_values(config.population, experiment.hparams, experiment.injected)
    keys = set(members[0]) if members else set()
    check_swept(config.optim, keys)
    if keys & {"data.seed", "seed"} and not config.data.on_device:
        raise UserError("population varies the data order (seed or data.seed), which needs "
                        "data.on_device=True: the streamed feed has one order for every member")
    return members


def swept_keys(config: ml_collections.ConfigDict) -> set[str]:
    return {entry[0] for entry in config.population}
