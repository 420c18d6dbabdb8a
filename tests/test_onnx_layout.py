"""The flatten after a channels-first layer reads it directly: the Transpose before the flatten is
folded into the next layer's weight rows (float, transposed, and int8 with per-column scales),
and the graph computes what it did; where the rows carry their own scales it is left alone."""

from __future__ import annotations

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from jaxopt_lab.core.tasks import stateless_inference
from jaxopt_lab.export.onnx import write_onnx
from jaxopt_lab.export.onnx_layout import flatten_transposes_into_weights
from jaxopt_lab.export.onnx_nodes import finish, producers_of
from jaxopt_lab.models import build_model

C, H, W, N = 3, 4, 5, 7  # distinct sizes: a wrong permutation of (C, H, W) cannot pass
K = C * H * W


def _graph(product: str) -> onnx.ModelProto:
    """x (B, C, H, W) → Transpose to channels-last → flatten → a Dense layer of `product` kind."""
    rng = np.random.RandomState(0)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    constants = {"flat_shape": np.array([0, -1], np.int64)}
    nodes = [helper.make_node("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["nhwc", "flat_shape"], ["flat"])]
    if product == "gemm":
        constants.update(w=weight, b=rng.normal(size=N).astype(np.float32))
        nodes.append(helper.make_node("Gemm", ["flat", "w", "b"], ["y"]))
    elif product == "gemm_transposed":
        constants.update(w=weight.T.copy())
        nodes.append(helper.make_node("Gemm", ["flat", "w"], ["y"], transB=1))
    else:  # int8: per-tensor activation scale; weight scales per column, or per row
        per_row = product == "int8_per_row"
        codes = rng.randint(-127, 128, size=(K, N)).astype(np.int8)
        scales = rng.uniform(0.01, 0.02, size=K if per_row else N).astype(np.float32)
        constants.update(codes=codes, w_scale=scales, s=np.float32(0.05), zp=np.uint8(128))
        nodes += [helper.make_node("QuantizeLinear", ["flat", "s", "zp"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
                  helper.make_node("DequantizeLinear", ["codes", "w_scale"], ["w"],
                                   axis=0 if per_row else 1),
                  helper.make_node("MatMul", ["dq", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, product,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C, H, W])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()  # the graph as written (ONNX Runtime cannot fuse per-row scales)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("product", ["gemm", "gemm_transposed", "int8", "int8_per_row"])
def test_a_transpose_before_a_flatten_is_folded_into_the_weight_rows(product):
    model = _graph(product)
    x = np.random.RandomState(1).normal(size=(3, C, H, W)).astype(np.float32)
    want = _outputs(model, x)
    flatten_transposes_into_weights(model)
    finish(model.graph)
    onnx.checker.check_model(model)
    ops = [node.op_type for node in model.graph.node]
    assert ("Transpose" in ops) == (product == "int8_per_row"), ops
    np.testing.assert_allclose(_outputs(model, x), want, rtol=1e-5, atol=1e-4)



def test_an_exported_cnns_flatten_reads_the_conv_layout_and_computes_the_same(tmp_path):
    model = build_model("cnn2d", 10, features=(4, 8))
    x = np.random.RandomState(0).normal(size=(5, 8, 8, 1)).astype(np.float32)
    variables = model.init(jax.random.key(0), x[:1])
    apply = stateless_inference(model)
    path = str(tmp_path / "cnn.onnx")
    write_onnx(apply, variables, x[:1], path, {})
    exported = onnx.load(path)
    producers = producers_of(exported.graph)
    flatten = next(n for n in exported.graph.node if n.op_type == "Reshape"
                   and any(u.op_type == "Gemm" and u.input[0] == n.output[0]
                           for u in exported.graph.node))
    assert producers[flatten.input[0]].op_type == "MaxPool"  # no Transpose between
    np.testing.assert_allclose(_outputs(exported, x), np.asarray(apply(variables, x)),
                               rtol=1e-5, atol=1e-5)
