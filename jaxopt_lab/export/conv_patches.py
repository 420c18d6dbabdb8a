"""A convolution as a matrix product of input patches and the kernel: how the int8 form runs fast.

ONNX Runtime's integer convolutions (ConvInteger; a DQ → Conv pair it cannot fuse) loop over the
batch with one small product per example: the wide MNIST-1D CNN's int8 form ran at 0.19–0.28×
XLA float32 at batch 256 so (benchmarks/RESULTS.md at commit 4fd0b7f). Its int8 matrix product (MatMulInteger, and the
MatMulIntegerToFloat it fuses a `DQ → MatMul` into) runs the whole batch as one product with the
CPU's int8 dot-product instructions. So the int8 export states each plain convolution (channels
last, no groups, no input dilation) as

    Pad → Gather (every output position's window, from the flattened positions) → MatMul(kernel)

on the quantized input, which is exact: quantizing commutes with gathering values, and padding
with the zero point is padding with zero. Output positions, padding and strides are lax's.

The patches are one primitive of ours (`patches_p`): XLA runs its definition below (strided
slices), and its ONNX lowering (`export/onnx_plugins.py`) is one Gather with constant indices
(`window_indices`) between reshapes that keep the batch axis (jax2onnx's lowering of `lax.pad`
fails on the symbolic batch, and its `lax.slice` computes the batch size at run time).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir


def patch_padding(lhs_shape, rhs_shape, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count: int,
                  batch_group_count: int) -> list[tuple[int, int]] | None:
    """The (low, high) padding of each spatial axis where the conv is plain: channels-last
    input and output, spatial-first kernel (Flax's layout), no groups, no input dilation, no
    negative padding; None where it is not (it then stays a conv)."""
    n = len(lhs_shape)
    spatial = n - 2
    layout = jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    channels_last = (0, n - 1, *range(1, n - 1))
    if (layout != (channels_last, (n - 1, n - 2, *range(spatial)), channels_last)
            or feature_group_count != 1 or batch_group_count != 1
            or any(d != 1 for d in (lhs_dilation or ()))):
        return None
    dilation = tuple(rhs_dilation or (1,) * spatial)
    window = [(k - 1) * d + 1 for k, d in zip(rhs_shape[:spatial], dilation, strict=True)]
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs_shape[1:-1], window, window_strides, padding)
    pads = [(int(low), int(high)) for low, high in padding]
    return None if any(p < 0 for pair in pads for p in pair) else pads


def kernel_offsets(kernel_size, rhs_dilation) -> list[tuple[int, ...]]:
    """Where each kernel position reads, relative to the window's start, in row-major order."""
    dilation = tuple(rhs_dilation or (1,) * len(kernel_size))
    return [tuple(o * d for o, d in zip(offset, dilation, strict=True))
            for offset in itertools.product(*(range(k) for k in kernel_size))]


def output_size(padded_shape, kernel_size, strides, rhs_dilation) -> list[int]:
    dilation = tuple(rhs_dilation or (1,) * len(kernel_size))
    return [(size - (k - 1) * d - 1) // s + 1 for size, k, d, s
            in zip(padded_shape, kernel_size, dilation, strides, strict=True)]


def window_indices(padded_shape, kernel_size, strides, rhs_dilation) -> np.ndarray:
    """[*output positions, prod(kernel_size)]: where each output position's window reads, as
    indices into the padded input's spatial positions flattened in row-major order."""
    outputs = output_size(padded_shape, kernel_size, strides, rhs_dilation)
    starts = np.stack(np.meshgrid(*(np.arange(n) * s for n, s in zip(outputs, strides,
                                                                       strict=True)),
                                  indexing="ij"), axis=-1)  # [*outputs, spatial]
    offsets = np.asarray(kernel_offsets(kernel_size, rhs_dilation))  # [K, spatial]
    positions = starts[..., None, :] + offsets  # [*outputs, K, spatial]
    return np.ravel_multi_index(tuple(np.moveaxis(positions, -1, 0)), padded_shape)


def _patches(x, *, kernel_size, strides, pads, rhs_dilation, pad_value):
    padded = jnp.pad(x, [(0, 0), *pads, (0, 0)], constant_values=np.asarray(pad_value, x.dtype))
    outputs = output_size(padded.shape[1:-1], kernel_size, strides, rhs_dilation)
    columns = []
    for start in kernel_offsets(kernel_size, rhs_dilation):
        limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, outputs, strides, strict=True)]
        columns.append(jax.lax.slice(padded, (0, *start, 0),
                                     (padded.shape[0], *limit, padded.shape[-1]),
                                     (1, *strides, 1)))
    return jnp.concatenate(columns, axis=-1)


def _patches_shape(x, *, kernel_size, strides, pads, rhs_dilation, pad_value):
    padded = [size + low + high for size, (low, high) in zip(x.shape[1:-1], pads, strict=True)]
    outputs = output_size(padded, kernel_size, strides, rhs_dilation)
    return jax.core.ShapedArray((x.shape[0], *outputs, math.prod(kernel_size) * x.shape[-1]),
                                x.dtype)


patches_p = Primitive("jaxopt_patches")
patches_p.def_impl(_patches)
patches_p.def_abstract_eval(_patches_shape)
mlir.register_lowering(patches_p, mlir.lower_fun(_patches, multiple_results=False))


def patches(x, kernel_size, strides, pads, rhs_dilation, pad_value):
    """[batch, *output positions, prod(kernel_size) * channels]: for each output position the
    input values under the kernel, kernel offsets in row-major order, channels innermost (the
    order of a [*kernel_size, in, out] kernel reshaped to [-1, out])."""
    return patches_p.bind(x, kernel_size=tuple(kernel_size), strides=tuple(strides),
                          pads=tuple(tuple(p) for p in pads),
                          rhs_dilation=tuple(rhs_dilation or (1,) * len(kernel_size)),
                          pad_value=int(pad_value))


def patch_product(columns, kernel_matrix, precision=None, preferred_element_type=None):
    """The conv's output: each position's patch times the [K, out] kernel matrix."""
    return jax.lax.dot_general(columns, kernel_matrix, (((columns.ndim - 1,), (0,)), ((), ())),
                               precision, preferred_element_type=preferred_element_type)
