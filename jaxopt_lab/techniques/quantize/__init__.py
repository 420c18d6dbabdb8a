"""Quantization at the model seam, with AQT (`aqtp`) numerics.

    model = quantize.wrap(build_model("cnn1d", 10), sample_x=x)        # int8 QAT, w8a8
    model = quantize.wrap(my_module, skip=(), activations=False)       # int8 weights only
    serving = quantize.convert(model, variables, x)                    # int8 values + scales
    logits = jax.jit(quantize.serve_fn(model))(serving, x)             # no float kernels

`wrap` returns the same model with its `dot_general_cls` and `conv_general_dilated_cls` seams
filled, so its parameters, the step, the optimizer and every other technique are unchanged: a
float checkpoint loads into it (post-training quantization), and what trains is what serves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_lab.core.layers import abstract_variables, default_skip_or, param_paths, touched
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.quantize.layers import (
    QuantizedConv,
    QuantizedDotGeneral,
    QuantMode,
    inject,
    straight_through,
)
from jaxopt_lab.techniques.quantize.options import (
    QUANT_COLLECTION,
    QuantizeOptions,
    quantize_options,
)
from jaxopt_lab.techniques.quantize.serving import (
    calibrate,
    convert,
    quantization_of,
    serve_fn,
    served_eval_fn,
    with_mode,
)

__all__ = [
    "QUANT_COLLECTION",
    "QuantMode",
    "QuantizeOptions",
    "QuantizedConv",
    "QuantizedDotGeneral",
    "calibrate",
    "convert",
    "quantization_of",
    "quantize_options",
    "quantized_fraction",
    "resolve_skip",
    "serve_fn",
    "served_eval_fn",
    "state_metrics",
    "straight_through",
    "with_mode",
    "wrap",
]

def resolve_skip(options: QuantizeOptions, model, sample_x: Any = None) -> tuple[str, ...]:
    """`options.skip`, or where it is None the default: patterns for the model's first and last
    multiplying layers, found by tracing it on `sample_x` (nothing runs)."""
    return default_skip_or(
        options.skip, model, sample_x,
        "quantize.wrap: the default skip (first and last layers) needs sample_x, one batch of "
        "inputs; or pass skip=() to quantize every layer, or your own patterns")


def wrap(model, *, sample_x: Any = None, **options: Any):
    """`model` with AQT quantization injected at its seams.

    Args:
      model: a Flax linen module with a `dot_general_cls` field (every Dense takes one) and,
        if it has convs, `conv_general_dilated_cls`: the registry's models or your own.
      sample_x: a batch of inputs, needed only to find the default `skip` layers.
      options: the fields of `QuantizeOptions` (bits, numerics, backward, per_channel,
        activations, attention, static_activations, skip).
    """
    opts = quantize_options(**options)
    fields = {f.name for f in dataclasses.fields(model)}
    if "dot_general_cls" not in fields:
        raise UserError(f"quantize.wrap: {type(model).__name__} has no dot_general_cls field to "
                        "inject AQT into; add `dot_general_cls: Any = None` and pass it to its "
                        "Dense layers")
    return inject(model, opts, resolve_skip(opts, model, sample_x))


def quantized_fraction(model, sample_x: Any) -> float:
    """The share of a `wrap`ped model's multiplying layers' weights that are quantized (the
    rest are left in float by `skip`)."""
    _, skip = quantization_of(model)
    params = abstract_variables(model, sample_x)["params"]
    quantized = jax.tree.leaves(touched(params, skip))
    kernels = [(leaf.size, on) for path, leaf, on in
               zip(param_paths(params), jax.tree.leaves(params), quantized, strict=True)
               if path.endswith("['kernel']")]
    total = sum(size for size, _ in kernels) or 1
    return sum(size for size, on in kernels if on) / total


def state_metrics(model, sample_x: Any):
    """The step metrics a quantized run logs: its bits and `quantized_fraction`. Constants of
    the run.

    Raises:
      UserError: where no layer is quantized (`skip` covers them all): training would run in
        float under a quantization record.
    """
    options, skip = quantization_of(model)
    fraction = quantized_fraction(model, sample_x)
    if fraction == 0:
        raise UserError(f"quantize: no layer is left to quantize (skip={list(skip)} covers every "
                        "multiplying layer; the default leaves the first and last in float): "
                        "set skip=() or your own patterns")
    bits = 8 if options.numerics != "int" else options.bits

    def metrics(state) -> dict:
        del state
        return {"quantize_bits": jnp.float32(bits), "quantized_fraction": jnp.float32(fraction)}

    return metrics
