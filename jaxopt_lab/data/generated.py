"""Fresh examples from a data set's own generator: MNIST-1D makes as many as asked.

They give a validation split that leaves a paper's train and test splits untouched
(`data.generated_validation`), and distillation its transfer sets. Each use draws from its own
generator seed, and none is the seed (42) the published splits come from, so no use shares an
example with another or with the splits.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from jaxopt_lab.data.builders import make_mnist1d
from jaxopt_lab.data.sources import Dataset, default_data_dir
from jaxopt_lab.errors import UserError

GENERATORS = ("mnist1d",)  # data sets whose generator makes fresh examples
VALIDATION_GENERATOR_SEED = 2  # transfer sets use 1 (techniques/distill/transfer.py), splits 42
_CLASSES = 10


def generated_examples(name: str, size: int, seed: int,
                       data_dir: str | None = None) -> dict[str, np.ndarray]:
    """{"x" float32, "label" int32}: `size` fresh examples of data set `name` from generator seed
    `seed`, classes balanced, cached in the data dir (MNIST-1D takes ~0.6 ms an example)."""
    if name not in GENERATORS:
        raise UserError(f"data set {name!r} has no generator of fresh examples (only "
                        f"{', '.join(GENERATORS)})")
    directory = os.path.join(os.path.expanduser(data_dir or default_data_dir()), "generated")
    path = os.path.join(directory, f"{name}_seed{seed}_{size}.npz")
    if os.path.exists(path):
        with np.load(path) as cached:
            return {"x": cached["x"], "label": cached["label"]}
    data = make_mnist1d(num_samples=math.ceil(size / _CLASSES) * _CLASSES, seed=seed,
                        train_split=1.0)
    examples = {"x": data["x"][:size].astype(np.float32),
                "label": data["y"][:size].astype(np.int32)}
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.{os.getpid()}.npz"
    np.savez(partial, **examples)
    os.replace(partial, path)  # atomic: a concurrent run reads the whole file or none
    return examples


def with_generated_validation(dataset: Dataset, size: int,
                              data_dir: str | None = None) -> Dataset:
    """`dataset` with `size` fresh generator examples as its validation split (train and test
    untouched); unchanged where `size` is 0 or it has a validation split already (a run's own
    data set handed back: shrink, quantize and export pass the prepared one)."""
    if size <= 0 or dataset.validation is not None:
        return dataset
    if dataset.name not in GENERATORS:
        raise UserError(f"data.generated_validation={size}: data set {dataset.name!r} has no "
                        f"generator of fresh examples (only {', '.join(GENERATORS)}); hold out "
                        "part of train with data.validation_fraction instead")
    examples = generated_examples(dataset.name, size, VALIDATION_GENERATOR_SEED, data_dir)
    return dataclasses.replace(dataset, validation={
        "x": examples["x"].astype(dataset.train["x"].dtype),
        "label": examples["label"].astype(dataset.train["label"].dtype)})
