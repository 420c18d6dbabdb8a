"""Quantization in a composed experiment: the `techniques.quantize` block and its adapter.

The block is `QuantizeOptions` with one key in front, `method` (none | qat), the config's off
switch; `static_activations` stays out of it, since static scales come from calibrating a
trained run (`jaxopt-lab quantize --calibrate N`), not from training.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.contract import Parts, Technique
from jaxopt_lab.techniques.quantize import quantization_of, state_metrics, wrap
from jaxopt_lab.techniques.quantize.options import QuantizeOptions, quantize_options

METHODS = ("none", "qat")


def check(config: ml_collections.ConfigDict) -> QuantizeOptions | None:
    """The block's options (checked), or None where quantization is off."""
    block = TECHNIQUE.block(config)
    method = block.pop("method")
    if method not in METHODS:
        raise UserError(f"techniques.quantize.method={method!r} is unknown; allowed: "
                        f"{', '.join(METHODS)}")
    options = quantize_options(**block)
    return options if method == "qat" else None


def apply(parts: Parts, options: QuantizeOptions) -> Parts:
    """AQT at the model seam; the default skip is read from the model as the caller gave it."""
    return _quantized(parts, wrap(parts.model, sample_x=parts.sample_x,
                                  **dataclasses.asdict(options)))


def recognise(parts: Parts) -> Parts | None:
    """A model the caller passed through `quantize.wrap`."""
    try:
        quantization_of(parts.model)
    except ValueError:
        return None
    return _quantized(parts, parts.model)


def _quantized(parts: Parts, model) -> Parts:
    resolved, skip = quantization_of(model)
    return dataclasses.replace(
        parts, model=model,
        record={**parts.record, "quantize": {**resolved.describe(), "skip": list(skip)}},
        state_metrics=(*parts.state_metrics, state_metrics(model, parts.sample_x)))


TECHNIQUE = Technique(name="quantize", options=QuantizeOptions, check=check, apply=apply,
                      seam="model", recognise=recognise, config_only={"method": "none"},
                      python_only=("static_activations",))
