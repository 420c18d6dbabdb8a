"""The modules injected at the model's quantization seams.

`QuantizedDotGeneral` (every Dense, DenseGeneral and, through `DotGeneralEinsum`, attention's
matmuls) hands the matmul to AQT's `AqtDotGeneral`: forward and both backward matmuls quantized
as the AQT config says, its weights frozen to int8 and scales on conversion. `QuantizedConv`
quantizes a conv's kernel (and input) with AQT's quantizer around a float conv with a
straight-through gradient, because aqtp 0.9.0's `AqtConvGeneralDilated` passes no gradient to the
kernel. Each module finds its layer's parameter path and leaves the layer in float where a `skip`
pattern matches it, so the model's code names nothing.

A module's `mode` is AQT's `QuantMode`: TRAIN (quantize on the fly: QAT and its evaluation),
CALIBRATE (accumulate static activation ranges), CONVERT (also store int8 weights and scales in
the "aqt" collection), SERVE (compute from the stored ones; the float kernels are not read).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from aqt.jax.v2 import aqt_tensor
from aqt.jax.v2 import utils as aqt_utils
from aqt.jax.v2.flax import aqt_flax
from flax import linen as nn

from jaxopt_lab.techniques.quantize.options import (
    QUANT_COLLECTION,
    QuantizeOptions,
    dot_general_config,
    tensor_quantizer,
)

QuantMode = aqt_utils.QuantMode
_FROZEN = "qrhs"  # the name both modules store a frozen weight under, as AQT's Freezer does


def layer_path(module: nn.Module) -> str:
    """The parameter-path prefix of the layer that called `module`, e.g. "['Dense_0']"."""
    return "".join(f"['{part}']" for part in module.scope.path[:-1])


def skipped(module: nn.Module, skip: tuple[str, ...]) -> bool:
    """True where a `skip` pattern matches the calling layer's kernel path."""
    path = layer_path(module) + "['kernel']"
    return any(re.search(pattern, path) for pattern in skip)


@jax.custom_vjp
def straight_through(x: jax.Array, x_quantized: jax.Array) -> jax.Array:
    """`x_quantized` forward, the identity's gradient to `x` backward (Bengio et al. 2013). The
    forward value is exactly `x_quantized`, so serving from stored values reproduces it bit for
    bit (`x + stop_gradient(xq - x)` would not: float addition does not cancel exactly)."""
    return x_quantized


def _straight_through_fwd(x, x_quantized):
    return x_quantized, jnp.zeros_like(x_quantized)


def _straight_through_bwd(zeros, g):
    return g, zeros


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


class QuantizedDotGeneral(nn.Module):
    """A `dot_general_cls`: AQT's quantized matmul where the layer is quantized, else lax's."""

    options: QuantizeOptions
    skip: tuple[str, ...] = ()
    mode: QuantMode = QuantMode.TRAIN

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        rhs_is_weight = self.parent is not None and self.parent.has_variable("params", "kernel")
        quantized = not skipped(self, self.skip) and (
            rhs_is_weight or (self.options.activations and self.options.attention))
        if not quantized:
            return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                       preferred_element_type=preferred_element_type)
        frozen = rhs_is_weight and self.mode in (QuantMode.CONVERT, QuantMode.SERVE)
        aqt_dot_general = aqt_flax.AqtDotGeneral(
            dot_general_config(self.options, rhs_is_weight=rhs_is_weight),
            # AQT draws stochastic-rounding noise from the step's "params" stream (core/tasks.py).
            prng_name="params" if self.has_rng("params") else None,
            lhs_quant_mode=(QuantMode.CALIBRATE if self.mode == QuantMode.CALIBRATE
                            else QuantMode.TRAIN),
            rhs_quant_mode=self.mode if frozen else QuantMode.TRAIN,
            rhs_freeze_mode=(aqt_flax.FreezerMode.CALIBRATION_AND_VALUE if frozen
                             else aqt_flax.FreezerMode.NONE),
            rhs_var_name=_FROZEN,
            quant_collection=QUANT_COLLECTION,
            name="aqt",
        )
        return aqt_dot_general(lhs, rhs, dimension_numbers, None)


class QuantizedConv(nn.Module):
    """A `conv_general_dilated_cls`: a float conv of AQT-quantized kernel (and input)."""

    options: QuantizeOptions
    skip: tuple[str, ...] = ()
    mode: QuantMode = QuantMode.TRAIN

    @nn.compact
    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                 precision=None, preferred_element_type=None):
        def conv(lhs, rhs):
            return jax.lax.conv_general_dilated(
                lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count, batch_group_count, precision, preferred_element_type)

        if skipped(self, self.skip):
            return conv(lhs, rhs)
        numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        kernel = self._kernel(rhs, out_axis=numbers.rhs_spec[0])
        if self.options.activations:
            lhs = self._input(lhs, batch_axis=numbers.lhs_spec[0])
        return conv(lhs, kernel)

    def _kernel(self, rhs: jax.Array, out_axis: int) -> jax.Array:
        if self.mode == QuantMode.SERVE:
            frozen = self.get_variable(QUANT_COLLECTION, _FROZEN)
            qt = aqt_tensor.QTensor(qvalue=frozen["value"], scale=[frozen["scale"]],
                                    scale_t=None, bias=[], dequant_dtype=rhs.dtype)
            return qt.dequant()
        axes = ([a for a in range(rhs.ndim) if a != out_axis] if self.options.per_channel
                else list(range(rhs.ndim)))
        qt, _ = tensor_quantizer(self.options).quant(rhs, calibration_axes=axes)
        if self.mode == QuantMode.CONVERT:
            self.put_variable(QUANT_COLLECTION, _FROZEN,
                              {"value": qt.qvalue, "scale": qt.scale[0]})
        return straight_through(rhs, qt.dequant())

    def _input(self, lhs: jax.Array, batch_axis: int) -> jax.Array:
        """Per example on every batch, or one calibrated scale for the layer (static)."""
        static = self.options.static_activations
        quantizer = tensor_quantizer(self.options, static=static)
        quantizer.context = aqt_utils.Context(
            key=None, train_step=None,
            quant_mode=QuantMode.CALIBRATE if self.mode == QuantMode.CALIBRATE
            else QuantMode.TRAIN)
        if static:
            quantizer.calib_shared_axes = "per_tensor"
        axes = [a for a in range(lhs.ndim) if a != batch_axis]
        qt, _ = quantizer.quant(lhs, calibration_axes=axes)
        return straight_through(lhs, qt.dequant())


def inject(model, options: QuantizeOptions, skip: tuple[str, ...],
           mode: QuantMode = QuantMode.TRAIN):
    """`model` with the seam classes it has fields for set to these options, skip and mode."""
    seams = {"dot_general_cls": functools.partial(QuantizedDotGeneral, options, skip, mode),
             "conv_general_dilated_cls": functools.partial(QuantizedConv, options, skip, mode)}
    fields = {f.name for f in dataclasses.fields(model)}
    return model.clone(**{k: v for k, v in seams.items() if k in fields})
