"""Knowledge distillation at the loss seam: a student loss that also matches a frozen teacher.

    loss_fn = distill.wrap(task.loss_fn, (teacher_model, teacher_variables), temperature=4.0,
                           alpha=0.9)

`wrap` returns a loss of the seam's signature. The teacher's variables are closed over: constants
of the compiled step, never trained, never in the student's optimizer state or checkpoint. The
teacher reads `aux["inputs"]`, the inputs after the student's on-device augmentation, so both see
the same example and augmentation does not become noise in the targets.

Soft-target KD (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):
loss = alpha · T² · D(teacher_T, student_T) + (1 − alpha) · hard loss, with p_T = softmax(z / T).
The T² keeps the soft gradients' scale independent of T. D is the KL divergence ("kl") or the
cross-entropy ("cross_entropy"): they differ by the teacher's entropy, a constant, so they train
alike but log different values. Temperature and alpha are read from `hparams` where the state has
them (TEMPERATURE, ALPHA: per-trial values a population varies), else the given defaults.

The config path: `techniques.distill.teacher` (a run directory), temperature, alpha, form. Not
built yet: feature hints, transfer sets, the experiments.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_lab.core.tasks import LossFn, apply_model
from jaxopt_lab.errors import UserError

TEMPERATURE = "techniques.distill.temperature"  # hparams keys (config paths, as all are)
ALPHA = "techniques.distill.alpha"
FORMS = ("kl", "cross_entropy")


def teacher_logits_fn(teacher: Any):
    """`x -> logits` of a teacher given as a (module, variables) pair or a `core.run.Run`, in
    inference mode, with no gradient reaching its variables."""
    if hasattr(teacher, "experiment") and hasattr(teacher, "state"):
        if teacher.members:
            raise UserError("distill: the teacher run is a population; pick one member's "
                            "variables and pass (module, variables)")
        module = teacher.experiment.model
        variables = {"params": teacher.state.params, **teacher.state.model_state}
    else:
        try:
            module, variables = teacher
        except (TypeError, ValueError):
            raise UserError("distill: teacher must be a Run (core.run.load_run) or a "
                            "(module, variables) pair") from None
    variables = jax.tree.map(jax.lax.stop_gradient, dict(variables))
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def logits(x):
        outputs, _, _ = apply_model(module, params, state, x, None, train=False)
        return jax.lax.stop_gradient(outputs)

    return logits


def soft_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: jax.Array,
              form: str = "kl") -> jax.Array:
    """T² · D(softmax(teacher / T), softmax(student / T)), the mean over examples (and tokens)."""
    log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    p_teacher = jnp.exp(log_teacher)
    per_example = -jnp.sum(p_teacher * log_student, axis=-1)
    if form == "kl":
        per_example = per_example + jnp.sum(p_teacher * log_teacher, axis=-1)
    return temperature**2 * jnp.mean(per_example)


def check_options(temperature: float, alpha: float, form: str) -> None:
    """One line naming the first bad option."""
    if form not in FORMS:
        raise UserError(f"distill form={form!r} is unknown; allowed: {', '.join(FORMS)}")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float))
                                             and temperature > 0):
        raise UserError(f"distill temperature={temperature!r} must be a number > 0")
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise UserError(f"distill alpha={alpha!r} must be a number in [0, 1]")


def describe_teacher(run, workdir: str) -> dict:
    """summary.json's teacher fields: its test accuracy (from its own summary in `workdir`, where
    it has one) and its parameter count, beside the student's."""
    path = os.path.join(workdir, "summary.json")
    fields = {"teacher_params": sum(int(x.size) for x in jax.tree.leaves(run.state.params))}
    if os.path.exists(path):
        with open(path) as f:
            accuracy = json.load(f).get("test_accuracy")
        if accuracy is not None:
            fields["teacher_test_accuracy"] = accuracy
    return fields


def wrap(loss_fn: LossFn, teacher: Any, *, temperature: float = 4.0, alpha: float = 0.9,
         form: str = "kl") -> LossFn:
    """`loss_fn` (which must return aux["logits"] and aux["inputs"]) distilled from `teacher`.

    Logs `distill_soft_loss` and `distill_hard_loss` beside the loss's own metrics.
    """
    check_options(temperature, alpha, form)
    teacher_logits = teacher_logits_fn(teacher)

    def distilled(params, model_state, batch, rng, hparams):
        hard, aux = loss_fn(params, model_state, batch, rng, hparams)
        t = hparams.get(TEMPERATURE, jnp.float32(temperature))
        a = hparams.get(ALPHA, jnp.float32(alpha))
        soft = soft_loss(aux["logits"], teacher_logits(aux["inputs"]), t, form)
        metrics = {**aux["metrics"], "distill_soft_loss": soft, "distill_hard_loss": hard}
        return a * soft + (1.0 - a) * hard, {**aux, "metrics": metrics}

    return distilled
