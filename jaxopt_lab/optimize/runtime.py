"""`optimize.runtime=onnxruntime|openvino`: every candidate measured where it would be served.

Each candidate's deployed form (its model, or the static int8 form `quantize` calibrated) is
exported to ONNX (`export_run`; ONNX Runtime gets its own int8 kernels, OpenVINO the QDQ form),
loaded in the runtime, and run on the validation and test splits: the accuracies the report gives
are the runtime's own outputs', with their argmax agreement to the framework's form beside them.
Latencies are timed in interleaved rounds (`profile/latency.py::time_interleaved`) at batch 1 and
256 of real test examples, beside two baselines: the baseline run in XLA float32 (every speed-up
is against it) and in the runtime's float32.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxopt_lab.export import export_run
from jaxopt_lab.export.bench import SETTLE_S, WARM_S, examples, outputs_of
from jaxopt_lab.export.forms import deployed_form
from jaxopt_lab.export.runtimes import load_onnx, runtime_version
from jaxopt_lab.profile.latency import time_interleaved
from jaxopt_lab.run.build import load_run

INT8_OPS = {"onnxruntime": "onnxruntime", "openvino": "qdq"}  # the int8 form each runs fastest
BATCH_SIZES = (1, 256)


def runtime_baseline_name(runtime: str) -> str:
    return f"baseline ({runtime} float32)"


def measure_in_runtime(runtime: str, baseline_dir: str, candidates, out_dir: str, *,
                       rounds: int = 10, calls: int = 20, progress: bool = True) -> dict:
    """{name: accuracies, agreement and latencies} for "baseline" (XLA float32), the baseline in
    the runtime's float32, and each candidate (`pipeline.Candidate`) in the runtime."""
    version = runtime_version(runtime)  # one line naming the [deploy] extra where it is missing
    threads = len(os.sched_getaffinity(0))  # what XLA's CPU client uses
    os.makedirs(out_dir, exist_ok=True)
    run = load_run(baseline_dir)
    apply, variables, _ = deployed_form(run, baseline_dir, False)
    xla = jax.jit(apply)
    variables = jax.device_put(variables)
    predicts = {"baseline": lambda x: np.asarray(jax.block_until_ready(xla(variables, x)))}
    exported = [(runtime_baseline_name(runtime), f"baseline_{runtime}", baseline_dir, None, False),
                *((c.name, c.name, c.deploy_dir, c.member, c.serving) for c in candidates)]
    references, runs = {}, {baseline_dir: run}  # a population's members share one run
    for name, stem, workdir, member, serving in exported:
        path = os.path.join(out_dir, f"{stem}.onnx")
        export_run(workdir, path, to="onnx", form="serving" if serving else "model",
                   member=member, int8_ops=INT8_OPS[runtime], check=())
        predicts[name] = load_onnx(path, runtime, threads)
        if workdir not in runs:
            runs[workdir] = load_run(workdir)
        references[name] = _framework(runs[workdir], workdir, member, serving)
    measured = {name: _accuracies(predict, references.get(name), run.dataset)
                for name, predict in predicts.items()}
    inputs = {b: examples(run.dataset.test["x"], b) for b in BATCH_SIZES}
    per_round = time_interleaved(
        {(name, b): (lambda p=predict, x=inputs[b]: p(x))
         for name, predict in predicts.items() for b in BATCH_SIZES},
        rounds=rounds, calls=calls, progress=progress, settle_s=SETTLE_S,
        warm_s=WARM_S)
    for name in predicts:
        for b in BATCH_SIZES:
            measured[name][f"latency_ms_batch{b}"] = min(per_round[name, b])
            measured[name][f"latency_ms_batch{b}_rounds"] = per_round[name, b]
    measured["runtime"] = {"name": runtime, "version": version, "threads": threads,
                           "int8_ops": INT8_OPS[runtime], "onnx_dir": out_dir}
    return measured


def _framework(run, workdir: str, member, serving: bool):
    """The framework's own form of what was exported, for the agreement."""
    apply, variables, _ = deployed_form(run, workdir, serving, member)
    fn = jax.jit(apply)
    return lambda x: np.asarray(fn(variables, x))


def _accuracies(predict, reference, dataset) -> dict:
    """Validation and test accuracy of `predict`'s outputs; their argmax agreement with the
    framework's (`reference`) where given."""
    out = {}
    for split in ("validation", "test"):
        arrays = getattr(dataset, split)
        got = outputs_of(predict, arrays["x"]).argmax(-1)
        out[f"{split}_accuracy"] = float((got == arrays["label"]).mean())
        if reference is not None:
            want = outputs_of(reference, arrays["x"]).argmax(-1)
            out[f"{split}_agreement"] = float((got == want).mean())
    return out
