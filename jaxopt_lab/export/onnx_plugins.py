"""jax2onnx lowerings of the QDQ primitives of `export/qdq.py`: QuantizeLinear / DequantizeLinear.

Imported only when exporting to ONNX (jax2onnx is in the [deploy] extra); importing registers
them in jax2onnx's plugin table. The run's quantization is symmetric: zero points are 0 for int8
weights and 128 for the uint8 codes of activations (`qdq.ZERO_POINT`).
"""

from __future__ import annotations

import itertools

import numpy as np
from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

from jaxopt_lab.export.conv_patches import patches_p, window_indices
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
    """`Pad → Reshape → Gather → Reshape`: a conv's input patches (`export/conv_patches.py`),
    the windows gathered from the flattened spatial positions with constant indices; the
    reshapes keep the batch axis (0) and infer nothing else at run time."""

    def lower(self, ctx, eqn) -> None:
        params = eqn.params
        x = ctx.get_value_for_var(eqn.invars[0], name_hint=ctx.fresh_name("patches_in"))
        shape = eqn.invars[0].aval.shape
        lows, highs = zip(*params["pads"], strict=True)
        padded = ctx.builder.Pad(
            x, _constant(ctx, "pads", [0, *lows, 0, 0, *highs, 0], np.int64),
            _constant(ctx, "pad_value", params["pad_value"], eqn.invars[0].aval.dtype),
            mode="constant", _outputs=[ctx.fresh_name("padded")])
        flat = padded if len(shape) == 3 else ctx.builder.Reshape(  # one spatial axis: flat
            padded, _constant(ctx, "shape", [0, -1, shape[-1]], np.int64),
            _outputs=[ctx.fresh_name("positions")])
        sizes = [n + low + high for n, low, high in zip(shape[1:-1], lows, highs, strict=True)]
        indices = window_indices(sizes, params["kernel_size"], params["strides"],
                                 params["rhs_dilation"])
        windows = ctx.builder.Gather(flat, _constant(ctx, "windows", indices, np.int64), axis=1,
                                     _outputs=[ctx.fresh_name("windows")])
        for value in (padded, flat, windows):
            value.type = x.type
        out = [0, *indices.shape[:-1], indices.shape[-1] * shape[-1]]
        _bind_output(ctx, eqn.outvars[0], lambda name: ctx.builder.Reshape(
            windows, _constant(ctx, "shape", out, np.int64), _outputs=[name]))


def _constant(ctx, name: str, value, dtype):
    return ctx.builder.add_initializer_from_array(ctx.fresh_name(name), np.asarray(value, dtype))


class _InPlaceOf(PrimitiveLeafPlugin):
    """A lowering of a jax primitive that jax2onnx lowers too, used in its place for the cases
    it handles better and handing the others to jax2onnx's (`fallback`)."""

    def __init__(self, fallback: PrimitiveLeafPlugin):
        super().__init__()
        self.fallback = fallback
        self.primitive, self.metadata = fallback.primitive, getattr(fallback, "metadata", {})


class TiledMaxPlugin(_InPlaceOf):
    """`reduce_window_max` whose windows tile the input (window = stride, no padding, batch and
    channels not pooled) as the elementwise Max of one strided Slice per window offset, channels
    last: the int8 form's layers are channels-last products, and ONNX Runtime's MaxPool needs
    channels first (two transposes) and its ReduceMax over split window axes was slower than these
    slices in its profile. Other windows go to jax2onnx's own lowering (`fallback`). Swapped in by
    `export/onnx.py`."""

    def lower(self, ctx, eqn) -> None:
        params = eqn.params
        shape = eqn.invars[0].aval.shape
        window, strides = params["window_dimensions"], params["window_strides"]
        pooled = [axis for axis, w in enumerate(window) if w != 1]
        if (tuple(window) != tuple(strides) or any(p != (0, 0) for p in params["padding"])
                or any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"]))
                or not pooled or pooled[0] == 0 or pooled[-1] == len(shape) - 1
                or any(shape[a] % window[a] for a in pooled)):
            return self.fallback.lower(ctx, eqn)
        x = ctx.get_value_for_var(eqn.invars[0], name_hint=ctx.fresh_name("pool_in"))
        axes = _constant(ctx, "axes", pooled, np.int64)
        ends = _constant(ctx, "ends", [shape[a] for a in pooled], np.int64)
        steps = _constant(ctx, "steps", [window[a] for a in pooled], np.int64)
        corners = []
        for offset in itertools.product(*(range(window[a]) for a in pooled)):
            corner = ctx.builder.Slice(x, _constant(ctx, "starts", offset, np.int64), ends, axes,
                                       steps, _outputs=[ctx.fresh_name("corner")])
            corner.type = x.type
            corners.append(corner)
        _bind_output(ctx, eqn.outvars[0], lambda name: ctx.builder.Max(*corners, _outputs=[name]))


class UnitAxesPlugin(_InPlaceOf):
    """`broadcast_in_dim` that only inserts axes of size 1 (`x[..., None]`) as one Reshape with
    a constant shape (0 keeps the symbolic batch), where jax2onnx computes the shape at run time
    (Shape → Gather → Concat → Reshape → Expand: four more nodes, each a thread hand-off in a
    batch-1 call). Other broadcasts go to jax2onnx's lowering. Swapped in by `export/onnx.py`."""

    def lower(self, ctx, eqn) -> None:
        source, target = eqn.invars[0].aval.shape, eqn.params["shape"]
        mapped = eqn.params["broadcast_dimensions"]
        inserted = [axis for axis in range(len(target)) if axis not in mapped]
        symbolic = [axis for axis, n in enumerate(target) if not isinstance(n, int)]
        if (any(_dim(source[i]) != _dim(target[a]) for i, a in enumerate(mapped))
                or any(target[a] != 1 for a in inserted) or list(mapped) != sorted(mapped)
                or symbolic not in ([], [0]) or (symbolic and mapped[:1] != (0,))):
            return self.fallback.lower(ctx, eqn)
        x = ctx.get_value_for_var(eqn.invars[0], name_hint=ctx.fresh_name("unit_axes_in"))
        shape = [0 if axis in symbolic else n for axis, n in enumerate(target)]
        _bind_output(ctx, eqn.outvars[0], lambda name: ctx.builder.Reshape(
            x, _constant(ctx, "shape", shape, np.int64), _outputs=[name]))


def _dim(size):
    """A dimension comparable without asking jax to decide symbolic equalities."""
    return size if isinstance(size, int) else str(size)
