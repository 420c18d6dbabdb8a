"""Quantized layers stated with ONNX's integer operators, the arithmetic the framework serves.

In the QDQ graph a quantized layer reads `DQ(codes)` (the uint8 codes of its quantized input, or
their patches: `export/conv_patches.py`) and `DQ(int8 weight)`. ONNX Runtime fuses
that into an integer kernel only where the layer's output is quantized again (QLinearConv needs a
QuantizeLinear after the conv); the framework's serving form does not requantize outputs: int8 ×
int8 products accumulate in int32 and are rescaled to float (AQT's SERVE). So each such layer
becomes exactly that:

    codes → MatMulInteger / ConvInteger (int8 weight) → Cast(float) → Mul(s_x · s_w) [→ Add(bias)]

which ONNX Runtime runs with its int8 kernels. The int8 values, the per-channel weight scales,
the static input scale and its zero point are unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from jaxopt_lab.export.onnx_graph import attribute_of, consumers_of, finish

_INTEGER = {"Conv": "ConvInteger", "Gemm": "MatMulInteger", "MatMul": "MatMulInteger"}


def to_integer_ops(graph) -> int:
    """Rewrites every Conv / Gemm / MatMul that reads a quantized input and a frozen int8
    weight, in place; returns how many."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    rewritten = 0
    for node in list(graph.node):
        operands = _quantized_operands(node, producers, initializers)
        if operands is None:
            continue
        codes, x_zero, x_scale, weight, w_scale, bias = operands
        if node.op_type == "Gemm":
            weight = weight.T if attribute_of(node, "transB", 0) else weight
        name = node.output[0]
        w_zero = _constant(graph, f"{name}_zero", np.zeros((), np.int8))
        weight_name = _constant(graph, f"{name}_int8_weight", weight)
        new = [onnx.helper.make_node(_INTEGER[node.op_type],
                                     [codes, weight_name, x_zero, w_zero], [f"{name}_int32"],
                                     **_conv_attributes(node)),
               onnx.helper.make_node("Cast", [f"{name}_int32"], [f"{name}_float"],
                                     to=onnx.TensorProto.FLOAT)]
        rescale = _rescale(x_scale * w_scale, node.op_type, weight.ndim)
        new.append(onnx.helper.make_node(
            "Mul", [f"{name}_float", _constant(graph, f"{name}_scale", rescale)],
            [f"{name}_rescaled" if bias is not None else name]))
        if bias is not None:
            bias_name = _constant(graph, f"{name}_bias", _rescale(bias, node.op_type, weight.ndim))
            new.append(onnx.helper.make_node("Add", [f"{name}_rescaled", bias_name], [name]))
        graph.node.remove(node)
        graph.node.extend(new)
        rewritten += 1
    _drop_dangling_dequantize(graph)
    finish(graph)
    return rewritten


def _quantized_operands(node, producers, initializers):
    """(codes name, their zero point's name, their scale, int8 weight, weight scale, constant
    bias or None) of a layer that reads `DQ(codes)` (one scale) and `DQ(int8 initializer)`;
    None for any other node."""
    if node.op_type not in _INTEGER or len(node.input) < 2:
        return None
    if node.op_type == "Gemm" and (attribute_of(node, "transA", 0)
                                   or attribute_of(node, "alpha", 1.0) != 1.0
                                   or attribute_of(node, "beta", 1.0) not in (0.0, 1.0)):
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Gemm" and attribute_of(node, "beta", 1.0) == 0.0:
        bias = None  # jax2onnx's Gemm carries a bias it multiplies by zero
    if bias is not None and bias not in initializers:
        return None
    x_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
    if (x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear"
            or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in initializers
            or x_dq.input[0] in initializers or len(x_dq.input) < 3
            or x_dq.input[2] not in initializers):
        return None
    weight = numpy_helper.to_array(initializers[w_dq.input[0]])
    x_scale = numpy_helper.to_array(initializers[x_dq.input[1]])
    w_scale = numpy_helper.to_array(initializers[w_dq.input[1]])
    if weight.dtype != np.int8 or x_scale.ndim or weight.ndim < 2:
        return None
    if w_scale.ndim and attribute_of(w_dq, "axis", 1) % weight.ndim != _output_axis(node, weight):
        return None  # scales along another axis than the output channels: left as QDQ
    return (x_dq.input[0], x_dq.input[2], x_scale, weight, w_scale,
            None if bias is None else numpy_helper.to_array(initializers[bias]))


def _output_axis(node, weight: np.ndarray) -> int:
    """The weight's output-channel axis: O of a Conv's OIHW, N of a matmul's K × N (K of a
    Gemm that transposes it)."""
    if node.op_type == "Conv":
        return 0
    return 0 if node.op_type == "Gemm" and attribute_of(node, "transB", 0) else weight.ndim - 1


def _rescale(scale: np.ndarray, op_type: str, weight_ndim: int) -> np.ndarray:
    """A per-channel vector (scale or bias) broadcast over the output: channels are axis 1 of a
    conv's output (N, C, spatial...), the last axis of a matmul's."""
    scale = np.asarray(scale, np.float32)
    if op_type == "Conv" and scale.ndim:
        return scale.reshape(-1, *[1] * (weight_ndim - 2))
    return scale


def _conv_attributes(node) -> dict:
    if node.op_type != "Conv":
        return {}
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _constant(graph, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _drop_dangling_dequantize(graph) -> None:
    """DequantizeLinear nodes whose output nothing reads any more."""
    read = consumers_of(graph)
    outputs = {output.name for output in graph.output}
    for node in list(graph.node):
        if (node.op_type == "DequantizeLinear" and node.output[0] not in read
                and node.output[0] not in outputs):
            graph.node.remove(node)
