"""jax2onnx lowerings of the QDQ primitives of `export/qdq.py`: QuantizeLinear / DequantizeLinear.

Imported only when exporting to ONNX (jax2onnx is in the [deploy] extra); importing registers
them in jax2onnx's plugin table. Zero points are int8 zeros: the run's quantization is symmetric.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

from jaxopt_lab.export.qdq import dequantize_p, fake_quantize_p


def _zero_point(ctx, shape: tuple[int, ...]):
    return ctx.builder.add_initializer_from_array(ctx.fresh_name("zero_point"),
                                                  np.zeros(shape, np.int8))


def _bind_output(ctx, out_var, make):
    """Builds the node with `make(name)` under the output's name and binds it to `out_var`."""
    spec = ctx.get_value_for_var(out_var, name_hint=ctx.fresh_name("qdq_out"))
    name = spec.name if getattr(spec, "producer", None) is None else ctx.fresh_name("qdq_out")
    result = make(name)
    result.type, result.shape = spec.type, spec.shape
    ctx.bind_value_for_var(out_var, result)


@register_primitive(jaxpr_primitive=fake_quantize_p.name, context="primitives.jaxopt_lab",
                    component="fake_quantize", since="0.1.0",
                    onnx=[{"component": "QuantizeLinear"}, {"component": "DequantizeLinear"}])
class FakeQuantizePlugin(PrimitiveLeafPlugin):
    """`x → QuantizeLinear(x, scale, 0) → DequantizeLinear`: a static per-tensor int8 input."""

    def lower(self, ctx, eqn) -> None:
        x, scale = (ctx.get_value_for_var(v, name_hint=ctx.fresh_name("qdq_in"))
                    for v in eqn.invars)
        zero = _zero_point(ctx, ())
        quantized = ctx.builder.QuantizeLinear(x, scale, zero,
                                               _outputs=[ctx.fresh_name("quantized")])
        quantized.type = ir.TensorType(ir.DataType.INT8)
        quantized.shape = x.shape
        _bind_output(ctx, eqn.outvars[0], lambda name: ctx.builder.DequantizeLinear(
            quantized, scale, zero, _outputs=[name]))


@register_primitive(jaxpr_primitive=dequantize_p.name, context="primitives.jaxopt_lab",
                    component="dequantize", since="0.1.0",
                    onnx=[{"component": "DequantizeLinear"}])
class DequantizePlugin(PrimitiveLeafPlugin):
    """`DequantizeLinear(int8 weight, scale, 0, axis)`: a frozen weight, per channel or tensor."""

    def lower(self, ctx, eqn) -> None:
        value, scale = (ctx.get_value_for_var(v, name_hint=ctx.fresh_name("weight"))
                        for v in eqn.invars)
        zero = _zero_point(ctx, tuple(eqn.invars[1].aval.shape))
        attributes = {"axis": eqn.params["axis"]} if eqn.invars[1].aval.shape else {}
        _bind_output(ctx, eqn.outvars[0], lambda name: ctx.builder.DequantizeLinear(
            value, scale, zero, _outputs=[name], **attributes))
