"""The static int8 serving form as an ONNX QDQ graph, with the run's own quantization parameters.

ONNX runtimes run int8 arithmetic where a float op reads DequantizeLinear outputs: ONNX Runtime
fuses `DQ(x) → Conv ← DQ(w)` into integer kernels (QLinearConv, MatMulInteger...), OpenVINO's
low-precision transformations do the same. So the exported program is the float model with two
substitutions at every quantized layer's seam (`dot_general_cls`, `conv_general_dilated_cls`):

- its weight is `dequantize(int8 value, per-channel scale)`: the values and scales that
  `jaxopt-lab quantize` froze (AQT's CONVERT), not recomputed;
- its input is `dequantize(quantize(x, scale))` with the layer's static per-tensor scale: AQT's
  calibrated mean of absolute maxima over AQT's quant bound (127.5 for int8), as AQT serves it.
  The quantized input is uint8 with zero point 128: the same 256 levels as int8 with zero point
  0 (the values are identical), and the type ONNX Runtime's x86 int8 products have their fast
  (VNNI) kernels for.

Plain convolutions can become products of input patches and the kernel matrix
(`export/conv_patches.py`), which ONNX Runtime runs as one int8 matrix product per layer
(`patch_ranks`: which ones, by their number of spatial axes).
The primitives are our own, lowered by jax2onnx (a plugin here) to QuantizeLinear /
DequantizeLinear and, under `jax.jit`, to the same arithmetic in XLA. Layers the run left in float
(`skip`), biases and BatchNorm stay float: BatchNorm after a quantized conv is not folded into it
(folding would change the frozen weights and scales the run served with).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.extend.core import Primitive
from jax.interpreters import mlir

from jaxopt_lab.errors import UserError
from jaxopt_lab.export.conv_patches import patch_padding, patch_product, patches
from jaxopt_lab.techniques.quantize import QUANT_COLLECTION, quantization_of
from jaxopt_lab.techniques.quantize.layers import layer_path, skipped
from jaxopt_lab.techniques.quantize.options import tensor_quantizer

_FROZEN = "qrhs"  # where AQT's freezer (and QuantizedConv) keep a layer's int8 weight
_CALIBRATION = "MeanOfAbsMaxCalibration_0"
ZERO_POINT = {np.dtype(np.uint8): 128, np.dtype(np.int8): 0}  # activations uint8, weights int8


def _quantize(x, scale):
    q = jnp.clip(jnp.round(x / scale), -128, 127)  # int8's levels, saturated as QuantizeLinear
    return (q + ZERO_POINT[np.dtype(np.uint8)]).astype(jnp.uint8)


def _dequantize(value, scale, *, axis: int):
    shape = [1] * value.ndim
    if scale.ndim:
        shape[axis] = scale.shape[0]
    zero = ZERO_POINT[np.dtype(value.dtype)]
    return (value.astype(scale.dtype) - zero) * scale.reshape(shape)


quantize_p = Primitive("jaxopt_quantize")
quantize_p.def_impl(_quantize)
quantize_p.def_abstract_eval(lambda x, scale: jax.core.ShapedArray(x.shape, jnp.uint8))
mlir.register_lowering(quantize_p, mlir.lower_fun(_quantize, multiple_results=False))

dequantize_p = Primitive("jaxopt_dequantize")
dequantize_p.def_impl(_dequantize)
dequantize_p.def_abstract_eval(
    lambda value, scale, *, axis: jax.core.ShapedArray(value.shape, scale.dtype))
mlir.register_lowering(dequantize_p, mlir.lower_fun(_dequantize, multiple_results=False))


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedLayer:
    """One quantized layer's frozen parameters: `value` int8 in the kernel's layout, `scale`
    per output channel (1-D over the kernel's `axes`, flattened where a DenseGeneral kernel has
    several output axes, e.g. heads × head_dim) or one scalar, and the static input scale."""

    value: np.ndarray
    scale: np.ndarray
    axes: tuple[int, ...]
    input_scale: np.ndarray | None


def quantized_layers(model, serving: dict) -> dict[str, QuantizedLayer]:
    """{layer path, e.g. "['Conv_1']": its frozen parameters} from a serving form written by
    `jaxopt-lab quantize` (`model` is its quantized model)."""
    options, _ = quantization_of(model)
    if options.numerics != "int" or options.bits != 8:
        raise UserError(f"ONNX int8 export: the serving form is {options.scheme}; ONNX QDQ "
                        "export supports int8 (bits=8, numerics='int') only")
    quant_bound = tensor_quantizer(options).numerics.get_quant_bound()
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(serving[QUANT_COLLECTION]))
    layers = {}
    for path in {p[:p.index(_FROZEN)] for p in flat if _FROZEN in p}:
        seam = next(i for i, part in enumerate(path) if part.startswith("Quantized"))
        value = np.asarray(flat[(*path, _FROZEN, "value")])
        scale = np.asarray(flat[(*path, _FROZEN, "scale")])
        channel_axes = _kernel_axes(value.shape, scale.shape, _layer_name(path[:seam]))
        input_scale = None
        if options.activations:
            total = flat.get((*path, _CALIBRATION, "sum_of_max"))
            if total is None:
                raise UserError(f"ONNX int8 export: layer {_layer_name(path[:seam])} quantizes its "
                                "input per batch (dynamic scales) and ONNX int8 needs static "
                                "ones: jaxopt-lab quantize --scheme w8a8 --calibrate N first "
                                "(or export --form model for the float model)")
            count = flat[(*path, _CALIBRATION, "count")]
            input_scale = np.asarray(np.ravel(total)[0] / count / quant_bound, np.float32)
        layers[_layer_name(path[:seam])] = QuantizedLayer(
            value, scale.reshape(-1) if channel_axes else scale.reshape(()), channel_axes,
            input_scale)
    return layers


def _kernel_axes(value_shape, scale_shape, layer: str) -> tuple[int, ...]:
    """The kernel axes a frozen per-channel scale runs along. AQT keeps a matmul weight's scale
    in the layout of the matmul's output (batch axes first, the kernel's output axes last), a
    conv's in the kernel's: right-aligned, both put the output channels over the kernel's
    trailing axes. DequantizeLinear takes one axis, so several must be adjacent."""
    offset = len(scale_shape) - len(value_shape)
    axes = tuple(a - offset for a, n in enumerate(scale_shape) if n > 1)
    if axes and (any(a < 0 or value_shape[a] != scale_shape[a + offset] for a in axes)
                 or axes != tuple(range(axes[0], axes[0] + len(axes)))):
        raise UserError(f"ONNX int8 export: layer {layer}'s weight scales {tuple(scale_shape)} do "
                        f"not run along adjacent axes of its kernel {tuple(value_shape)}")
    return axes


def _layer_name(path: tuple[str, ...]) -> str:
    return "".join(f"['{part}']" for part in path)


def _quantized(layer: QuantizedLayer | None, x):
    """`x` as the layer's int8 input (uint8 codes), or None where its input stays float."""
    if layer is None or layer.input_scale is None:
        return None
    return quantize_p.bind(x, jnp.asarray(layer.input_scale))


