"""Flax models and their registry; every model takes the quantization seams.

Each model is a linen dataclass with `num_classes`, its tunable hyperparameters (with defaults) and
two seams, `dot_general_cls` (passed to every Dense/DenseGeneral) and `conv_general_dilated_cls`
(passed to every Conv); with both None a model is plain Flax. `__call__(x, train=False)` returns
logits [B, num_classes]; BatchNorm statistics, where a model has them, are in `batch_stats`.

The registry is this explicit dict, so what exists is readable here and importing a module
registers nothing.
"""

import dataclasses
from typing import Any

from flax import linen as nn

from jaxopt_lab.errors import UserError
from jaxopt_lab.models.cnn1d import CNN1D
from jaxopt_lab.models.cnn2d import CNN2D
from jaxopt_lab.models.logreg import LogReg
from jaxopt_lab.models.mlp import MLP
from jaxopt_lab.models.resnet import ResNet
from jaxopt_lab.models.vit import ViT

__all__ = [
    "CNN1D",
    "CNN2D",
    "MLP",
    "MODELS",
    "LogReg",
    "ResNet",
    "ViT",
    "build_model",
    "model_hparams",
]

MODELS: dict[str, type[nn.Module]] = {
    "logreg": LogReg,
    "mlp": MLP,
    "cnn1d": CNN1D,
    "cnn2d": CNN2D,
    "resnet": ResNet,
    "vit": ViT,
}

# Dataclass fields that are not tunable: the task's output size, the seams, and Flax's own.
_NOT_HPARAMS = frozenset(
    {"num_classes", "dot_general_cls", "conv_general_dilated_cls", "parent", "name"}
)


def _model_cls(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise UserError(f"model.name={name!r} is unknown; allowed: {', '.join(MODELS)}")
    return MODELS[name]


def model_hparams(name: str) -> dict[str, Any]:
    """The tunable hyperparameters of model `name` and their defaults, e.g. {"hidden": (100, 100)}.

    >>> model_hparams("cnn1d")
    {'channels': 25}
    """
    return {
        f.name: f.default
        for f in dataclasses.fields(_model_cls(name))
        if f.init and f.name not in _NOT_HPARAMS
    }


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    """`value` in the type of `default`: config lists become tuples; a wrong type is a UserError."""
    if isinstance(default, tuple) and isinstance(value, list | tuple):
        value = tuple(value)
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = type(value) is type(default)  # exact, so that True is not taken for an int
    if not ok:
        raise UserError(
            f"model.{key}={value!r} has the wrong type for model {name!r}; "
            f"allowed: a {type(default).__name__} like the default {default!r}"
        )
    return value


def build_model(
    name: str,
    num_classes: int,
    *,
    dot_general_cls: Any = None,
    conv_general_dilated_cls: Any = None,
    **hparams: Any,
) -> nn.Module:
    """Model `name` with `num_classes` outputs, the given seams and hyperparameters.

    Hyperparameters not given keep their defaults (see `model_hparams`); lists, as they may arrive
    from a config, are accepted where a tuple is expected.

    >>> build_model("mlp", 10, hidden=[64]).hidden
    (64,)
    """
    allowed = model_hparams(name)
    for key in hparams:
        if key not in allowed:
            raise UserError(
                f"model.{key} is not a hyperparameter of model {name!r}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes={num_classes!r} is invalid; allowed: a positive integer")
    hparams = {k: _coerce(name, k, v, allowed[k]) for k, v in hparams.items()}
    return MODELS[name](
        num_classes=num_classes,
        dot_general_cls=dot_general_cls,
        conv_general_dilated_cls=conv_general_dilated_cls,
        **hparams,
    )
