"""ONNX models run in ONNX Runtime and OpenVINO, and checked against the framework's outputs.

`export --to onnx` checks what it wrote here (by default in ONNX Runtime) on test examples:
the artifact's outputs next to the framework's own for the same form (the model, or the AQT
serving of the static int8 form). Both runtimes are in the [deploy] extra.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.metadata
import sys
from collections.abc import Callable

import jax
import numpy as np

from jaxopt_lab.errors import UserError

RUNTIMES = ("onnxruntime", "openvino")
_EXTRA = "pip install -e '.[deploy]' (or `make install`)"


def load_onnx(path: str, runtime: str, threads: int = 0,
              optimized: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """`predict(x) -> outputs` of the ONNX model at `path` (0 threads: the runtime's default).

    ONNX Runtime applies every graph optimization (`optimized`: where to save the graph it
    runs); OpenVINO computes what the graph says: in float32 (INFERENCE_PRECISION_HINT=f32; on
    CPUs with bf16 units it would otherwise compute in bf16), and without quantizing the float
    input of a product with int8 weights on its own (DYNAMIC_QUANTIZATION_GROUP_SIZE=0; its default
    did, moving a ViT's every output by ~3 % of their range, at no speed gained here).
    """
    module = _runtime(runtime)
    if runtime == "onnxruntime":
        options = module.SessionOptions()
        options.graph_optimization_level = module.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if optimized:
            options.optimized_model_filepath = optimized
        session = module.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    config = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    with _signal_stack_kept():
        compiled = module.Core().compile_model(path, "CPU", config)
    return lambda x: compiled(x)[0]


class _SignalStack(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


@contextlib.contextmanager
def _signal_stack_kept():
    """Gives the calling thread back its alternate signal stack after OpenVINO compiles.

    OpenVINO's CPU plugin points the compiling thread's signal stack at memory of its own and
    frees that memory later, with the pointer left in place: the next signal (a Ctrl-C for
    `StopSignals`, which Python handles on that stack) then crashed the process (Linux).
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    before = _SignalStack()
    libc.sigaltstack(None, ctypes.byref(before))
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(before), None)


def runtime_version(runtime: str) -> str:
    _runtime(runtime)
    return f"{runtime} {importlib.metadata.version(runtime)}"


def check_in_runtime(path: str, runtime: str, apply, variables, x: np.ndarray) -> dict:
    """The ONNX model's outputs on `x` in `runtime` against `apply(variables, x)`'s."""
    want = np.asarray(jax.jit(apply)(variables, x))
    got = load_onnx(path, runtime)(x)
    scale = float(np.abs(want).max()) or 1.0
    return {"runtime": runtime_version(runtime), "examples": len(x),
            "max_abs_difference": float(np.abs(got - want).max()),
            "max_abs_output": scale,
            "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}


def _runtime(runtime: str):
    if runtime not in RUNTIMES:
        raise UserError(f"runtime {runtime!r} is unknown; allowed: {', '.join(RUNTIMES)}")
    try:
        return importlib.import_module(runtime)
    except ImportError:
        raise UserError(f"{runtime} is not installed; it comes with the [deploy] extra: "
                        f"{_EXTRA}") from None
