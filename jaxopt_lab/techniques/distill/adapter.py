"""Distillation in a composed experiment: the `techniques.distill` block and its adapter.

The block is `DistillOptions` as it is. The teacher is a run directory, read through the
caller's `Parts.load_run` (loading a run is the run layer's work, above the techniques); a
teacher still to be trained from `teacher_config` is trained first by the workflow
(`workflows/train.py`), which then names its directory here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections

from jaxopt_lab.core.layers import abstract_variables
from jaxopt_lab.data.sources import Dataset
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.contract import Parts, Technique
from jaxopt_lab.techniques.distill import (
    ALPHA,
    TEMPERATURE,
    describe_teacher,
    distillation_record,
    hints,
    teacher_fn,
)
from jaxopt_lab.techniques.distill import wrap as distill_wrap
from jaxopt_lab.techniques.distill.options import (
    DistillOptions,
    check_loss_options,
    check_teacher,
)
from jaxopt_lab.techniques.distill.transfer import (
    transfer_inputs,
    with_teacher_logits,
    with_transfer,
)


def check(config: ml_collections.ConfigDict) -> DistillOptions | None:
    """The block's options (checked), or None where distillation is off (no teacher nor
    teacher_config).

    Every value is checked whether or not distillation is on, as every technique's are: a bad
    value waiting in a block that is off would fail only once someone names a teacher. The
    teacher itself (a run directory, a config file) is looked for only where it is on.
    """
    from jaxopt_lab.techniques.distill.options import TEACHER_LOGITS_MODES

    options = DistillOptions(**TECHNIQUE.block(config))
    check_loss_options(options.temperature, options.alpha, options.form)
    features = hints.check_features(options.features, options.feature_weight)
    if not options.on:
        if options.teacher_logits not in TEACHER_LOGITS_MODES:
            raise UserError(f"distill teacher_logits={options.teacher_logits!r} is unknown; "
                            f"allowed: {', '.join(TEACHER_LOGITS_MODES)}")
        if isinstance(options.transfer_size, bool) or options.transfer_size < 0:
            raise UserError(f"distill transfer_size={options.transfer_size!r} must be an int "
                            ">= 0")
        return None
    check_teacher(options)
    return dataclasses.replace(options, features=tuple(features))


def precompute_teacher_logits(config: ml_collections.ConfigDict, options: DistillOptions,
                              task: str) -> bool:
    """Whether the teacher's logits are computed once before training (see teacher_logits)."""
    if options.teacher_logits != "auto":
        return options.teacher_logits == "precomputed"
    augmented = any(bool(v) for v in config.data.augment.values())
    return not augmented and not options.features and task == "classification"


def _load_teacher(parts: Parts, directory: str):
    """The teacher's run, checked against the student's data (and warned about where it stopped
    before its train.steps: it teaches what it knew then)."""
    if not directory:
        raise UserError("techniques.distill.teacher is empty: train_and_evaluate trains a "
                        "teacher_config first and names its directory there")
    if parts.load_run is None:
        raise UserError(f"techniques.distill.teacher={directory!r} is a run directory: compose "
                        "through jaxopt_lab.build_experiment (or build_run), which can load it")
    teacher, dataset = parts.load_run(directory), parts.dataset
    if (teacher.dataset.input_shape, teacher.dataset.num_classes) != (
            dataset.input_shape, dataset.num_classes):
        raise UserError(
            f"distill teacher={directory!r} was trained on {teacher.dataset.name!r} (inputs "
            f"{teacher.dataset.input_shape}, {teacher.dataset.num_classes} outputs); the "
            f"student's {dataset.name!r} has inputs {dataset.input_shape}, "
            f"{dataset.num_classes} outputs")
    # The run layer's `warn_if_unfinished`, which this layer cannot import: the same rule.
    import json
    import os
    import sys

    steps, step = teacher.config.train.steps, teacher.step
    if step < steps:
        try:
            with open(os.path.join(directory, "summary.json")) as f:
                summary = json.load(f)
        except (OSError, ValueError):
            summary = {}
        # Ended there on purpose: early stopping, or a shrunk run's step-0 checkpoint.
        if summary.get("stopped_at") != step and not ("shrunk_from" in summary and step == 0):
            print(f"warning: distill teacher {directory} is at step {step} of its "
                  f"train.steps={steps}: the run stopped early (rerun its train command to "
                  "finish it)", file=sys.stderr)
    return teacher


