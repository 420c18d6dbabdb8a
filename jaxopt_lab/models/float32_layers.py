"""A per-layer precision policy: the model computes in `train.compute_dtype`, except the layers
named by `train.float32_layers`, which compute in float32.

By default these are the layer reading the input and the one writing the logits, as quantization
keeps them (`core/layers.py`): bfloat16 keeps 8 bits of mantissa, so the input signal is
rounded to ~3 significant digits before the first product, and the logits' small differences
before the softmax (Micikevicius et al. 2018 keep the loss and softmax in float32; Kalamkar et al.
2019 the first and last layers of their bfloat16 CNNs).

It works on any Flax module with a `dtype` field (the registry's and a user's own) without the
model's cooperation: the model becomes an instance of a subclass of its own class that runs its
`__call__` under `nn.intercept_methods`; the interceptor runs each matched submodule's call with
that submodule's `dtype` set to float32 (its layers created in that call inherit it). Parameters,
their paths and checkpoints are unchanged; `clone()` keeps the policy (it is a dataclass field).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxopt_lab.errors import UserError

FIELD = "float32_layers"
_SUBCLASSES: dict[type, type] = {}  # a model class -> its subclass with the policy


def with_float32_layers(model: nn.Module, patterns: Sequence[str]) -> nn.Module:
    """`model` with the layers matched by `patterns` (regular expressions searched in a layer's
    parameter path prefix, "['Conv_0']", as `skip` reads them) computing in float32; `model`
    itself where there are none."""
    patterns = tuple(patterns)
    if not patterns:
        return model
    fields = dataclasses.fields(model)
    names = {f.name for f in fields}
    if "dtype" not in names:
        raise UserError(f"train.float32_layers needs a `dtype` field on model "
                        f"{type(model).__name__}, which has none")
    if FIELD in names:
        return model.clone(**{FIELD: patterns})
    values = {f.name: getattr(model, f.name) for f in fields
              if f.init and f.name not in ("parent", "name")}
    return _policy_class(type(model))(**values, **{FIELD: patterns})


def computes_below_float32(model: nn.Module) -> bool:
    """Whether `model` has a `dtype` lower than float32 (the case a layer policy is for)."""
    dtype = getattr(model, "dtype", None)
    return dtype is not None and jnp.dtype(dtype) != jnp.dtype(jnp.float32)


def float32_layers_of(model: nn.Module) -> tuple[str, ...]:
    """The patterns `with_float32_layers` gave `model` (() for none)."""
    return tuple(getattr(model, FIELD, ()))


def precision_record(model: nn.Module) -> dict[str, Any]:
    """What summary.json says of the precision the model computed in: {} for float32."""
    if not computes_below_float32(model):
        return {}
    return {"precision": {"compute_dtype": jnp.dtype(model.dtype).name,
                          FIELD: list(float32_layers_of(model))}}


def _policy_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        call = cls.__call__

        @functools.wraps(call)
        def __call__(self, *args, **kwargs):
            interceptor = functools.partial(_in_float32, tuple(map(re.compile, getattr(self, FIELD))))
            with nn.intercept_methods(interceptor):
                return call(self, *args, **kwargs)

        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__annotations__": {FIELD: tuple}, FIELD: (), "__call__": __call__})
    return _SUBCLASSES[cls]


def _in_float32(patterns, next_fun, args, kwargs, context):
    module = context.module
    prefix = "".join(f"['{part}']" for part in module.path)
    if (context.method_name != "__call__" or not module.path or not hasattr(module, "dtype")
            or not any(p.search(prefix) for p in patterns)):
        return next_fun(*args, **kwargs)
    kept = module.dtype
    object.__setattr__(module, "dtype", jnp.float32)  # for this call only
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "dtype", kept)