def _dequantized(layer: QuantizedLayer, codes):
    return dequantize_p.bind(codes, jnp.asarray(layer.input_scale), axis=0)


def _weight(layer: QuantizedLayer):
    """The dequantized kernel; several output axes are merged into one for DequantizeLinear's
    single `axis` and split again after."""
    value, axes = layer.value, layer.axes
    if not axes:
        return dequantize_p.bind(jnp.asarray(value), jnp.asarray(layer.scale), axis=0)
    merged = value.reshape(*value.shape[:axes[0]], -1, *value.shape[axes[-1] + 1:])
    weight = dequantize_p.bind(jnp.asarray(merged), jnp.asarray(layer.scale), axis=axes[0])
    return weight.reshape(value.shape)


def _kernel_matrix(layer: QuantizedLayer | None, kernel):
    """A conv kernel [*window, in, out] as the [-1, out] matrix patches multiply, dequantized
    from the frozen int8 one (scales along `out`) where the layer is quantized."""
    if layer is None:
        return kernel.reshape(-1, kernel.shape[-1])
    value = layer.value.reshape(-1, layer.value.shape[-1])
    return dequantize_p.bind(jnp.asarray(value), jnp.asarray(layer.scale),
                             axis=1 if layer.axes else 0)


class QdqDotGeneral(nn.Module):
    """A `dot_general_cls`: the layer's frozen int8 weight dequantized, its input quantized with
    its static scale; lax's matmul where the layer is float."""

    layers: Any  # dict[str, QuantizedLayer], keyed by layer path
    attention_skip: tuple[str, ...] | None = None  # the run's skip where attention is quantized

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        rhs_is_weight = self.parent is not None and self.parent.has_variable("params", "kernel")
        if (not rhs_is_weight and self.attention_skip is not None
                and not skipped(self, self.attention_skip)):
            raise UserError(f"ONNX int8 export: layer {layer_path(self)} quantizes a matmul of "
                            "two activations (attention) with per-batch scales, which ONNX QDQ "
                            "cannot express; quantize with attention=False")
        layer = self.layers.get(layer_path(self))
        codes = _quantized(layer, lhs)
        if codes is not None:
            lhs = _dequantized(layer, codes)
        if layer is not None:
            rhs = _weight(layer)
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type=preferred_element_type)


