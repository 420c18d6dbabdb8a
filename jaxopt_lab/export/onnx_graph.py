"""Rewrites of a traced ONNX graph so runtimes see what they fuse: `DQ → Conv/MatMul` directly.

jax2onnx lowers a channels-last conv as `Transpose → Conv → Transpose`, so the QDQ nodes of the
int8 form land before a Transpose. Runtimes fuse `DequantizeLinear` into the integer kernel only
where it feeds the op itself, so:

- a frozen weight `DQ(int8 initializer) → Transpose` becomes `DQ(transposed initializer)`, its
  per-channel axis permuted with it;
- an input `Q → DQ → Transpose` (one per-tensor scale) becomes `Transpose → Q → DQ`: a transpose
  commutes with elementwise quantization, so the values are unchanged.

jax2onnx lowers a product of a [..., K] activation and a [K, N] matrix (a Dense layer on a sequence,
a conv's patches) as an Einsum; it becomes the MatMul it is, which runtimes fuse with the QDQ
nodes around it into int8 products (an Einsum they run in float). `Max(x, scalar 0)`, jax's ReLU,
becomes the Relu it is (ONNX Runtime's broadcasting Max is slower than its Relu).

A float layer over patches (`Reshape(patches) → MatMul(W) → Add(bias) [→ Relu]`, a float conv of
the int8 form) becomes a 2-D `Gemm` with its bias (and the Relu after it) between reshapes: ONNX
Runtime then runs one fused kernel where it made three passes over the output. jax2onnx's Dense
(`Gemm` with a zero bias, then `Add(bias)`) becomes one Gemm with the bias where it is float, and
a MatMul where it reads DequantizeLinear outputs (ONNX Runtime fuses `DQ → MatMul` into its int8
kernel, but runs `DQ → Gemm` in float).

Reshapes of constants (jax2onnx's biases, broadcast for their Add) are folded into the constants,
so a rewrite that looks for a constant bias finds one.

Also dropped: jax2onnx's intermediate shape annotations (`value_info`), which can disagree with
its own layout rewrites (ResNets fail to load with them), and initializers nothing reads.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from jaxopt_lab.export.onnx_layout import channels_last_pools, flatten_transposes_into_weights
from jaxopt_lab.export.onnx_nodes import (
    attribute_of,
    consumers_of,
    finish,
    producers_of,
    rename_uses,
)


def tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The rewrites above, in place; returns `model`."""
    graph = model.graph
    del graph.value_info[:]
    _fold_constant_reshapes(graph)
    _fold_weight_transposes(graph)
    _hoist_transposes(graph)
    channels_last_pools(graph)
    _einsums_as_matmuls(graph)
    _relus(graph)
    _float_products_as_gemms(graph)
    _quantized_gemms_as_matmuls(graph)
    _gemm_biases(graph)
    flatten_transposes_into_weights(model)
    finish(graph)
    return model


def _fold_constant_reshapes(graph) -> None:
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for node in list(graph.node):
        if (node.op_type != "Reshape" or len(node.input) != 2
                or not all(name in initializers for name in node.input)
                or attribute_of(node, "allowzero", 0)):
            continue
        value = numpy_helper.to_array(initializers[node.input[0]])
        shape = [value.shape[i] if d == 0 else int(d)
                 for i, d in enumerate(numpy_helper.to_array(initializers[node.input[1]]))]
        graph.initializer.append(numpy_helper.from_array(value.reshape(shape), node.output[0]))
        graph.node.remove(node)


def _fold_weight_transposes(graph) -> None:
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = consumers_of(graph)
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Transpose":
            continue
        transpose = users[0]
        value = numpy_helper.to_array(initializers[node.input[0]])
        perm = list(attribute_of(transpose, "perm", range(value.ndim - 1, -1, -1)))
        folded = numpy_helper.from_array(np.transpose(value, perm), node.input[0] + "_t")
        graph.initializer.append(folded)
        node.input[0] = folded.name
        scale = numpy_helper.to_array(initializers[node.input[1]])
        if scale.ndim:
            axis = attribute_of(node, "axis", 1) % value.ndim
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("axis", perm.index(axis)))
        graph.node.remove(transpose)
        rename_uses(graph, transpose.output[0], node.output[0])


def _hoist_transposes(graph) -> None:
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = producers_of(graph)
    consumers = consumers_of(graph)
    for dequantize in list(graph.node):
        quantize = producers.get(dequantize.input[0])
        users = consumers.get(dequantize.output[0], [])
        if (dequantize.op_type != "DequantizeLinear" or quantize is None
                or quantize.op_type != "QuantizeLinear" or len(users) != 1
                or users[0].op_type != "Transpose"
                or len(consumers.get(quantize.output[0], [])) != 1
                or numpy_helper.to_array(initializers[quantize.input[1]]).ndim):
            continue
        transpose = users[0]
        moved_output = transpose.output[0]
        transpose.input[0] = quantize.input[0]
        transpose.output[0] = moved_output + "_pre_q"
        quantize.input[0] = transpose.output[0]
        rename_uses(graph, moved_output, dequantize.output[0])


def _einsums_as_matmuls(graph) -> None:
    for node in graph.node:
        if node.op_type != "Einsum" or len(node.input) != 2:
            continue
        inputs, _, output = attribute_of(node, "equation").decode().replace(" ", "").partition("->")
        lhs, _, rhs = inputs.partition(",")
        if (len(rhs) == 2 and lhs[-1:] == rhs[0] and rhs[1] not in lhs
                and len(set(lhs)) == len(lhs) and output == lhs[:-1] + rhs[1]):
            node.op_type = "MatMul"
            del node.attribute[:]


