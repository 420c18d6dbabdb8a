"""`jaxopt-lab serve-bench --workdir RUN`: what a run deploys, timed where it would be served.

One process times, in interleaved rounds (`profile/latency.py::time_interleaved`), at batch 1
and 256 of real test examples:

- `xla float32`: the run's float model compiled by XLA, the baseline every ratio is taken to;
- `xla serving`: the run's serving form in XLA (AQT's SERVE), where `quantize` wrote one;
- per ONNX runtime: the float model exported to ONNX (`<runtime> float32`) and, where the run has
  a static int8 form, that form as QDQ pairs (`<runtime> int8 qdq`) and, in ONNX Runtime, as its
  own int8 kernels (`onnxruntime int8 onnxruntime`).

Each form's outputs are checked first against the framework's own of the same form (the float
model; the AQT serving of the quantized form) on the test split: argmax agreement, accuracy,
largest difference. A speed-up is taken within each round (both met the same machine) and given
as the median with its range. ONNX runtimes run with `threads` intra-op threads (default: the
cores this process may use, what XLA's CPU client uses); the count is recorded.
"""

from __future__ import annotations

import json
import os
import statistics

import jax
import numpy as np

from jaxopt_lab.core.state import model_params, sample_input
from jaxopt_lab.core.tasks import inference, stateless_inference
from jaxopt_lab.errors import UserError
from jaxopt_lab.export import INT8_OPS, export_run
from jaxopt_lab.export.forms import deployed_form, quantized_summary
from jaxopt_lab.export.onnx import write_onnx
from jaxopt_lab.export.runtimes import RUNTIMES, load_onnx, runtime_version
from jaxopt_lab.host import cpu_model
from jaxopt_lab.profile.latency import time_interleaved
from jaxopt_lab.run.build import load_run
from jaxopt_lab.workflows.convert import float_model

BASELINE = "xla float32"
# Between forms: OpenVINO's and ONNX Runtime's worker threads spin for a while after a call, and
# took the cores from the form timed next (ONNX Runtime's int8 form ran slower after OpenVINO).
SETTLE_S = 0.05
# After that pause, each form is called for this long before it is timed: its thread pool (ONNX
# Runtime's, OpenVINO's) is still waking up for some calls after the first, and timing them made
# ONNX Runtime's int8 wide CNN 30 % slower at batch 1 than when warm (XLA's 2 %).
WARM_S = 0.01


