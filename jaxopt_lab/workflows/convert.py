"""`jaxopt-lab quantize --workdir RUN`: a finished run to its quantized serving form.

A QAT run is converted with the options it trained with (its activation scales measured per
example, or with `calibrate` N made static: calibrated on N training batches, the form ONNX int8
runtimes serve; the summary then keeps the dynamic evaluation beside it); a float run is quantized
after training (PTQ): its weights as they are, activation scales calibrated on `calibrate` training
batches.
Either way the serving form (int8 or int4 / fp8 values, their scales, float biases) is written to
RUN/quantized/serving, evaluated on the validation and test splits, checked output for output against the
quantized model's own evaluation, measured, and summarized in RUN/quantized/summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxopt_lab.core.distributed import data_mesh
from jaxopt_lab.core.evaluate import make_evaluator, padded_batches
from jaxopt_lab.core.layers import without_seams
from jaxopt_lab.core.measure import latency_ms, model_bytes
from jaxopt_lab.core.state import model_params, sample_input
from jaxopt_lab.core.tasks import inference, make_task
from jaxopt_lab.errors import UserError
from jaxopt_lab.run.build import load_run, merge_splits
from jaxopt_lab.run.rundir import warn_if_unfinished
from jaxopt_lab.techniques.quantize import (
    calibrate,
    convert,
    quantization_of,
    serve_fn,
    served_eval_fn,
    wrap,
)

SCHEMES = ("auto", "w8", "w8a8")


def pick_scheme(scheme: str) -> str:
    """"auto": weight-only on CPUs (int8 arithmetic there is slower than float32: measured in
    results/quantize_*.md), int8 × int8 where accelerators have int8 units."""
    if scheme not in SCHEMES:
        raise UserError(f"--scheme {scheme!r} is unknown; allowed: {', '.join(SCHEMES)}")
    if scheme == "auto":
        return "w8" if jax.default_backend() == "cpu" else "w8a8"
    return scheme


def quantize_run(workdir: str, *, calibrate_batches: int = 0, scheme: str = "auto",
                 options: dict | None = None, **objects) -> dict:
    """Converts the run in `workdir`; returns (and writes) RUN/quantized/summary.json.

    Args:
      calibrate_batches: training batches for static activation scales: needed for PTQ of a
        float run unless the scheme quantizes weights only; for a QAT run, optional (0 keeps
        its per-example scales).
      scheme: "w8" (weights only), "w8a8" or "auto" (by backend).
      options: quantize options for PTQ (bits, numerics, per_channel, skip); a QAT run keeps its
        own, except `activations`, which the scheme sets.
      objects: what the run was trained with from Python (`load_run`'s), if anything.
    """
    run = load_run(workdir, **objects)
    if run.members:
        raise UserError(f"{workdir} holds a population; quantize one run (train a member alone)")
    warn_if_unfinished(workdir, run.step, run.config.train.steps, "quantize")
    scheme = pick_scheme(scheme)
    activations = scheme == "w8a8"
    if calibrate_batches and not activations:
        raise UserError(f"--calibrate {calibrate_batches} with scheme {scheme}: weights-only "
                        "quantization has no activation scales to calibrate; use --scheme w8a8")
    sample_x = sample_input(run.dataset)
    variables = {"params": model_params(run.state.params), **run.state.model_state}
    trained = run.experiment.techniques.get("quantize")
    dynamic = {}
    if trained is not None:
        if options:
            raise UserError(f"{workdir} was trained with QAT ({trained['scheme']}); its options "
                            "are fixed, only --scheme may differ")
        model, variables, dynamic = _qat_form(run, variables, calibrate_batches, activations)
        method = "qat"
    else:
        if activations and calibrate_batches < 1:
            raise UserError(f"{workdir} is a float run: post-training quantization with "
                            f"activations ({scheme}) needs --calibrate N (training batches)")
        model, variables = post_training(
            run.experiment.model, variables, run.dataset.train["x"], sample_x,
            batches=calibrate_batches, batch_size=run.config.data.batch_size,
            activations=activations, **(options or {}))
        method = "ptq"
    qoptions, skip = quantization_of(model)
    serving = convert(model, variables, sample_x)
    out_dir = os.path.join(workdir, "quantized")
    save_serving(os.path.join(out_dir, "serving"), serving)
    test = run.dataset.test
    serve = jax.jit(serve_fn(model))
    float_variables = {"params": model_params(run.state.params), **run.state.model_state}
    summary = {
        "method": method,
        "scheme": qoptions.scheme,
        "backend": jax.default_backend(),
        "options": {**qoptions.describe(), "skip": list(skip)},
        "calibration_batches": calibrate_batches if activations else 0,
        **merge_splits(evaluate_serving(model, serving, getattr(run.dataset, split),
                                        run.dataset.task, run.config.train.eval_batch_size,
                                        split)
                       for split in ("validation", "test")
                       if getattr(run.dataset, split) is not None),
        **dynamic,
        "serving_bit_identical": outputs_identical(model, variables, serving, serve, test,
                                                   run.config.train.eval_batch_size),
        "model_bytes": model_bytes(serving),
        "float_model_bytes": model_bytes(float_variables),
    }
    summary["size_ratio"] = summary["float_model_bytes"] / summary["model_bytes"]
    float_apply = _float_apply(run)
    for b in (1, 256):
        summary[f"latency_ms_batch{b}"] = latency_ms(serve, sample_x, b, variables=serving)
        summary[f"float_latency_ms_batch{b}"] = latency_ms(float_apply, sample_x, b,
                                                           variables=float_variables)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _qat_form(run, variables: dict, batches: int, activations: bool):
    """A QAT run's quantized model for serving, with its options: (model, variables, dynamic).

    With `batches` (and activations) its activation scales become static, calibrated on that
    many training batches, the form integer runtimes serve (ONNX QDQ); `dynamic` then holds the
    QAT model's own evaluation, per-example scales, as `dynamic_<split>_<metric>`: the gap to the
    static form's is what calibrating cost.
    """
    trained_options, skip = quantization_of(run.experiment.model)
    static = activations and batches > 0
    qoptions = dataclasses.replace(trained_options, activations=activations,
                                   static_activations=static, skip=skip)
    model = wrap(run.experiment.model, **dataclasses.asdict(qoptions))
    if not static:
        return model, variables, {}
    dynamic_model = wrap(run.experiment.model, **dataclasses.asdict(
        dataclasses.replace(qoptions, static_activations=False)))
    dynamic = merge_splits(
        evaluate_model(dynamic_model, variables, getattr(run.dataset, split), run.dataset.task,
                       run.config.train.eval_batch_size, split)
        for split in ("validation", "test") if getattr(run.dataset, split) is not None)
    variables = calibrated(model, variables, run.dataset.train["x"], batches,
                           run.config.data.batch_size)
    return model, variables, {f"dynamic_{key}": value for key, value in dynamic.items()}


def calibrated(model, variables: dict, train_x, batches: int, batch_size: int) -> dict:
    """`variables` with static activation scales calibrated on the first `batches` batches of
    `train_x` (AQT's running mean of per-batch absolute maxima)."""
    if batches * batch_size > len(train_x):
        raise UserError(f"--calibrate {batches} needs {batches * batch_size} training "
                        f"examples; the training split has {len(train_x)}")
    inputs = [jnp.asarray(train_x[i * batch_size:(i + 1) * batch_size]) for i in range(batches)]
    return calibrate(model, variables, inputs)


def post_training(float_model, variables: dict, train_x, sample_x, *, batches: int,
                  batch_size: int, activations: bool, **options):
    """PTQ: `float_model` wrapped for quantization and its `variables`, with static activation
    scales calibrated on the first `batches` batches of `train_x` where activations are
    quantized (weights need none: their scales come from the weights themselves)."""
    model = wrap(float_model, sample_x=sample_x, activations=activations,
                 static_activations=activations, **options)
    if activations:
        variables = calibrated(model, variables, train_x, batches, batch_size)
    return model, variables


def evaluate_serving(model, serving: dict, arrays: dict, task: str, batch_size: int,
                     split: str = "test") -> dict:
    """`<split>_<metric>` means of the serving form over `arrays` (the task's evaluation)."""
    sample_x = np.zeros((1, *arrays["x"].shape[1:]), arrays["x"].dtype)
    evaluate = make_evaluator(served_eval_fn(model, task, sample_x), arrays, batch_size,
                              data_mesh(), split)
    return evaluate(types.SimpleNamespace(
        params=serving["params"], model_state={k: v for k, v in serving.items() if k != "params"}))


def evaluate_model(model, variables: dict, arrays: dict, task: str, batch_size: int,
                   split: str) -> dict:
    """`<split>_<metric>` means of `model` as it evaluates (a QAT model: quantized on the fly)."""
    evaluate = make_evaluator(make_task(task, model).eval_fn, arrays, batch_size, data_mesh(),
                              split)
    return evaluate(types.SimpleNamespace(
        params=variables["params"],
        model_state={k: v for k, v in variables.items() if k != "params"}))


def outputs_identical(model, variables, serving, serve, arrays, batch_size: int) -> bool:
    """Whether the serving form's outputs equal, bit for bit, the quantized model's own compiled
    evaluation ("what you train is what you serve") on every example of `arrays`."""

    evaluate = jax.jit(inference(model))
    for batch in padded_batches({"x": arrays["x"], "label": arrays["label"]}, batch_size):
        if not np.array_equal(np.asarray(evaluate(variables, batch["x"])),
                              np.asarray(serve(serving, batch["x"]))):
            return False
    return True


def float_model(run):
    """The run's model without quantization: a QAT run's seams emptied (only those the module
    has: a Dense-only module of your own has no `conv_general_dilated_cls`)."""
    model = run.experiment.model
    return without_seams(model) if "quantize" in run.experiment.techniques else model


def serving_model(run, summary: dict):
    """The quantized model whose serving form `quantize_run` wrote with `summary`: the float
    model wrapped with the options recorded there (skip patterns resolved)."""
    options = {k: v for k, v in summary["options"].items() if k != "scheme"}
    return wrap(float_model(run), **options)


def _float_apply(run):
    """The float model's inference, the baseline the serving form's latency is compared with."""
    return inference(float_model(run))


def save_serving(path: str, serving: dict) -> None:
    """The serving variables as an orbax checkpoint (int8 / int4 arrays kept in their dtype)."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, serving, force=True)


def load_serving(path: str) -> dict:
    """What `save_serving` wrote, as host arrays."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.abspath(path))
