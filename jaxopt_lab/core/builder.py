"""The one place that reads a config's model, optim and techniques blocks and composes the seams.

What a caller passes (its own Flax module, loss or evaluation) takes the place of what the config
would build; everything not passed comes from the config.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Collection
from typing import Any

import flax.linen as nn
import ml_collections
import optax

from jaxopt_lab.core.optim import build_optimizer, check_swept
from jaxopt_lab.core.population import member_values
from jaxopt_lab.core.precision import compute_dtype, loss_scale_summary, scales_loss
from jaxopt_lab.core.state import sample_input
from jaxopt_lab.core.step import Reducer, pmean_reducer, sharded_mean_reducer
from jaxopt_lab.core.tasks import LABEL_SMOOTHING, EvalFn, LossFn, make_task
from jaxopt_lab.data.augment import make_augment
from jaxopt_lab.data.sources import Dataset, as_dataset, load_dataset, with_validation
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import NOT_HPARAMS, build_model, with_execution
from jaxopt_lab.techniques import compress, distill, prune, quantize

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


def check_loss_signature(loss_fn: Callable) -> None:
    """A user's loss must take the seam's five arguments; say so before anything traces."""
    try:
        inspect.signature(loss_fn).bind(*LOSS_ARGS)
    except TypeError:
        raise UserError(f"loss_fn {getattr(loss_fn, '__name__', loss_fn)!r} must take "
                        f"({', '.join(LOSS_ARGS)}) and return (loss, aux)") from None
    except ValueError:
        pass  # no signature to inspect (a builtin or C callable): let the trace tell


QUANTIZE_METHODS = ("none", "qat")


def quantize_options(config: ml_collections.ConfigDict):
    """The config's quantization options (checked), or None where quantization is off."""
    block = config.techniques.quantize
    if block.method not in QUANTIZE_METHODS:
        raise UserError(f"techniques.quantize.method={block.method!r} is unknown; allowed: "
                        f"{', '.join(QUANTIZE_METHODS)}")
    options = quantize.quantize_options(**{k: v for k, v in block.items() if k != "method"})
    return options if block.method == "qat" else None


def prune_options(config: ml_collections.ConfigDict):
    """The config's pruning options (checked; end_step -1 resolved), or None where it is off."""
    block = config.techniques.prune
    if block.method == "none":
        return None
    options = {k: v for k, v in block.items()}
    if options["end_step"] == -1:
        options["end_step"] = config.train.steps * 3 // 4
    return prune.prune_options(**options)


TEACHER_LOGITS = ("auto", "in_step", "precomputed")


def distill_options(config: ml_collections.ConfigDict) -> dict | None:
    """The config's distillation options for `distill.wrap` (checked), or None where it is off.
    The teacher must be a run directory, or come from a config file trained first."""
    block = config.techniques.distill
    if not block.teacher and not block.teacher_config:
        return None
    if block.teacher_config:
        if not os.path.isfile(block.teacher_config):
            raise UserError(f"distill teacher_config={block.teacher_config!r}: no such config "
                            "file")
    elif not os.path.exists(os.path.join(block.teacher, "config.json")):
        raise UserError(f"distill teacher={block.teacher!r} holds no config.json: not a run "
                        "directory (train the teacher first, or set teacher_config)")
    if block.teacher_logits not in TEACHER_LOGITS:
        raise UserError(f"distill teacher_logits={block.teacher_logits!r} is unknown; allowed: "
                        f"{', '.join(TEACHER_LOGITS)}")
    if isinstance(block.transfer_size, bool) or block.transfer_size < 0:
        raise UserError(f"distill transfer_size={block.transfer_size!r} must be an int >= 0")
    options = {k: block[k] for k in ("temperature", "alpha", "form", "feature_weight")}
    options["member"] = block.teacher_member
    options["features"] = distill.hints.check_features(block.features, block.feature_weight)
    distill.check_options(options["temperature"], options["alpha"], options["form"])
    return options


def precompute_teacher_logits(config: ml_collections.ConfigDict, task: str) -> bool:
    """Whether the teacher's logits are computed once before training (see the config's
    techniques.distill.teacher_logits)."""
    block = config.techniques.distill
    if block.teacher_logits != "auto":
        return block.teacher_logits == "precomputed"
    augmented = any(bool(v) for v in config.data.augment.values())
    return not augmented and not block.features and task == "classification"


def compress_options(config: ml_collections.ConfigDict):
    """The config's compression options (checked), or None where gradients go uncompressed."""
    options = compress.compress_options(**config.techniques.compress.to_dict())
    return None if options.method == "none" else options


