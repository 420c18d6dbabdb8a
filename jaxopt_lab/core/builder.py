"""The one place that reads a config's model, optim and techniques blocks and composes the seams."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import ml_collections
import optax

from jaxopt_lab.core.optim import build_optimizer
from jaxopt_lab.core.step import LossFn, Reducer, classification_loss, pmean_reducer
from jaxopt_lab.data.augment import make_augment
from jaxopt_lab.data.sources import Dataset
from jaxopt_lab.models import build_model


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The four seams, ready for `make_train_step(loss_fn, reducer, tx, mesh)`."""

    model: nn.Module
    loss_fn: LossFn
    reducer: Reducer
    tx: optax.GradientTransformationExtraArgs


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The model hyperparameters a config sets (everything in `model` but its name)."""
    return {k: v for k, v in config.model.items() if k != "name"}


def build_experiment(config: ml_collections.ConfigDict, dataset: Dataset) -> Experiment:
    """Composes model, loss, reduction and update from a validated config.

    Techniques plug in here, each at its own seam; `validate` rejects any that are not available.
    """
    model = build_model(config.model.name, dataset.num_classes, **model_kwargs(config))
    augment = make_augment(**config.data.augment.to_dict())
    return Experiment(
        model=model,
        loss_fn=classification_loss(model, augment),
        reducer=pmean_reducer(),
        tx=build_optimizer(config.optim, config.train.steps),
    )
