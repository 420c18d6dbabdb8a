"""Flax models and their registry; every model takes the quantization seams.

Each model is a linen dataclass with `num_classes`, its tunable hyperparameters (with defaults),
two seams, `dot_general_cls` (passed to every Dense/DenseGeneral) and `conv_general_dilated_cls`
(passed to every Conv), with both None a plain Flax model, and two execution fields: `dtype`, the
computation dtype (Flax's `dtype` of every layer; parameters stay float32, Flax's `param_dtype`),
and `remat` (`models/remat.py`). `__call__(x, train=False)` returns
logits [B, num_classes] ([B, T, num_classes] for the language model); BatchNorm statistics, where
a model has them, are in `batch_stats`.

The registry is this explicit dict, so what exists is readable here and importing a module
registers nothing.

Models also describe themselves to the techniques that change them, so that no technique keeps a
table of model classes: `WIDTH_KEYS` (a class attribute: the hyperparameters setting the width,
which a half-width distillation student halves; see `width_keys`) and, for channel pruning and
surgery, the `models.channels.ChannelModel` methods.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from jaxopt_lab.errors import UserError
from jaxopt_lab.importpath import is_import_path, load_object
from jaxopt_lab.models.cnn1d import CNN1D
from jaxopt_lab.models.cnn2d import CNN2D
from jaxopt_lab.models.logreg import LogReg
from jaxopt_lab.models.mlp import MLP
from jaxopt_lab.models.remat import check_remat
from jaxopt_lab.models.resnet import ResNet, ResNet18
from jaxopt_lab.models.transformer_lm import TransformerLM
from jaxopt_lab.models.vit import ViT

__all__ = [
    "CNN1D",
    "CNN2D",
    "MLP",
    "MODELS",
    "NOT_HPARAMS",
    "LogReg",
    "ResNet",
    "ResNet18",
    "TransformerLM",
    "ViT",
    "build_model",
    "model_hparams",
    "width_keys",
    "with_execution",
]

MODELS: dict[str, type[nn.Module]] = {
    "logreg": LogReg,
    "mlp": MLP,
    "cnn1d": CNN1D,
    "cnn2d": CNN2D,
    "resnet": ResNet,
    "resnet18": ResNet18,
    "vit": ViT,
    "transformer_lm": TransformerLM,
}

# Dataclass fields that are not tunable: the task's output size, the seams, how the model
# executes (set from train.compute_dtype, train.float32_layers and train.remat), and Flax's own.
NOT_HPARAMS = frozenset(
    {"num_classes", "dot_general_cls", "conv_general_dilated_cls", "dtype", "remat", "parent",
     "name", "float32_layers"}
)



def _model_cls(name: str) -> type[nn.Module]:
    """A registry name, or an import path "package.module:Class" to a user's own linen module
    (a dataclass taking `num_classes`, hyperparameters with defaults, and optionally the seams)."""
    if is_import_path(name):
        cls = load_object(name, "model.name")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise UserError(f"model.name={name!r} is not a flax.linen Module class")
        if "num_classes" not in {f.name for f in dataclasses.fields(cls)}:
            raise UserError(f"model.name={name!r}: the module has no `num_classes` field "
                            "(the registry's convention: the output width is num_classes)")
        required = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in
                    NOT_HPARAMS and f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        if required:
            raise UserError(f"model.name={name!r}: fields {required} have no default; every "
                            "hyperparameter needs one (configs override them by key)")
        return cls
    if name not in MODELS:
        raise UserError(f"model.name={name!r} is unknown; allowed: {', '.join(MODELS)} "
                        "or an import path package.module:Class")
    return MODELS[name]


def model_hparams(name: str) -> dict[str, Any]:
    """The tunable hyperparameters of model `name` and their defaults, e.g. {"hidden": (100, 100)}.

    >>> model_hparams("cnn1d")
    {'channels': 25}
    """
    return {
        f.name: f.default
        for f in dataclasses.fields(_model_cls(name))
        if f.init and f.name not in NOT_HPARAMS
    }


def width_keys(name: str) -> tuple[str, ...]:
    """The hyperparameters that set model `name`'s width (its class's `WIDTH_KEYS`); () for a
    model that has none (logreg) or does not say (a module of your own without `WIDTH_KEYS`).

    >>> width_keys("vit")
    ('dim', 'mlp_dim')
    """
    return tuple(getattr(_model_cls(name), "WIDTH_KEYS", ()))


# Widths whose default is one int for every layer that also take a tuple of one int per layer,
# the uneven widths a channel-pruned model has after `prune.shrink`: model name -> keys.
_INT_OR_TUPLE = {"cnn1d": frozenset({"channels"})}


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    """`value` in the type of `default`: config lists become tuples; a wrong type is a UserError."""
    per_layer = key in _INT_OR_TUPLE.get(name, ())
    if (isinstance(default, tuple) or per_layer) and isinstance(value, list | tuple):
        value = tuple(value)
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = type(value) is type(default)  # exact, so that True is not taken for an int
    if not ok:
        allowed = f"a {type(default).__name__} like the default {default!r}"
        raise UserError(f"model.{key}={value!r} has the wrong type for model {name!r}; allowed: "
                        + (f"{allowed} or a tuple of ints" if per_layer else allowed))
    return value


def with_execution(model: nn.Module, *, dtype: Any = jnp.float32,
                   remat: str = "none") -> nn.Module:
    """`model` computing in `dtype` with `remat`; unchanged where both are the defaults, so a
    module without the fields runs as it is, and one set up by its caller keeps its own values.

    Raises:
      UserError: a non-default value for a module that has no such field.
    """
    check_remat(remat)
    asked = {}
    if jnp.dtype(dtype) != jnp.dtype(jnp.float32):
        asked["dtype"] = dtype
    if remat != "none":
        asked["remat"] = remat
    fields = {f.name for f in dataclasses.fields(model)}
    for key, value in asked.items():
        if key not in fields:
            setting, shown = (("train.compute_dtype", jnp.dtype(value).name) if key == "dtype"
                              else ("train.remat", value))
            raise UserError(f"{setting}={shown!r} needs a `{key}` field on model "
                            f"{type(model).__name__}, which has none: add one and pass it to its "
                            "layers as the registry's models do (jaxopt_lab/models), or keep "
                            f"{setting} at its default")
    return model.clone(**asked) if asked else model


def build_model(
    name: str,
    num_classes: int,
    *,
    dtype: Any = jnp.float32,
    remat: str = "none",
    dot_general_cls: Any = None,
    conv_general_dilated_cls: Any = None,
    **hparams: Any,
) -> nn.Module:
    """Model `name` with `num_classes` outputs, the given seams and hyperparameters, computing in
    `dtype` (parameters stay float32) with `remat` (`models/remat.py`).

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
    cls = _model_cls(name)
    seams = {"dot_general_cls": dot_general_cls,
             "conv_general_dilated_cls": conv_general_dilated_cls}
    fields = {f.name for f in dataclasses.fields(cls)}
    for seam, value in seams.items():
        if value is not None and seam not in fields:
            raise UserError(f"model {name!r} has no {seam} seam to inject into")
    model = cls(num_classes=num_classes, **{k: v for k, v in seams.items() if k in fields},
                **hparams)
    return with_execution(model, dtype=dtype, remat=remat)
