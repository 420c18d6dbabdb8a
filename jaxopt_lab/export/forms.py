"""What a run deploys, as `apply(variables, x)`: the program `export` writes and `optimize` times.

Where `jaxopt-lab quantize` wrote the run's serving form (RUN/quantized), that form; otherwise the
run's model as it evaluates (a QAT run's fake-quantized inference; a shrunk run, written by
`jaxopt-lab shrink`, is a run of its own with the narrow model; a population's member as its
model: populations have no serving form).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax

from jaxopt_lab.core.state import model_params, sample_input
from jaxopt_lab.core.tasks import inference, stateless_inference
from jaxopt_lab.errors import UserError
from jaxopt_lab.export.qdq import qdq_model, quantized_layers
from jaxopt_lab.run.build import member_state
from jaxopt_lab.techniques.quantize import serve_fn
from jaxopt_lab.techniques.quantize.serving import with_placeholders
from jaxopt_lab.workflows.convert import float_model, load_serving, serving_model

FORMS = ("auto", "serving", "model")


def quantized_summary(workdir: str) -> dict | None:
    """RUN/quantized/summary.json, None where `jaxopt-lab quantize` has not run."""
    path = os.path.join(workdir, "quantized", "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_form(workdir: str, form: str) -> None:
    """One line for a form that is unknown or that the run does not have."""
    if form not in FORMS:
        raise UserError(f"--form {form!r} is unknown; allowed: {', '.join(FORMS)}")
    if form == "serving" and quantized_summary(workdir) is None:
        raise UserError(f"{workdir} has no serving form: run `jaxopt-lab quantize --workdir "
                        f"{workdir}` first, or export --form model")


def deployed_form(run, workdir: str, serving: bool = True, member: int | None = None):
    """(apply, variables, name) of what a run deploys: `apply(variables, x)` gives its outputs.

    With `serving` and a serving form written by `jaxopt-lab quantize` (RUN/quantized), that form's
    integer weights run by AQT's SERVE mode; otherwise the run's model as it evaluates.
    """
    quantized = quantized_summary(workdir) if serving else None
    if quantized is not None:
        return (serve_fn(serving_model(run, quantized)),
                load_serving(os.path.join(workdir, "quantized", "serving")),
                f"{quantized['scheme']} serving form")
    state = member_state(run, member, workdir)
    variables = jax.device_get({"params": model_params(state.params), **state.model_state})
    return inference(run.experiment.model), variables, "model"


def qdq_form(run, workdir: str, patch_ranks: tuple[int, ...] = (1, 2, 3)
             ) -> tuple[Callable, dict[str, Any], str]:
    """(apply, variables, name) of the run's serving form as ONNX QDQ graphs state it: the
    frozen int8 weights and static activation scales of RUN/quantized (`export/qdq.py`)."""
    quantized = quantized_summary(workdir)
    model = serving_model(run, quantized)
    serving = load_serving(os.path.join(workdir, "quantized", "serving"))
    layers = quantized_layers(model, serving)
    exported = qdq_model(model, float_model(run), layers, patch_ranks)
    params = jax.device_get(with_placeholders(model, serving["params"],
                                              sample_input(run.dataset)))
    state = {k: v for k, v in serving.items() if k not in ("params", "aqt")}
    return (stateless_inference(exported), {"params": params, **state},
            f"{quantized['scheme']} serving form")
