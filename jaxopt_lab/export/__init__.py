"""`jaxopt-lab export --workdir RUN --out FILE [--to stablehlo|onnx]`: what a run deploys, as a
file another program runs without jaxopt_lab.

- `--to stablehlo` (default): a `jax.export` program, run by jax alone (`export/stablehlo.py`).
- `--to onnx`: an ONNX model for ONNX Runtime, OpenVINO and the rest (`export/onnx.py`); a run
  with a static int8 serving form (`jaxopt-lab quantize --scheme w8a8 --calibrate N`) exports
  its int8 weights and scales as QDQ pairs every runtime fuses into int8 kernels (or ONNX
  Runtime's own kernels: `--int8-ops onnxruntime`).

FILE.json beside it (and, for ONNX, the model's metadata_props) says what the run was, the input
it takes and how to prepare it, the task, the techniques and the quantization scheme.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from jaxopt_lab.core.state import sample_input
from jaxopt_lab.core.tasks import stateless_inference
from jaxopt_lab.errors import UserError
from jaxopt_lab.export.forms import FORMS, check_form, deployed_form, qdq_form, quantized_summary
from jaxopt_lab.export.runtimes import RUNTIMES, check_in_runtime, runtime_version
from jaxopt_lab.export.stablehlo import PLATFORMS, write_stablehlo
from jaxopt_lab.run.build import load_run, member_state
from jaxopt_lab.run.rundir import warn_if_unfinished

__all__ = ["FORMS", "INT8_OPS", "PLATFORMS", "TARGETS", "deployed_form", "export_run"]

TARGETS = ("stablehlo", "onnx")
INT8_OPS = ("qdq", "onnxruntime")
PATCH_RANKS = {"qdq": (1,), "onnxruntime": (1, 2, 3)}  # convs stated as patches, by spatial axes
W8_NOTE = ("note: a w8 form (int8 weights, float activations) runs in float arithmetic in ONNX "
           "runtimes, no faster than float32; for int8 arithmetic: jaxopt-lab quantize "
           "--scheme w8a8 --calibrate N")


def export_run(workdir: str, out: str, platforms: tuple[str, ...] = (), form: str = "auto",
               member: int | None = None, to: str = "stablehlo", int8_ops: str = "qdq",
               check: tuple[str, ...] = ("onnxruntime",), **objects) -> dict:
    """Writes `out` and `out`.json (its metadata); returns the latter.

    Args:
      platforms: StableHLO only: where the artifact may run (default: this process's backend).
      form: "serving" (the quantized serving form), "model" (the run's model as it evaluates) or
        "auto" (the serving form where the run has one).
      member: for a population run, the member to export (its model as it evaluates).
      to: "stablehlo" or "onnx".
      int8_ops: ONNX int8 forms: "qdq" (QuantizeLinear / DequantizeLinear pairs around float
        ops, which every runtime fuses into int8 kernels) or "onnxruntime" (ONNX Runtime's own
        int8 kernel with the bias in it, `export/onnxruntime_kernels.py`; only it loads them).
      check: ONNX: the runtimes to run the written model in, on up to 256 test examples, next
        to the framework's own outputs of the same form (recorded under "checks").
      objects: what the run was trained with from Python (`load_run`'s), if anything.
    """
    _check_arguments(out, platforms, to, int8_ops, check)
    check_form(workdir, form)
    run = load_run(workdir, **objects)
    member_state(run, member, workdir)  # refuses a missing or impossible --member in one line
    warn_if_unfinished(workdir, run.step, run.config.train.steps, "export")
    sample = sample_input(run.dataset)
    quantized = quantized_summary(workdir) if form != "model" else None
    metadata = {
        "run": os.path.abspath(workdir),
        "step": run.step,
        "member": member,
        "model": run.config.model.to_dict(),
        "task": run.dataset.task,
        "techniques": run.experiment.techniques,
        "quantization": None if quantized is None else {
            k: quantized[k] for k in ("method", "scheme", "options", "calibration_batches")},
        "input": {"name": "x", "shape": ["batch", *sample.shape[1:]], "dtype": str(sample.dtype),
                  "preprocessing": run.dataset.preprocessing},
        "to": to,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if to == "onnx":
        metadata.update(_write_onnx(run, workdir, quantized, sample, out, metadata, member,
                                    int8_ops))
        metadata["checks"] = _check(run, workdir, quantized is not None, member, out, check)
    else:
        apply, variables, metadata["form"] = deployed_form(run, workdir, form != "model", member)
        metadata.update(write_stablehlo(apply, variables, sample, out, platforms))
    metadata["bytes"] = os.path.getsize(out)
    with open(out + ".json", "w") as f:
        json.dump(metadata, f, indent=2, default=_plain)
    return metadata


def _check_arguments(out: str, platforms, to: str, int8_ops: str, check) -> None:
    if to not in TARGETS:
        raise UserError(f"--to {to!r} is unknown; allowed: {', '.join(TARGETS)}")
    if int8_ops not in INT8_OPS:
        raise UserError(f"--int8-ops {int8_ops!r} is unknown; allowed: {', '.join(INT8_OPS)}")
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown:
        raise UserError(f"--platforms {' '.join(unknown)}: allowed are {', '.join(PLATFORMS)}")
    if platforms and to != "stablehlo":
        raise UserError("--platforms is for --to stablehlo; an ONNX model runs wherever its "
                        "runtime does")
    unknown = [r for r in check if r not in RUNTIMES]
    if unknown:
        raise UserError(f"--check {' '.join(unknown)}: allowed are {', '.join(RUNTIMES)}")
    if to == "onnx":
        for runtime in check:
            runtime_version(runtime)  # one line naming the extra where it is not installed
    if int8_ops == "onnxruntime" and set(check) - {"onnxruntime"}:
        raise UserError("--int8-ops onnxruntime writes ONNX Runtime's own operators, which "
                        f"{', '.join(sorted(set(check) - {'onnxruntime'}))} cannot load: check "
                        "it in onnxruntime, or export --int8-ops qdq for every runtime")
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a directory: name the file to write, e.g. "
                        f"{os.path.join(out, 'model.' + ('onnx' if to == 'onnx' else 'stablehlo'))}")


def _write_onnx(run, workdir, quantized, sample, out, metadata, member, int8_ops) -> dict:
    """The ONNX model of the run's float model or its static int8 form; the metadata it adds."""
    from jaxopt_lab.export.onnx import write_onnx

    if quantized is None:
        _, variables, _ = deployed_form(run, workdir, False, member)  # the model's variables
        apply, name, ops = stateless_inference(run.experiment.model), "model", None
    else:
        # Convs as products of patches: every one for ONNX Runtime (whose int8 convs loop over
        # the batch); in the portable form only 1-D ones, since OpenVINO and TensorRT fuse QDQ
        # convs themselves (OpenVINO ran ResNet-20 at 2.33x XLA with its 2-D ones as convs,
        # 0.73x as patches; docs/deploy.md).
        apply, variables, name = qdq_form(run, workdir, PATCH_RANKS[int8_ops])
        ops = int8_ops if quantized["options"]["activations"] else None
        if ops is None:
            print(W8_NOTE, file=sys.stderr)
    added = write_onnx(apply, variables, sample, out, {**metadata, "form": name, "int8_ops": ops},
                       onnxruntime_kernels=ops == "onnxruntime",
                       channels_last=ops == "onnxruntime")
    return {"form": name, "int8_ops": ops, **added}


def _check(run, workdir: str, serving: bool, member, out: str, runtimes) -> list[dict]:
    """The written model run in each runtime next to the framework's form it stands for: the
    model, or the AQT serving of the quantized form (`check_in_runtime`)."""
    apply, variables, _ = deployed_form(run, workdir, serving, member)
    x = run.dataset.test["x"][:256]
    return [check_in_runtime(out, runtime, apply, variables, x) for runtime in runtimes]


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else str(value)