def apply(parts: Parts, options: DistillOptions) -> Parts:
    """The loss seam: soft targets from the frozen teacher (and FitNets hints, which need the
    task's own loss to capture the student's layers)."""
    teacher = _load_teacher(parts, options.teacher)
    member, features = options.teacher_member, options.features
    if features and parts.own_loss:
        raise UserError("distill features need the task's own loss (it captures the student's "
                        "layers); with your loss_fn, use distill.wrap")
    loss_fn, extra_params, train_data = parts.loss(), parts.extra_params, None
    if parts.own_loss:
        check_student_loss(parts, loss_fn)
    if features:
        loss_fn = parts.task_loss(hints.capture_patterns([s for s, _ in features]))
        extra_params = hints.init_hints(
            parts.model, parts.sample_x,
            teacher_fn(teacher, member, hints.capture_patterns([t for _, t in features])),
            features)
    loss_fn = distill_wrap(loss_fn, teacher, temperature=options.temperature,
                           alpha=options.alpha, form=options.form, member=member,
                           features=features, feature_weight=options.feature_weight)
    if precompute_teacher_logits(parts.config, options, parts.dataset.task):
        train_data = functools.partial(with_teacher_logits, forward=teacher_fn(teacher, member))
    loss_options = {"temperature": options.temperature, "alpha": options.alpha,
                    "form": options.form, "feature_weight": options.feature_weight,
                    "member": member}
    record = {**loss_options, "features": [list(pair) for pair in features],
              "teacher": options.teacher, "transfer_size": options.transfer_size,
              "teacher_logits": "precomputed" if train_data else "in_step",
              **describe_teacher(teacher, member)}
    return dataclasses.replace(
        parts, loss_fn=loss_fn, extra_params=extra_params, train_data=train_data,
        hparams={**parts.hparams, TEMPERATURE: options.temperature, ALPHA: options.alpha},
        record={**parts.record, "distill": record})


def check_student_loss(parts: Parts, loss_fn) -> None:
    """The caller's loss returns the student's outputs as aux["logits"] (the soft loss compares
    them with the teacher's): traced once on shapes, so a missing key is one line now rather
    than an error deep inside the compiled step."""
    variables = abstract_variables(parts.model, parts.sample_x)
    batch = {k: jax.ShapeDtypeStruct((len(parts.sample_x), *v.shape[1:]), v.dtype)
             for k, v in parts.dataset.train.items()}
    hparams = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in parts.hparams}
    _, aux = jax.eval_shape(loss_fn, variables["params"],
                            {k: v for k, v in variables.items() if k != "params"}, batch,
                            jax.random.key(0), hparams)
    if not isinstance(aux, dict) or "logits" not in aux:
        name = getattr(parts.user_loss, "__name__", "yours")
        raise UserError(f"techniques.distill needs the student's outputs: loss_fn {name!r} must "
                        "return them as aux['logits'] (and aux['inputs'] where it augments)")


def recognise(parts: Parts) -> Parts | None:
    """A loss the caller passed through `distill.wrap`."""
    record = distillation_record(parts.user_loss) if parts.own_loss else None
    if record is None:
        return None
    return dataclasses.replace(parts, record={**parts.record, "distill": record})


def prepare_data(config: ml_collections.ConfigDict, dataset: Dataset) -> Dataset:
    """The transfer set joins the training arrays (unlabelled, the teacher labels them)."""
    options = DistillOptions(**TECHNIQUE.block(config))
    if not (options.transfer_size and options.on):
        return dataset
    return with_transfer(dataset, transfer_inputs(dataset.name, options.transfer_size,
                                                  config.data.dir or None))


TECHNIQUE = Technique(name="distill", options=DistillOptions, check=check, apply=apply,
                      seam="loss", recognise=recognise,
                      prepare_data=prepare_data)
