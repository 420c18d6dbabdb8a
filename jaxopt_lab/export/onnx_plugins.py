"""jax2onnx lowerings of the QDQ primitives of `export/qdq.py`: QuantizeLinear / DequantizeLinear.

Imported only when exporting to ONNX (jax2onnx is in the [deploy] extra); importing registers
them in jax2onnx's plugin table. The run's quantization is symmetric: zero points are 0 for int8
weights and 128 for the uint8 codes of activations (`qdq.ZERO_POINT`).
"""

from __future__ import annotations

import numpy as np
from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

from jaxopt_lab.export.conv_patches import kernel_offsets, output_size, patches_p
from jaxopt_lab.export.qdq import ZERO_POINT, dequantize_p, quantize_p


def _zero_point(ctx, shape: tuple[int, ...], dtype):
    return _constant(ctx, "zero_point", np.full(shape, ZERO_POINT[np.dtype(dtype)]), dtype)


def _bind_output(ctx, out_var, make):
    """Builds the node with `make(name)` under the output's name and binds it to `out_var`."""
    spec = ctx.get_value_for_var(out_var, name_hint=ctx.fresh_name("qdq_out"))
    name = spec.name if getattr(spec, "producer", None) is None else ctx.fresh_name("qdq_out")
    result = make(name)
    result.type, result.shape = spec.type, spec.shape
    ctx.bind_value_for_var(out_var, result)


@register_primitive(jaxpr_primitive=quantize_p.name, context="primitives.jaxopt_lab",
                    component="quantize", since="0.1.0", onnx=[{"component": "QuantizeLinear"}])
class QuantizePlugin(PrimitiveLeafPlugin):
    """`QuantizeLinear(x, scale, 128)`: a static per-tensor input as uint8 codes."""

    def lower(self, ctx, eqn) -> None:
        x, scale = (ctx.get_value_for_var(v, name_hint=ctx.fresh_name("quantize_in"))
                    for v in eqn.invars)
        zero = _zero_point(ctx, (), np.uint8)
        _bind_output(ctx, eqn.outvars[0], lambda name: ctx.builder.QuantizeLinear(
            x, scale, zero, _outputs=[name]))


@register_primitive(jaxpr_primitive=dequantize_p.name, context="primitives.jaxopt_lab",
                    component="dequantize", since="0.1.0",
                    onnx=[{"component": "DequantizeLinear"}])
class DequantizePlugin(PrimitiveLeafPlugin):
    """`DequantizeLinear(value, scale, zero point, axis)`: a frozen int8 weight, per channel or
    tensor, or an input's uint8 codes."""

    def lower(self, ctx, eqn) -> None:
        value, scale = (ctx.get_value_for_var(v, name_hint=ctx.fresh_name("weight"))
                        for v in eqn.invars)
        zero = _zero_point(ctx, tuple(eqn.invars[1].aval.shape), eqn.invars[0].aval.dtype)
        attributes = {"axis": eqn.params["axis"]} if eqn.invars[1].aval.shape else {}
        _bind_output(ctx, eqn.outvars[0], lambda name: ctx.builder.DequantizeLinear(
            value, scale, zero, _outputs=[name], **attributes))


@register_primitive(jaxpr_primitive=patches_p.name, context="primitives.jaxopt_lab",
                    component="patches", since="0.1.0",
                    onnx=[{"component": "Pad"}, {"component": "Slice"}, {"component": "Concat"}])
class PatchesPlugin(PrimitiveLeafPlugin):
    """`Pad → Slice (one per kernel offset, spatial axes only) → Concat`: a conv's input patches
    (`export/conv_patches.py`), with constant starts, ends and steps."""

    def lower(self, ctx, eqn) -> None:
        params = eqn.params
        x = ctx.get_value_for_var(eqn.invars[0], name_hint=ctx.fresh_name("patches_in"))
        spatial = len(params["kernel_size"])
        dtype = eqn.invars[0].aval.dtype
        lows, highs = zip(*params["pads"], strict=True)
        padded = ctx.builder.Pad(
            x, _constant(ctx, "pads", [0, *lows, 0, 0, *highs, 0], np.int64),
            _constant(ctx, "pad_value", params["pad_value"], dtype),
            mode="constant", _outputs=[ctx.fresh_name("padded")])
        padded.type = x.type
        sizes = [size + low + high for size, low, high
                 in zip(eqn.invars[0].aval.shape[1:-1], lows, highs, strict=True)]
        outputs = output_size(sizes, params["kernel_size"], params["strides"],
                              params["rhs_dilation"])
        axes = _constant(ctx, "axes", list(range(1, spatial + 1)), np.int64)
        steps = _constant(ctx, "steps", params["strides"], np.int64)
        columns = []
        for start in kernel_offsets(params["kernel_size"], params["rhs_dilation"]):
            ends = [b + (n - 1) * s + 1 for b, n, s
                    in zip(start, outputs, params["strides"], strict=True)]
            column = ctx.builder.Slice(padded, _constant(ctx, "starts", start, np.int64),
                                       _constant(ctx, "ends", ends, np.int64), axes, steps,
                                       _outputs=[ctx.fresh_name("patch")])
            column.type = x.type
            columns.append(column)
        _bind_output(ctx, eqn.outvars[0], lambda name: ctx.builder.Concat(
            *columns, axis=spatial + 1, _outputs=[name]))


def _constant(ctx, name: str, value, dtype):
    return ctx.builder.add_initializer_from_array(ctx.fresh_name(name), np.asarray(value, dtype))
