"""Transfer sets and precomputed teacher logits: what distillation adds to the training arrays.

A transfer set is extra unlabeled inputs the teacher labels (Hinton et al. 2015 distil on one).
They join the training arrays with `labeled` = 0 and a placeholder label the hard loss masks out
(`core.tasks.LABELED`), so both feeds, populations and checkpoints handle them like any example.
MNIST-1D's generator makes as many fresh samples as asked, from a seed none of its splits used;
for other data sets, on-device augmentation (`data.augment`) is the source of new inputs: the
teacher labels exactly the augmented inputs the student sees.

Precomputed logits: with no augmentation, the teacher's logits for a training example never
change, so computing them once (a forward pass over the training arrays) replaces a teacher
forward in every step. They travel as the batch key TEACHER_LOGITS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from jaxopt_lab.core.tasks import LABELED
from jaxopt_lab.data.generated import GENERATORS, generated_examples
from jaxopt_lab.data.sources import Dataset
from jaxopt_lab.errors import UserError

TEACHER_LOGITS = "teacher_logits"  # batch key of precomputed teacher outputs
TRANSFER_SEED = 1  # a generator seed of its own (data/generated.py)
MIX_SEED = 0  # fixes where the transfer examples sit among the labelled ones


def transfer_inputs(name: str, size: int, data_dir: str | None = None) -> np.ndarray:
    """`size` fresh inputs from data set `name`'s generator (cached in the data dir)."""
    if name not in GENERATORS:
        raise UserError(f"techniques.distill.transfer_size: data set {name!r} has no generator "
                        f"of fresh inputs (only {', '.join(GENERATORS)}); set data.augment for "
                        "new inputs from the training set instead")
    return generated_examples(name, size, TRANSFER_SEED, data_dir)["x"]


def with_transfer(dataset: Dataset, x: np.ndarray) -> Dataset:
    """`dataset` whose training arrays also hold the unlabeled inputs `x`, spread among the
    labelled ones by a fixed permutation (a feed that walks the stored order meets both in every
    stretch); every training example gains `labeled` (1 or 0)."""
    train = dataset.train
    if x.shape[1:] != train["x"].shape[1:]:
        raise UserError(f"transfer inputs of shape {x.shape[1:]} do not match the data set's "
                        f"{train['x'].shape[1:]}")
    n, extra = len(train["label"]), len(x)
    label = train["label"]
    placeholder = np.zeros((extra, *label.shape[1:]), label.dtype)
    merged = {"x": np.concatenate([train["x"], x.astype(train["x"].dtype)]),
              "label": np.concatenate([label, placeholder]),
              LABELED: np.concatenate([np.ones(n, np.float32), np.zeros(extra, np.float32)])}
    for key in train:
        if key not in merged:
            raise UserError(f"transfer set: training key {key!r} has no value for an "
                            "unlabeled example")
    order = np.random.default_rng(MIX_SEED).permutation(n + extra)
    return dataclasses.replace(dataset, train={k: v[order] for k, v in merged.items()})


def with_teacher_logits(dataset: Dataset, forward: Callable, batch_size: int = 1024) -> Dataset:
    """`dataset` whose training arrays also hold the teacher's logits for each example, computed
    once here (`forward(x) -> (logits, intermediates)`, as `teacher.teacher_fn` makes)."""
    logits_of = jax.jit(lambda x: forward(x)[0])
    x = dataset.train["x"]
    logits = np.concatenate([np.asarray(logits_of(x[i:i + batch_size]))
                             for i in range(0, len(x), batch_size)])
    return dataclasses.replace(dataset, train={**dataset.train, TEACHER_LOGITS: logits})