def serve_bench(workdir: str, runtimes: tuple[str, ...] = RUNTIMES, *,
                batch_sizes: tuple[int, ...] = (1, 256), rounds: int = 10, calls: int = 20,
                threads: int = 0, progress: bool = True, **objects) -> dict:
    """Times and checks every form (above); writes RUN/deploy/serve_bench.json and returns it."""
    unknown = [r for r in runtimes if r not in (*RUNTIMES, "xla")]
    if unknown:
        raise UserError(f"--runtime {' '.join(unknown)}: allowed are xla, {', '.join(RUNTIMES)}")
    onnx_runtimes = [r for r in runtimes if r != "xla"]
    versions = {r: runtime_version(r) for r in onnx_runtimes}  # one line where one is missing
    threads = threads or len(os.sched_getaffinity(0))
    run = load_run(workdir, **objects)
    if run.members:
        raise UserError(f"{workdir} holds a population; serve-bench times one run")
    out_dir = os.path.join(workdir, "deploy")
    os.makedirs(out_dir, exist_ok=True)
    forms = _forms(run, workdir, onnx_runtimes, out_dir, threads)
    test = run.dataset.test
    references = {}  # each reference's outputs computed once (three forms share the float one)
    for _, reference in forms.values():
        references.setdefault(reference, outputs_of(reference, test["x"]))
    checks = {name: _check(outputs_of(predict, test["x"]), references[reference], test)
              for name, (predict, reference) in forms.items()}
    inputs = {b: examples(test["x"], b) for b in batch_sizes}
    per_round = time_interleaved(
        {(name, b): (lambda p=predict, x=inputs[b]: p(x))
         for name, (predict, _) in forms.items() for b in batch_sizes},
        rounds=rounds, calls=calls, progress=progress, settle_s=SETTLE_S,
        warm_s=WARM_S)
    result = {
        "run": os.path.abspath(workdir), "threads": threads, "rounds": rounds, "calls": calls,
        "versions": {"jax": jax.__version__, **versions}, "cpu": cpu_model(),
        "forms": {name: {**checks[name], **timings(per_round, name, batch_sizes)}
                  for name in forms}}
    with open(os.path.join(out_dir, "serve_bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def _forms(run, workdir: str, runtimes, out_dir: str, threads: int) -> dict:
    """{name: (predict(x) -> outputs, the framework's reference apply(x))}."""
    model = float_model(run)
    variables = jax.device_get({"params": model_params(run.state.params),
                                **run.state.model_state})
    xla_float = jax.jit(inference(model))
    float_apply = (lambda x: np.asarray(jax.block_until_ready(xla_float(variables, x))))
    forms = {BASELINE: (float_apply, float_apply)}
    quantized = quantized_summary(workdir)
    serving = None
    if quantized is not None:
        apply, serving_variables, _ = deployed_form(run, workdir)
        xla_serving = jax.jit(apply)
        serving = (lambda x: np.asarray(jax.block_until_ready(
            xla_serving(serving_variables, x))))
        forms["xla serving"] = (serving, serving)
    static = quantized is not None and quantized["options"]["static_activations"]
    written = set()  # each file exported once per invocation (never a stale one reused)
    for runtime in runtimes:
        path = os.path.join(out_dir, "float32.onnx")
        if path not in written:
            write_onnx(stateless_inference(model), variables, sample_input(run.dataset), path,
                       {"run": os.path.abspath(workdir), "form": "float32"})
            written.add(path)
        forms[f"{runtime} float32"] = (load_onnx(path, runtime, threads), float_apply)
        for ops in INT8_OPS if static else ():
            if ops in RUNTIMES and ops != runtime:
                continue  # a runtime's own operators: only it loads them
            path = os.path.join(out_dir, f"int8_{ops}.onnx")
            if path not in written:
                export_run(workdir, path, to="onnx", int8_ops=ops, check=())
                written.add(path)
            forms[f"{runtime} int8 {ops}"] = (load_onnx(path, runtime, threads), serving)
    return forms


def examples(x: np.ndarray, b: int) -> np.ndarray:
    """The first `b` test examples (repeated where the split has fewer)."""
    return np.resize(x, (b, *x.shape[1:])).astype(x.dtype)


def _check(got: np.ndarray, want: np.ndarray, test: dict) -> dict:
    return {"test_examples": len(got),
            "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
            "max_abs_difference": float(np.abs(got - want).max()),
            "test_accuracy": float((got.argmax(-1) == test["label"]).mean()),
            "reference_test_accuracy": float((want.argmax(-1) == test["label"]).mean())}


def outputs_of(predict, x: np.ndarray, size: int = 256) -> np.ndarray:
    return np.concatenate([np.asarray(predict(x[i:i + size])) for i in range(0, len(x), size)])


def timings(per_round: dict, name: str, batch_sizes) -> dict:
    """Median latency per batch size with its rounds, and the speed-up over the baseline taken
    within each round: median and range."""
    out = {}
    for b in batch_sizes:
        rounds = per_round[name, b]
        ratios = [base / own for base, own in zip(per_round[BASELINE, b], rounds, strict=True)]
        out.update({f"latency_ms_batch{b}": statistics.median(rounds),
                    f"latency_ms_batch{b}_rounds": rounds,
                    f"speedup_batch{b}": statistics.median(ratios),
                    f"speedup_batch{b}_range": [min(ratios), max(ratios)]})
    return out


def table(result: dict, batch_sizes=(1, 256)) -> str:
    """The result as a markdown table, one row per form."""
    head = "| form | agreement | test acc | " + " | ".join(
        f"ms @{b} | × vs XLA f32 @{b}" for b in batch_sizes) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(batch_sizes))]
    for name, row in result["forms"].items():
        cells = [f"{row[f'latency_ms_batch{b}']:.3f} | {row[f'speedup_batch{b}']:.2f} "
                 f"({row[f'speedup_batch{b}_range'][0]:.2f}–{row[f'speedup_batch{b}_range'][1]:.2f})"
                 for b in batch_sizes]
        lines.append(f"| {name} | {row['argmax_agreement']:.2%} | {row['test_accuracy']:.4f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions_line(result: dict) -> str:
    return (f"{result['cpu']}; {result['threads']} threads; "
            + ", ".join(f"{k} {v.split()[-1]}" for k, v in result["versions"].items())
            + f"; {result['rounds']} interleaved rounds of {result['calls']} calls")