class QdqConv(nn.Module):
    """A `conv_general_dilated_cls`: as `QdqDotGeneral`, for convolutions; a plain one (float or
    int8) with as many spatial axes as one of `patch_ranks` as the product of its input patches
    and its kernel matrix (`export/conv_patches.py`)."""

    layers: Any
    patch_ranks: tuple[int, ...] = (1, 2, 3)

    @nn.compact
    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                 precision=None, preferred_element_type=None):
        layer = self.layers.get(layer_path(self))
        codes = _quantized(layer, lhs)
        pads = patch_padding(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation,
                             rhs_dilation, dimension_numbers, feature_group_count,
                             batch_group_count)
        if (pads is not None and rhs.ndim - 2 in self.patch_ranks
                and (layer is None or layer.axes in ((), (rhs.ndim - 1,)))):
            source = lhs if codes is None else codes
            pad_value = 0 if codes is None else ZERO_POINT[np.dtype(np.uint8)]
            columns = patches(source, rhs.shape[:-2], window_strides, pads, rhs_dilation,
                              pad_value)
            if codes is not None:
                columns = _dequantized(layer, columns)
            return patch_product(columns, _kernel_matrix(layer, rhs), precision,
                                 preferred_element_type)
        if codes is not None:
            lhs = _dequantized(layer, codes)
        if layer is not None:
            rhs = _weight(layer)
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)


def qdq_model(quantized_model, float_model, layers: dict[str, QuantizedLayer],
              patch_ranks: tuple[int, ...] = (1, 2, 3)):
    """`float_model` with the QDQ seams standing for `quantized_model`'s; its variables are the
    float model's, where a quantized layer's kernel is never read (a placeholder will do).
    `patch_ranks`: the convs (by spatial axes) stated as products of patches (`QdqConv`)."""
    options, skip = quantization_of(quantized_model)
    attention_skip = skip if options.activations and options.attention else None
    seams = {"dot_general_cls": functools.partial(QdqDotGeneral, layers, attention_skip),
             "conv_general_dilated_cls": functools.partial(QdqConv, layers,
                                                           patch_ranks=patch_ranks)}
    fields = {f.name for f in dataclasses.fields(float_model)}
    return float_model.clone(**{k: v for k, v in seams.items() if k in fields})
