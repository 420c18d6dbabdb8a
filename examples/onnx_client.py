"""Runs an ONNX model written by `jaxopt-lab export --to onnx` in ONNX Runtime or OpenVINO.

It knows nothing of jaxopt_lab or JAX: it needs numpy and one runtime (`pip install onnxruntime`
or `pip install openvino`). The tests run it in a process where importing jaxopt_lab and jax
fails, so what it shows is what a serving machine without them sees.

    python examples/onnx_client.py model.onnx --inputs x.npz --outputs y.npz \\
        --runtime openvino --threads 2

Every array in x.npz (prepared as the model's metadata says: `--describe` prints it) is run as
one batch; y.npz holds the outputs under the same names.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

RUNTIMES = ("onnxruntime", "openvino")


def load(path: str, runtime: str, threads: int = 0, optimized: str | None = None):
    """`predict(x) -> outputs` for the model at `path` in `runtime` (0 threads: its default).

    ONNX Runtime runs with every graph optimization (`optimized` saves the graph it runs);
    OpenVINO computes what the graph says: in float32 (INFERENCE_PRECISION_HINT=f32: on CPUs with
    bf16 units it would otherwise compute in bf16), and without quantizing the float input of a
    product with int8 weights on its own (DYNAMIC_QUANTIZATION_GROUP_SIZE=0).
    """
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if optimized:
            options.optimized_model_filepath = optimized
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(path, "CPU", config)
    return lambda x: compiled(x)[0]


def describe(path: str) -> dict:
    """The model's metadata (the run, input signature and preprocessing, task, techniques,
    quantization), from the JSON file the export wrote beside it."""
    with open(path + ".json") as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an .onnx file written by jaxopt-lab export --to onnx")
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime")
    parser.add_argument("--inputs", help=".npz of input batches")
    parser.add_argument("--outputs", help=".npz to write the outputs to")
    parser.add_argument("--threads", type=int, default=0, help="0: the runtime's default")
    parser.add_argument("--optimized", metavar="FILE",
                        help="onnxruntime: save the optimized graph it runs")
    parser.add_argument("--describe", action="store_true", help="print the model's metadata")
    args = parser.parse_args(argv)
    if args.describe:
        print(json.dumps(describe(args.model), indent=2))
    if args.inputs:
        predict = load(args.model, args.runtime, args.threads, args.optimized)
        outputs = {name: predict(x) for name, x in np.load(args.inputs).items()}
        np.savez(args.outputs or "outputs.npz", **outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
