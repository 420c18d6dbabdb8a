"""A run's deployed form as an ONNX model (`jaxopt-lab export --to onnx`), traced by jax2onnx.

The program is traced at the level of `jax.lax`: jax2onnx's monkey patches (of whole Flax layers,
`nn.Dense`, `nn.Conv`, attention..., and of jax.numpy functions) are switched off while it traces,
because a patched layer reads its kernel itself and skips the model's seams, where quantization
lives (a QAT or int8 model would come out float, silently), and a patched `jnp.shape` breaks
Flax's own shape checks. The batch dimension is symbolic ("batch").

Runs in ONNX Runtime and OpenVINO with no jaxopt_lab or jax (docs/deploy.md has a client):

    import onnxruntime as ort
    session = ort.InferenceSession("model.onnx")
    outputs = session.run(None, {session.get_inputs()[0].name: x})[0]
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re

import jax
import numpy as np

from jaxopt_lab.errors import UserError

DEPLOY_INSTALL = ("pip install -e '.[deploy]' && pip install --no-deps jax2onnx==0.17.1 "
                  "(or `make install`)")
OPSET = 21  # QuantizeLinear / DequantizeLinear with int8 per-axis scales; ORT and OpenVINO load it


def require(*modules: str) -> None:
    """One line naming the [deploy] extra where a module it installs is missing."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise UserError(f"ONNX export needs {module}, which is not installed ({error.name} "
                            f"missing): {DEPLOY_INSTALL}") from None


def write_onnx(apply, variables, sample: np.ndarray, out: str, metadata: dict,
               onnxruntime_kernels: bool = False, channels_last: bool = False) -> dict:
    """Traces `apply(variables, x)` for a symbolic batch, writes the ONNX model to `out` with
    `metadata` in its metadata_props; returns what the metadata adds (the output signature).
    `onnxruntime_kernels`: quantized matrix products as ONNX Runtime's int8 kernel
    (`export/onnxruntime_kernels.py`). `channels_last`: tiling max pools as channels-last
    reductions (`TiledMaxPlugin`), for the int8 form in ONNX Runtime: its layers are channels-last
    products, and a MaxPool between them costs two transposes (OpenVINO runs MaxPool faster)."""
    require("onnx", "onnx_ir")
    import onnx

    with _quiet("jax2onnx", "onnx_ir"):
        require("jax2onnx")
        from jax2onnx import to_onnx

    from jaxopt_lab.export import onnx_plugins  # noqa: F401  (registers the QDQ lowerings)
    from jaxopt_lab.export.onnx_graph import tidy
    from jaxopt_lab.export.onnxruntime_kernels import to_onnxruntime_kernels

    def program(x):
        return apply(variables, x)

    signature = jax.ShapeDtypeStruct(("batch", *sample.shape[1:]), sample.dtype)
    with _quiet("jax2onnx", "onnx_ir"), _lax_level(channels_last):
        try:
            proto = to_onnx(program, [signature], model_name="jaxopt_lab", opset=OPSET,
                            input_names=["x"], output_names=["outputs"])
        except NotImplementedError as error:
            raise UserError(_unsupported(error, program, sample)) from None
        except TypeError as error:
            if "DimExpr" not in str(error):
                raise
            first = str(error).strip().splitlines()[0]
            raise UserError(f"ONNX export traces the batch size as a symbol, and the model "
                            f"uses it as a Python integer ({first}): write x.shape[0] or "
                            "reshape(-1, ...) instead of len(x) or int(x.shape[0])") from None
    proto = tidy(proto)
    if onnxruntime_kernels:
        to_onnxruntime_kernels(proto)
    output = jax.eval_shape(program, jax.ShapeDtypeStruct((1, *sample.shape[1:]), sample.dtype))
    added = {"output": {"shape": ["batch", *output.shape[1:]], "dtype": str(output.dtype)},
             "opset": OPSET, "converter": f"jax2onnx {importlib.metadata.version('jax2onnx')}"}
    onnx.helper.set_model_props(proto, {key: value if isinstance(value, str)
                                        else json.dumps(value, default=str)
                                        for key, value in {**metadata, **added}.items()})
    onnx.save(proto, out)
    return added


def _unsupported(error: NotImplementedError, program, sample: np.ndarray) -> str:
    """The one line for a primitive jax2onnx cannot lower, naming the layer that called it."""
    found = re.search(r"primitive '([^']+)'", str(error))
    if found is None:
        return f"ONNX export: {error}"
    primitive = found.group(1)
    layer = next((str(eqn.source_info.name_stack) for eqn in
                  _equations(jax.make_jaxpr(program)(sample[:1]).jaxpr)
                  if eqn.primitive.name == primitive), "") or "the model's top level"
    return (f"ONNX export: primitive {primitive!r} in layer {layer} has no ONNX lowering in "
            "jax2onnx; export --to stablehlo runs it, or replace the operation")


def _equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in it (jit, custom_vjp, scan...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


@contextlib.contextmanager
def _lax_level(channels_last: bool = False):
    """jax2onnx with only its lowerings of primitives, two of them ours (`onnx_plugins.py`:
    unit axes; with `channels_last`, tiling max pools); its monkey patches and own lowerings
    restored afterwards."""
    from jax2onnx.plugins.plugin_system import PLUGIN_REGISTRY, import_all_plugins

    from jaxopt_lab.export.onnx_plugins import TiledMaxPlugin, UnitAxesPlugin

    import_all_plugins()
    removed = {name: plugin for name, plugin in PLUGIN_REGISTRY.items() if _patches(plugin)}
    for name in removed:
        del PLUGIN_REGISTRY[name]
    ours = {jax.lax.broadcast_in_dim_p.name: UnitAxesPlugin}
    if channels_last:
        ours[jax.lax.reduce_window_max_p.name] = TiledMaxPlugin
    replaced = {name: PLUGIN_REGISTRY[name] for name in ours}
    for name, plugin in ours.items():
        PLUGIN_REGISTRY[name] = plugin(replaced[name])
    try:
        yield
    finally:
        PLUGIN_REGISTRY.update(removed)
        PLUGIN_REGISTRY.update(replaced)


def _patches(plugin) -> bool:
    """Whether a jax2onnx plugin swaps a Python function or class for its own while tracing."""
    if callable(getattr(plugin, "patch_info", None)):
        return True
    specs = getattr(type(plugin), "binding_specs", None)
    return bool(specs()) if callable(specs) else False


@contextlib.contextmanager
def _quiet(*loggers: str):
    """jax2onnx logs (with tracebacks) every optional example it cannot import; onnx_ir warns
    of shape values it leaves untyped."""
    logs = [logging.getLogger(name) for name in loggers]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)
