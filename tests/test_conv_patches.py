"""A plain convolution as patches × kernel matrix (`export/conv_patches.py`), the form the int8
ONNX export runs convs in, equals lax's convolution in XLA and in ONNX Runtime; other convs
(groups, input dilation) stay convolutions."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
import onnx
import pytest

from jaxopt_lab.export.conv_patches import patch_padding, patch_product, patches
from jaxopt_lab.export.onnx import write_onnx
from jaxopt_lab.export.qdq import QdqConv
from jaxopt_lab.export.runtimes import load_onnx

CASES = [  # (input shape, kernel size, strides, padding, kernel dilation)
    ((3, 40, 1), (5,), (2,), ((1, 1),), None),
    ((3, 19, 4), (3,), (1,), "SAME", None),
    ((3, 12, 4), (3,), (3,), "VALID", (2,)),
    ((2, 8, 8, 3), (3, 3), (1, 1), "SAME", None),
    ((2, 9, 7, 3), (3, 2), (2, 1), ((1, 0), (2, 1)), (1, 2)),
]


def _conv(x, kernel, strides, padding, dilation, **kwargs):
    spatial = "DHW"[-(x.ndim - 2):]
    dimensions = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                        dimension_numbers=dimensions, **kwargs)


@pytest.mark.parametrize("shape, kernel_size, strides, padding, dilation", CASES)
def test_patches_times_the_kernel_matrix_is_the_convolution(shape, kernel_size, strides,
                                                             padding, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal((*kernel_size, shape[-1], 6)).astype(np.float32)
    want = _conv(x, kernel, strides, padding, dilation)
    spatial = len(kernel_size)
    dimensions = jax.lax.conv_dimension_numbers(
        x.shape, kernel.shape, (f"N{'DHW'[-spatial:]}C", f"{'DHW'[-spatial:]}IO",
                                f"N{'DHW'[-spatial:]}C"))
    pads = patch_padding(x.shape, kernel.shape, strides, padding, None, dilation, dimensions,
                         1, 1)
    columns = patches(x, kernel_size, strides, pads, dilation, 0)
    got = patch_product(columns, kernel.reshape(-1, kernel.shape[-1]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_grouped_or_input_dilated_convs_stay_convolutions():
    lhs, rhs = (2, 8, 4), (3, 2, 6)
    dimensions = jax.lax.conv_dimension_numbers(lhs, rhs, ("NWC", "WIO", "NWC"))
    assert patch_padding(lhs, rhs, (1,), "SAME", None, None, dimensions, 2, 1) is None
    assert patch_padding(lhs, (3, 4, 6), (1,), "SAME", (2,), None, dimensions, 1, 1) is None
    channels_first = jax.lax.conv_dimension_numbers((2, 4, 8), (6, 4, 3), ("NCW", "OIW", "NCW"))
    assert patch_padding((2, 4, 8), (6, 4, 3), (1,), "SAME", None, None, channels_first,
                         1, 1) is None


class TwoConvs(nn.Module):
    """A plain strided conv (patches), then a grouped one (left a conv)."""

    @nn.compact
    def __call__(self, x):
        seam = functools.partial(QdqConv, {})
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="SAME",
                            conv_general_dilated_cls=seam)(x))
        return nn.Conv(8, (3, 3), feature_group_count=2, conv_general_dilated_cls=seam)(x)


def test_the_onnx_patches_equal_xla_in_onnx_runtime(tmp_path):
    model = TwoConvs()
    x = np.random.default_rng(1).standard_normal((5, 9, 9, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    path = str(tmp_path / "convs.onnx")
    write_onnx(model.apply, variables, x, path, metadata={})
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert ops.count("Gather") == 1 and ops.count("Conv") == 1, ops  # the grouped one stays
    want = np.asarray(jax.jit(model.apply)(variables, x))
    np.testing.assert_allclose(load_onnx(path, "onnxruntime")(x), want, rtol=1e-4, atol=1e-4)


class Pools(nn.Module):
    """A tiling max pool (channels-last slices), then an overlapping one (jax2onnx's)."""

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        return nn.max_pool(x, window_shape=(3, 3), strides=(1, 1), padding="SAME")


def test_tiling_max_pools_stay_channels_last_and_equal_xla(tmp_path):
    x = np.random.default_rng(2).standard_normal((3, 8, 6, 4)).astype(np.float32)
    path = str(tmp_path / "pools.onnx")
    write_onnx(Pools().apply, {}, x, path, metadata={}, channels_last=True)
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert ops.count("Slice") == 4 and ops.count("MaxPool") == 1, ops  # 2×2 offsets; jax2onnx
    want = np.asarray(jax.jit(Pools().apply)({}, x))
    np.testing.assert_array_equal(load_onnx(path, "onnxruntime")(x), want)