def _relus(graph) -> None:
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type != "Max" or len(node.input) != 2:
            continue
        zeros = [name for name in node.input if name in initializers
                 and numpy_helper.to_array(initializers[name]).shape == ()
                 and numpy_helper.to_array(initializers[name]).dtype.kind == "f"
                 and numpy_helper.to_array(initializers[name]) == 0]
        if len(zeros) == 1:
            node.op_type = "Relu"
            node.input.remove(zeros[0])


def _float_products_as_gemms(graph) -> None:
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = producers_of(graph)
    consumers = consumers_of(graph)
    for node in list(graph.node):
        layer = _float_product(node, producers, consumers, initializers)
        if layer is None:
            continue
        rows, add, relu = layer
        weight = numpy_helper.to_array(initializers[node.input[1]])
        bias = next(name for name in add.input if name in initializers)
        last = relu or add
        name = node.output[0]
        graph.initializer.extend([
            numpy_helper.from_array(np.array([-1, weight.shape[0]], np.int64), f"{name}_2d"),
            numpy_helper.from_array(np.array([-1, *rows, weight.shape[1]], np.int64),
                                    f"{name}_nd"),
            numpy_helper.from_array(
                numpy_helper.to_array(initializers[bias]).reshape(-1), f"{name}_bias")])
        source = producers[node.input[0]]  # the patches' Reshape, reshaped to rows instead
        if len(consumers.get(node.input[0], [])) == 1:
            graph.node.remove(source)
        new = [onnx.helper.make_node("Reshape", [source.input[0], f"{name}_2d"], [f"{name}_rows"]),
               onnx.helper.make_node("Gemm", [f"{name}_rows", node.input[1], f"{name}_bias"],
                                     [f"{name}_gemm"])]
        if relu is not None:
            new.append(onnx.helper.make_node("Relu", [f"{name}_gemm"], [f"{name}_relu"]))
        new.append(onnx.helper.make_node("Reshape", [new[-1].output[0], f"{name}_nd"],
                                         [last.output[0]]))
        for old in (node, add, relu):
            if old is not None:
                graph.node.remove(old)
        graph.node.extend(new)


def _quantized_gemms_as_matmuls(graph) -> None:
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = producers_of(graph)
    for gemm in graph.node:
        if gemm.op_type != "Gemm" or any(
                getattr(producers.get(name), "op_type", None) != "DequantizeLinear"
                for name in gemm.input[:2]):
            continue
        bias = gemm.input[2] if len(gemm.input) > 2 else ""
        no_bias = not bias or attribute_of(gemm, "beta", 1.0) == 0.0 or (
            bias in initializers and not numpy_helper.to_array(initializers[bias]).any())
        if (no_bias and not attribute_of(gemm, "transA", 0) and not attribute_of(gemm, "transB", 0)
                and attribute_of(gemm, "alpha", 1.0) == 1.0):
            gemm.op_type = "MatMul"
            del gemm.input[2:]
            del gemm.attribute[:]


def _gemm_biases(graph) -> None:
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = consumers_of(graph)
    for gemm in list(graph.node):
        users = consumers.get(gemm.output[0], []) if gemm.op_type == "Gemm" else []
        if len(users) != 1 or users[0].op_type != "Add" or len(gemm.input) != 3:
            continue
        add = users[0]
        constants = [n for n in add.input if n in initializers]
        zero = (attribute_of(gemm, "beta", 1.0) == 0.0 or (
            gemm.input[2] in initializers
            and not numpy_helper.to_array(initializers[gemm.input[2]]).any()))
        if len(constants) != 1 or not zero or gemm.input[1] not in initializers:
            continue
        bias = numpy_helper.to_array(initializers[constants[0]])
        columns = numpy_helper.to_array(initializers[gemm.input[1]]).shape[
            0 if attribute_of(gemm, "transB", 0) else 1]
        if bias.size != columns or bias.shape[-1] != columns:
            continue
        graph.initializer.append(numpy_helper.from_array(bias.reshape(-1), gemm.output[0] + "_bias"))
        gemm.input[2] = gemm.output[0] + "_bias"
        kept = [a for a in gemm.attribute if a.name != "beta"]
        del gemm.attribute[:]
        gemm.attribute.extend(kept)
        gemm.output[0] = add.output[0]
        graph.node.remove(add)


def _float_product(node, producers, consumers, initializers):
    """(the product's leading output dims after the batch, its bias Add, the Relu after it or
    None) of `Reshape(x, [0, d..., K]) → MatMul(float [K, N] constant) → Add(constant [N])`."""
    reshape = producers.get(node.input[0]) if node.op_type == "MatMul" else None
    if (reshape is None or reshape.op_type != "Reshape" or node.input[1] not in initializers
            or reshape.input[1] not in initializers):
        return None
    weight = numpy_helper.to_array(initializers[node.input[1]])
    shape = numpy_helper.to_array(initializers[reshape.input[1]])
    users = consumers.get(node.output[0], [])
    if (weight.ndim != 2 or weight.dtype != np.float32 or shape[0] not in (0, -1)
            or len(shape) < 3 or (shape[1:] <= 0).any() or len(users) != 1
            or users[0].op_type != "Add"):
        return None
    add = users[0]
    constants = [n for n in add.input if n in initializers]
    if (len(constants) != 1
            or numpy_helper.to_array(initializers[constants[0]]).size != weight.shape[1]):
        return None
    after = consumers.get(add.output[0], [])
    relu = after[0] if len(after) == 1 and after[0].op_type == "Relu" else None
    return [int(d) for d in shape[1:-1]], add, relu
