"""`jaxopt-lab export --workdir RUN --out FILE`: a run's inference as a StableHLO artifact.

FILE holds the serialized `jax.export.Exported` of `x -> outputs`, the run's variables inside it
as constants and its batch dimension symbolic, so it serves any batch size; FILE.json beside it
says what the run was and the input it takes. Loading it needs jax alone, not jaxopt_lab:

    import jax, numpy as np
    with open("model.stablehlo", "rb") as f:
        model = jax.export.deserialize(bytearray(f.read()))
    x = np.zeros((8, *model.in_avals[0].shape[1:]), model.in_avals[0].dtype)
    outputs = model.call(x)

What is exported is what the framework serves: where `jaxopt-lab quantize` wrote the run's
serving form (RUN/quantized), its integer weights and scales, run by AQT's SERVE mode; otherwise
the run's model as it evaluates (a QAT run's fake-quantized inference; a shrunk run, written by
`jaxopt-lab shrink`, is a run of its own with the narrow model).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxopt_lab.core.state import model_params, sample_input
from jaxopt_lab.core.tasks import inference
from jaxopt_lab.errors import UserError
from jaxopt_lab.run.build import load_run, member_state
from jaxopt_lab.run.rundir import warn_if_unfinished
from jaxopt_lab.techniques.quantize import serve_fn
from jaxopt_lab.workflows.convert import load_serving, serving_model

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
FORMS = ("auto", "serving", "model")


def export_run(workdir: str, out: str, platforms: tuple[str, ...] = (),
               form: str = "auto", member: int | None = None, **objects) -> dict:
    """Writes `out` (the serialized program) and `out`.json (its metadata); returns the latter.

    Args:
      platforms: where the artifact may run (default: this process's backend); lowering for
        several makes one artifact that each of them loads.
      form: "serving" (the quantized serving form), "model" (the run's model as it evaluates) or
        "auto" (the serving form where the run has one).
      member: for a population run, the member to export (its model as it evaluates).
      objects: what the run was trained with from Python (`load_run`'s), if anything.
    """
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown:
        raise UserError(f"--platforms {' '.join(unknown)}: allowed are {', '.join(PLATFORMS)}")
    if form not in FORMS:
        raise UserError(f"--form {form!r} is unknown; allowed: {', '.join(FORMS)}")
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a directory: name the file to write, e.g. "
                        f"{os.path.join(out, 'model.stablehlo')}")
    run = load_run(workdir, **objects)
    member_state(run, member, workdir)  # refuses a missing or impossible --member in one line
    warn_if_unfinished(workdir, run.step, run.config.train.steps, "export")
    if form == "serving" and not os.path.exists(os.path.join(workdir, "quantized", "summary.json")):
        raise UserError(f"{workdir} has no serving form: run `jaxopt-lab quantize --workdir "
                        f"{workdir}` first, or export --form model")
    apply, variables, exported_form = deployed_form(run, workdir, serving=form != "model",
                                                    member=member)
    sample = sample_input(run.dataset)
    (batch,) = jax.export.symbolic_shape("batch")
    signature = jax.ShapeDtypeStruct((batch, *sample.shape[1:]), sample.dtype)
    exported = jax.export.export(jax.jit(lambda x: apply(variables, x)),
                                 platforms=platforms or None)(signature)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "wb") as f:
        f.write(exported.serialize())
    output = exported.out_avals[0]
    metadata = {
        "run": os.path.abspath(workdir),
        "step": run.step,
        "member": member,
        "model": run.config.model.to_dict(),
        "task": run.dataset.task,
        "techniques": run.experiment.techniques,
        "form": exported_form,
        "input": {"shape": ["batch", *sample.shape[1:]], "dtype": str(sample.dtype),
                  "preprocessing": run.dataset.preprocessing},
        "output": {"shape": ["batch", *output.shape[1:]], "dtype": str(output.dtype)},
        "platforms": list(exported.platforms),
        "bytes": os.path.getsize(out),
        "jax": jax.__version__,
    }
    with open(out + ".json", "w") as f:
        json.dump(metadata, f, indent=2, default=_plain)
    return metadata


def deployed_form(run, workdir: str, serving: bool = True, member: int | None = None):
    """(apply, variables, name) of what a run deploys: `apply(variables, x)` gives its outputs.

    With `serving` and a serving form written by `jaxopt-lab quantize` (RUN/quantized), that form's
    integer weights run by AQT's SERVE mode; otherwise the run's model as it evaluates. Export
    serializes it and `optimize` times it, so both speak of the same program. A population's
    `member` deploys as its model (populations have no serving form).
    """
    summary_path = os.path.join(workdir, "quantized", "summary.json")
    if serving and os.path.exists(summary_path):
        with open(summary_path) as f:
            quantized = json.load(f)
        return (serve_fn(serving_model(run, quantized)),
                load_serving(os.path.join(workdir, "quantized", "serving")),
                f"{quantized['scheme']} serving form")
    state = member_state(run, member, workdir)
    variables = jax.device_get({"params": model_params(state.params), **state.model_state})
    return inference(run.experiment.model), variables, "model"


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else str(value)