def check_techniques(config: ml_collections.ConfigDict) -> None:
    """Every technique block's values, before anything is built (`validate` calls this)."""
    for name, check in (("quantize", quantize_options), ("prune", prune_options),
                        ("distill", distill_options), ("compress", compress_options)):
        try:
            check(config)
        except UserError as e:
            raise UserError(str(e).replace(f"{name} ", f"techniques.{name}.", 1)) from None
    if config.train.shard_params and config.techniques.compress.method != "none":
        raise UserError(f"techniques.compress.method={config.techniques.compress.method!r} cannot "
                        "reduce sharded gradients (train.shard_params=True): a compressor "
                        "exchanges whole tensors; set one of them off")


def _combined(*fns: Callable | None) -> Callable | None:
    """One state_metrics (or state_summary) from each technique's."""
    fns = [f for f in fns if f is not None]
    if not fns:
        return None
    return lambda state: {k: v for f in fns for k, v in f(state).items()}


def build_experiment(config: ml_collections.ConfigDict, dataset: Dataset, *,
                     model: nn.Module | None = None, loss_fn: LossFn | None = None,
                     eval_fn: EvalFn | None = None, hparams: dict[str, float] | None = None,
                     reducer: Reducer | None = None, swept: Collection[str] = ()) -> Experiment:
    """Composes model, loss, evaluation, reduction and update from a validated config.

    Args:
      config, dataset: the run's; `dataset.task` picks the default loss and evaluation.
      model, loss_fn, eval_fn, reducer: a caller's own, used instead of the config's (a model
        computes in train.compute_dtype with train.remat where they are not the defaults). A loss
        without an eval_fn is evaluated with the data set's task on the model; a reducer is a
        `core.step.Reducer` (gradient communication), e.g. one of `techniques.compress`.
      hparams: the per-trial values a caller's own loss reads (with the config's loss, its
        `loss.label_smoothing`).
      swept: the config keys a population varies (a swept optimizer value stays in the graph).
    Techniques plug in here, each at its own seam; `validate` rejects any that are not available.
    """
    execution = {"dtype": compute_dtype(config.train.compute_dtype), "remat": config.train.remat}
    if model is None:
        model = build_model(config.model.name, dataset.num_classes, **execution,
                            **model_kwargs(config))
    else:
        model = with_execution(model, **execution)
    techniques, state_metrics = {}, None
    state_summary = loss_scale_summary if scales_loss(model) else None
    float_model = model  # AQT's ops hide the layer order the default skips are read from
    quantization = quantize_options(config)
    if quantization is not None:
        model = quantize.wrap(model, sample_x=sample_input(dataset),
                              **dataclasses.asdict(quantization))
        options, skip = quantize.quantization_of(model)
        techniques["quantize"] = {**options.describe(), "skip": list(skip)}
        state_metrics = quantize.state_metrics(model, sample_input(dataset))
    augment = make_augment(**config.data.augment.to_dict())
    task = make_task(dataset.task, model, augment)
    if loss_fn is None:
        smoothing = config.loss.label_smoothing
        if dataset.task == "regression" and (smoothing or LABEL_SMOOTHING in swept):
            raise UserError(f"loss.label_smoothing applies to class labels; data set "
                            f"{dataset.name!r} is a regression task")
        loss_fn = task.loss_fn
        # Like a zero weight decay, zero smoothing stays out of the graph unless it is swept.
        default_hparams = ({LABEL_SMOOTHING: float(smoothing)}
                           if smoothing or LABEL_SMOOTHING in swept else {})
    else:
        check_loss_signature(loss_fn)
        default_hparams = {}
    distillation = distill_options(config)
    extra_params, train_data = None, None
    if distillation is not None:
        from jaxopt_lab.core.run import load_run  # run.py builds experiments too

        directory = config.techniques.distill.teacher
        if not directory:
            raise UserError("techniques.distill.teacher is empty: train_and_evaluate trains a "
                            "teacher_config first and names its directory there")
        teacher = load_run(directory)
        if (teacher.dataset.input_shape, teacher.dataset.num_classes) != (
                dataset.input_shape, dataset.num_classes):
            raise UserError(
                f"distill teacher={directory!r} was trained on {teacher.dataset.name!r} (inputs "
                f"{teacher.dataset.input_shape}, {teacher.dataset.num_classes} outputs); the "
                f"student's {dataset.name!r} has inputs {dataset.input_shape}, "
                f"{dataset.num_classes} outputs")
        features = distillation["features"]
        if features:
            # The student's own loss captures the hinted layers for the wrapper to read.
            capture = distill.hints.capture_patterns([s for s, _ in features])
            if loss_fn is not task.loss_fn:
                raise UserError("distill features need the task's own loss (it captures the "
                                "student's layers); with your loss_fn, use distill.wrap")
            loss_fn = make_task(dataset.task, model, augment, capture).loss_fn
            extra_params = distill.hints.init_hints(
                model, sample_input(dataset),
                distill.teacher_fn(teacher, distillation["member"],
                                   distill.hints.capture_patterns([t for _, t in features])),
                features)
        loss_fn = distill.wrap(loss_fn, teacher, **distillation)
        if precompute_teacher_logits(config, dataset.task):
            forward = distill.teacher_fn(teacher, distillation["member"])
            train_data = functools.partial(distill.with_teacher_logits, forward=forward)
        default_hparams = {**default_hparams, distill.TEMPERATURE: distillation["temperature"],
                           distill.ALPHA: distillation["alpha"]}
        techniques["distill"] = {
            **{k: v for k, v in distillation.items() if k != "features"},
            "features": [list(pair) for pair in features], "teacher": directory,
            "transfer_size": config.techniques.distill.transfer_size,
            "teacher_logits": "precomputed" if train_data else "in_step",
            **distill.describe_teacher(teacher, directory, distillation["member"])}
    tx = build_optimizer(config.optim, config.train.steps, swept)
    pruning = prune_options(config)
    if pruning is not None:
        # The default skip traces the model: resolve it once, for the transform and the record.
        skip = prune.resolve_skip(pruning, float_model, sample_input(dataset))
        tx = prune.wrap(tx, model=model, sample_x=sample_input(dataset), seed=config.seed,
                        **{**dataclasses.asdict(pruning), "skip": skip})
        techniques["prune"] = {**pruning.describe(), "skip": list(skip)}
        state_metrics = _combined(state_metrics, prune.sparsity_metrics)
        state_summary = _combined(state_summary, prune.sparsity_summary)
    compression = compress_options(config)
    if reducer is None and compression is not None:
        reducer = compress.make_reducer(**dataclasses.asdict(compression))
        techniques["compress"] = compression.describe()
    if config.train.shard_params:
        if reducer is not None and not reducer.sharded:
            raise UserError("train.shard_params=True needs a sharded reducer: yours returns whole "
                            "gradients (see core.step.sharded_mean_reducer)")
        reducer = reducer or sharded_mean_reducer()
    return Experiment(
        model=model,
        loss_fn=loss_fn,
        eval_fn=eval_fn or task.eval_fn,
        reducer=reducer or pmean_reducer(),
        tx=tx,
        hparams={**default_hparams, **(hparams or {})},
        state_metrics=state_metrics,
        techniques=techniques,
        state_summary=state_summary,
        extra_params=extra_params,
        train_data=train_data,
    )


