"""Quantized layers as ONNX Runtime's own int8 kernel, with the bias in it (`--int8-ops onnxruntime`).

In the QDQ graph a quantized layer reads `DQ(codes)` (the uint8 codes of its quantized input, or
their patches: `export/conv_patches.py`) and `DQ(int8 weight)`. ONNX Runtime fuses that pair into
its MatMulIntegerToFloat kernel (int8 products, int32 sums, rescaled to float: AQT's serving
arithmetic), but adds the bias after it in a pass of its own over the output. Here each such
matrix product (MatMul, Gemm) and the constant bias Add after it become

    MatMulIntegerToFloat(codes, int8 weight, s_x, s_w, zero points, bias)   [com.microsoft]

with the int8 values, the per-channel weight scales, the static input scale and its zero point
unchanged. The operator is ONNX Runtime's (its `com.microsoft` domain): other runtimes do not load
it, so the portable form stays the QDQ one. Layers of other kinds stay QDQ.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from jaxopt_lab.export.onnx_nodes import attribute_of, consumers_of, finish, producers_of

DOMAIN = "com.microsoft"


def to_onnxruntime_kernels(model: onnx.ModelProto) -> int:
    """Rewrites every MatMul / Gemm that reads `DQ(codes)` and `DQ(int8 initializer)`, in
    place; returns how many."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = producers_of(graph)
    consumers = consumers_of(graph)
    rewritten = 0
    for node in list(graph.node):
        operands = _quantized_operands(node, producers, initializers)
        if operands is None:
            continue
        x_dq, w_dq, weight = operands
        name = _constant(graph, f"{node.output[0]}_int8_weight", weight)
        inputs = [x_dq.input[0], name, x_dq.input[1], w_dq.input[1], x_dq.input[2],
                  w_dq.input[2]]
        output = node.output[0]
        add = _bias_add(node, consumers, initializers, weight.shape[-1])
        if add is not None:
            bias = next(name for name in add.input if name in initializers)
            inputs.append(_constant(graph, f"{output}_bias",
                                    numpy_helper.to_array(initializers[bias]).reshape(-1)))
            output = add.output[0]
            graph.node.remove(add)
        graph.node.remove(node)
        graph.node.append(onnx.helper.make_node("MatMulIntegerToFloat", inputs, [output],
                                                domain=DOMAIN))
        rewritten += 1
    if rewritten:
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    _drop_dangling_dequantize(graph)
    finish(graph)
    return rewritten


def _quantized_operands(node, producers, initializers):
    """(codes' DQ node, weight's DQ node, int8 weight as [K, N]) of a matrix product that reads
    `DQ(codes)` (one scale) and `DQ(int8 initializer)` with per-tensor or per-output-channel
    scales; None for any other node."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    if node.op_type == "Gemm" and (attribute_of(node, "transA", 0)
                                   or attribute_of(node, "alpha", 1.0) != 1.0
                                   or (len(node.input) > 2 and node.input[2]
                                       and attribute_of(node, "beta", 1.0) != 0.0)):
        return None  # a Gemm whose own bias counts: left as QDQ
    x_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
    if (x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear"
            or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in initializers
            or x_dq.input[0] in initializers or len(x_dq.input) < 3 or len(w_dq.input) < 3
            or x_dq.input[2] not in initializers):
        return None
    weight = numpy_helper.to_array(initializers[w_dq.input[0]])
    x_scale = numpy_helper.to_array(initializers[x_dq.input[1]])
    w_scale = numpy_helper.to_array(initializers[w_dq.input[1]])
    transposed = node.op_type == "Gemm" and attribute_of(node, "transB", 0)
    if weight.dtype != np.int8 or x_scale.ndim or weight.ndim != 2:
        return None
    if w_scale.ndim and attribute_of(w_dq, "axis", 1) % 2 != (0 if transposed else 1):
        return None  # scales along the weight's input axis: left as QDQ
    return x_dq, w_dq, weight.T if transposed else weight


def _bias_add(node, consumers, initializers, channels: int):
    """The Add of a constant bias over the output channels that alone reads the product."""
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    constants = [name for name in users[0].input if name in initializers]
    if len(constants) != 1:
        return None
    shape = numpy_helper.to_array(initializers[constants[0]]).shape
    return users[0] if shape and shape[-1] == channels and np.prod(shape) == channels else None


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
