"""Distillation in a composed experiment: the `techniques.distill` block and its adapter.

The block is `DistillOptions` as it is. The teacher is a run directory, read through the
caller's `Parts.load_run` (loading a run is the run layer's work, above the techniques); a
teacher still to be trained from `teacher_config` is trained first by the workflow
(`workflows/train.py`), which then names its directory here.
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections

from jaxopt_lab.data.sources import Dataset
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.contract import Parts, Technique
from jaxopt_lab.techniques.distill import ALPHA, TEMPERATURE, describe_teacher, hints, teacher_fn
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
    """The block's options (checked), or None where distillation is off."""
    options = DistillOptions(**TECHNIQUE.block(config))
    if not options.on:
        return None
    check_teacher(options)
    check_loss_options(options.temperature, options.alpha, options.form)
    features = hints.check_features(options.features, options.feature_weight)
    return dataclasses.replace(options, features=tuple(features))


def precompute_teacher_logits(config: ml_collections.ConfigDict, options: DistillOptions,
                              task: str) -> bool:
    """Whether the teacher's logits are computed once before training (see teacher_logits)."""
    if options.teacher_logits != "auto":
        return options.teacher_logits == "precomputed"
    augmented = any(bool(v) for v in config.data.augment.values())
    return not augmented and not options.features and task == "classification"


def _load_teacher(parts: Parts, directory: str):
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
    return teacher


def apply(parts: Parts, options: DistillOptions) -> Parts:
    """The loss seam: soft targets from the frozen teacher (and FitNets hints, which need the
    task's own loss to capture the student's layers)."""
    teacher = _load_teacher(parts, options.teacher)
    member, features = options.teacher_member, options.features
    loss_fn, extra_params, train_data = parts.loss(), parts.extra_params, None
    if features:
        if parts.own_loss:
            raise UserError("distill features need the task's own loss (it captures the "
                            "student's layers); with your loss_fn, use distill.wrap")
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
              **describe_teacher(teacher, options.teacher, member)}
    return dataclasses.replace(
        parts, loss_fn=loss_fn, extra_params=extra_params, train_data=train_data,
        hparams={**parts.hparams, TEMPERATURE: options.temperature, ALPHA: options.alpha},
        record={**parts.record, "distill": record})


def prepare_data(config: ml_collections.ConfigDict, dataset: Dataset) -> Dataset:
    """The transfer set joins the training arrays (unlabelled, the teacher labels them)."""
    options = DistillOptions(**TECHNIQUE.block(config))
    if not (options.transfer_size and options.on):
        return dataset
    return with_transfer(dataset, transfer_inputs(dataset.name, options.transfer_size,
                                                  config.data.dir or None))


TECHNIQUE = Technique(name="distill", options=DistillOptions, check=check, apply=apply,
                      prepare_data=prepare_data)