def data_seed(config: ml_collections.ConfigDict) -> int:
    """The seed of the training data's order: data.seed, or the run's seed where it is -1."""
    return config.data.seed if config.data.seed >= 0 else config.seed


def prepare_dataset(config: ml_collections.ConfigDict, dataset=None) -> Dataset:
    """The run's data: a caller's own (see `as_dataset`) or the config's, with its validation
    split carved out."""
    if dataset is None:
        dataset = load_dataset(config.data.name, config.data.dir or None,
                               synthetic_shape=tuple(config.data.synthetic_shape),
                               synthetic_size=config.data.synthetic_size, seed=config.seed)
    dataset = with_validation(as_dataset(dataset), config.data.validation_fraction)
    size = config.techniques.distill.transfer_size
    if size and (config.techniques.distill.teacher or config.techniques.distill.teacher_config):
        dataset = distill.with_transfer(dataset, distill.transfer_inputs(
            dataset.name, size, config.data.dir or None))
    return dataset


def population_members(config: ml_collections.ConfigDict, experiment: Experiment) -> list[dict]:
    """Each member's values from `config.population` (empty for a single run), checked against
    what the run can vary."""
    members = member_values(config.population, experiment.hparams)
    keys = set(members[0]) if members else set()
    check_swept(config.optim, keys)
    if keys & {"data.seed", "seed"} and not config.data.on_device:
        raise UserError("population varies the data order (seed or data.seed), which needs "
                        "data.on_device=True: the streamed feed has one order for every member")
    return members


def swept_keys(config: ml_collections.ConfigDict) -> set[str]:
    return {entry[0] for entry in config.population}
