"""Rewrites of where a traced ONNX graph keeps its channels axis, so runtimes see plain layers.

jax2onnx lowers `lax.reduce_window_max` over channels-last (B, H, W, C) as a MaxPool with four
spatial axes (B, H, W, C) behind two Unsqueezes, which ONNX Runtime refuses ("Unsupported
pooling size"); where the window spans one position of the batch and of one other axis, it becomes
`Transpose → MaxPool (over the true spatial axes) → Transpose`.

A channels-first → channels-last Transpose right before a flattening Reshape into a Dense layer
(jax2onnx's conv lowering hands the Flax flatten an NHWC tensor) is folded into that layer's
weight: its rows are permuted instead, and the layer reads the channels-first tensor. ONNX
Runtime runs such a transpose element by element: in a pruned digits CNN it took longer than
both convolutions.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from jaxopt_lab.export.onnx_nodes import attribute_of, consumers_of, finish, producers_of


def channels_last_pools(graph) -> None:
    producers = producers_of(graph)
    consumers = consumers_of(graph)
    for pool in list(graph.node):
        inner = producers.get(pool.input[0]) if pool.op_type == "MaxPool" else None
        outer = producers.get(inner.input[0]) if inner is not None else None
        users = consumers.get(pool.output[0], [])
        if (outer is None or inner.op_type != "Unsqueeze" or outer.op_type != "Unsqueeze"
                or len(users) != 1 or users[0].op_type != "Squeeze"):
            continue
        kernel = list(attribute_of(pool, "kernel_shape"))
        n = len(kernel)
        strides = list(attribute_of(pool, "strides", [1] * n))
        pads = list(attribute_of(pool, "pads", [0] * 2 * n))
        kept = [a for a in range(1, n)
                if kernel[a] == 1 and strides[a] == 1 and pads[a] == pads[a + n] == 0]
        if kernel[0] != 1 or strides[0] != 1 or len(kept) != 1 or not 3 <= n <= 5:
            continue
        channel = kept[0]
        spatial = [a for a in range(1, n) if a != channel]
        perm = [0, channel, *spatial]
        squeeze = users[0]
        pool.input[0] = outer.input[0] + "_channels_first"
        del pool.attribute[:]
        pool.attribute.extend([
            onnx.helper.make_attribute("kernel_shape", [kernel[a] for a in spatial]),
            onnx.helper.make_attribute("strides", [strides[a] for a in spatial]),
            onnx.helper.make_attribute("pads", [pads[a] for a in spatial]
                                       + [pads[a + n] for a in spatial])])
        graph.node.extend([
            onnx.helper.make_node("Transpose", [outer.input[0]], [pool.input[0]], perm=perm),
            onnx.helper.make_node("Transpose", [pool.output[0]], [squeeze.output[0]],
                                  perm=list(np.argsort(perm)))])
        for node in (inner, outer, squeeze):
            graph.node.remove(node)


def flatten_transposes_into_weights(model) -> None:
    graph = model.graph
    finish(graph)  # shape inference reads the nodes in order
    shapes = _static_shapes(model)
    consumers = consumers_of(graph)
    for transpose in list(graph.node):
        perm = list(attribute_of(transpose, "perm", [])) if transpose.op_type == "Transpose" else []
        dims = shapes.get(transpose.input[0]) if perm[:1] == [0] else None
        users = consumers.get(transpose.output[0], [])
        reshapes = [node for node in users if node.op_type == "Reshape"]
        if (not dims or None in dims[1:] or len(reshapes) != 1
                or reshapes[0].input[0] != transpose.output[0]
                or any(node.op_type != "Shape" for node in users if node is not reshapes[0])
                or shapes.get(reshapes[0].output[0]) != [dims[0], int(np.prod(dims[1:]))]):
            continue
        weight = _flat_input_weight(graph, reshapes[0].output[0], consumers)
        if weight is None:
            continue
        initializer, rows_axis = weight
        value = numpy_helper.to_array(initializer)
        if value.ndim != 2:
            continue
        order = np.arange(value.shape[rows_axis]).reshape(dims[1:])
        order = order.transpose([axis - 1 for axis in perm[1:]]).reshape(-1)
        permuted = np.empty_like(value)
        if rows_axis:
            permuted[:, order] = value
        else:
            permuted[order] = value
        initializer.CopyFrom(numpy_helper.from_array(permuted, initializer.name))
        for node in users:
            node.input[:] = [transpose.input[0] if name == transpose.output[0] else name
                             for name in node.input]
        graph.node.remove(transpose)


def _static_shapes(model) -> dict[str, list]:
    """{value name: its dims, None where unknown} from ONNX's shape inference (on a copy)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    return {value.name: [d.dim_value if d.HasField("dim_value") else None
                         for d in value.type.tensor_type.shape.dim]
            for value in [*inferred.value_info, *inferred.input]}


def _flat_input_weight(graph, flat: str, consumers):
    """(the weight initializer, the axis of its rows) of the one Gemm/MatMul that reads `flat`,
    through per-tensor Quantize/DequantizeLinear pairs, where its rows can be permuted: a float
    constant, or int8 codes whose scales are per column. None otherwise."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = producers_of(graph)
    users = consumers.get(flat, [])
    while (len(users) == 1 and users[0].op_type in ("QuantizeLinear", "DequantizeLinear")
           and users[0].input[1] in initializers
           and numpy_helper.to_array(initializers[users[0].input[1]]).ndim == 0):
        users = consumers.get(users[0].output[0], [])
    if (len(users) != 1 or users[0].op_type not in ("Gemm", "MatMul")
            or attribute_of(users[0], "transA", 0) or len(consumers[users[0].input[1]]) != 1):
        return None
    product = users[0]
    rows_axis = 1 if attribute_of(product, "transB", 0) else 0
    name = product.input[1]
    source = producers.get(name)
    if source is not None and source.op_type == "DequantizeLinear":
        scale = numpy_helper.to_array(initializers[source.input[1]])
        if scale.ndim and attribute_of(source, "axis", 1) % 2 == rows_axis:
            return None
        name = source.input[0]
    if name not in initializers or len(consumers.get(name, [])) != 1:
        return None
    return initializers[name], rows_axis
