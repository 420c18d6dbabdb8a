"""Knowledge distillation at the loss seam: a student loss that also matches a frozen teacher.

    loss_fn = distill.wrap(task.loss_fn, (teacher_model, teacher_variables), temperature=4.0,
                           alpha=0.9)

`wrap` returns a loss of the seam's signature. The teacher's variables are closed over: constants
of the compiled step, never trained, never in the student's optimizer state or checkpoint. The
teacher reads `aux["inputs"]`, the inputs after the student's on-device augmentation, so both see
the same example and augmentation does not become noise in the targets; where the batch carries
precomputed teacher logits (`transfer.TEACHER_LOGITS`: no augmentation, so they never change) it
reads those instead.

Soft-target KD (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):
loss = alpha · T² · D(teacher_T, student_T) + (1 − alpha) · hard loss, with p_T = softmax(z / T).
The T² keeps the soft gradients' scale independent of T. D is the KL divergence ("kl") or the
cross-entropy ("cross_entropy"): they differ by the teacher's entropy, a constant, so they train
alike but log different values. Temperature and alpha are read from `hparams` where the state has
them (TEMPERATURE, ALPHA: per-trial values a population varies), else the given defaults.

Feature hints (Romero et al. 2015, "FitNets"): `features` pairs a student layer with a teacher
layer (module paths); a learned linear map of the student's activation regresses the teacher's,
weighted by `feature_weight`. The maps live in params[hints.HINTS], trained and checkpointed with
the student and dropped from what is exported (`core.state.model_params`).

Transfer sets (unlabeled examples, soft loss only) are in `transfer.py`; teachers (from a run
directory, or trained first) in `teacher.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_lab.core.state import model_params
from jaxopt_lab.core.tasks import LossFn
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.contract import takes_apply_fn
from jaxopt_lab.techniques.distill import hints
from jaxopt_lab.techniques.distill.options import (
    DEFAULTS,
    FORMS,
    DistillOptions,
    check_loss_options,
)
from jaxopt_lab.techniques.distill.teacher import describe_teacher, teacher_fn
from jaxopt_lab.techniques.distill.transfer import (
    TEACHER_LOGITS,
    transfer_inputs,
    with_teacher_logits,
    with_transfer,
)

__all__ = ["ALPHA", "FORMS", "TEACHER_LOGITS", "TEMPERATURE", "DistillOptions",
           "describe_teacher", "distillation_record", "soft_loss", "teacher_fn", "transfer_inputs", "with_teacher_logits",
           "with_transfer", "wrap"]

TEMPERATURE = "techniques.distill.temperature"  # hparams keys (config paths, as all are)
ALPHA = "techniques.distill.alpha"


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


def wrap(loss_fn: LossFn, teacher: Any, *, temperature: float = DEFAULTS.temperature,
         alpha: float = DEFAULTS.alpha, form: str = DEFAULTS.form,
         member: int = DEFAULTS.teacher_member, features: Sequence[Sequence[str]] = (),
         feature_weight: float = DEFAULTS.feature_weight) -> LossFn:
    """`loss_fn` (which must return aux["logits"], and aux["inputs"] where it augments its inputs;
    with `features`, also aux["intermediates"] of the student layers: build it with `capture`)
    distilled from `teacher`
    (a run from `jaxopt_lab.load_run`, its population member `member`, or a (module, variables) pair).

    Logs `distill_soft_loss`, `distill_hard_loss` and, with features, `distill_hint_loss`.
    """
    check_loss_options(temperature, alpha, form)
    features = hints.check_features(features, feature_weight)
    forward = teacher_fn(teacher, member, capture=[t for _, t in features])

    def distilled(params, model_state, batch, rng, hparams, **model):
        hard, aux = loss_fn(model_params(params), model_state, batch, rng, hparams, **model)
        if "logits" not in aux:
            raise UserError(f"distill: loss_fn {getattr(loss_fn, '__name__', '')!r} must return "
                            "the student's outputs as aux['logits']")
        t = hparams.get(TEMPERATURE, jnp.float32(temperature))
        a = hparams.get(ALPHA, jnp.float32(alpha))
        if TEACHER_LOGITS in batch and not features:
            teacher_logits, teacher_features = batch[TEACHER_LOGITS], {}
        else:  # the inputs the student saw, after on-device augmentation where it has any
            teacher_logits, teacher_features = forward(aux.get("inputs", batch["x"]))
        soft = soft_loss(aux["logits"], teacher_logits, t, form)
        metrics = {**aux.get("metrics", {}), "distill_soft_loss": soft,
                   "distill_hard_loss": hard}
        loss = a * soft + (1.0 - a) * hard
        if features:
            hint = hints.hint_loss(params, aux.get("intermediates", {}), teacher_features,
                                   features)
            metrics["distill_hint_loss"] = hint
            loss = loss + feature_weight * hint
        return loss, {**aux, "metrics": metrics}

    if takes_apply_fn(loss_fn):  # the composed model's apply passes through to the student's loss
        def wrapped(params, model_state, batch, rng, hparams, *, apply_fn):
            return distilled(params, model_state, batch, rng, hparams, apply_fn=apply_fn)
    else:
        def wrapped(params, model_state, batch, rng, hparams):
            return distilled(params, model_state, batch, rng, hparams)
    # What summary.json records of it, so a run given this loss from Python records it.
    wrapped.distill_record = {
        "temperature": temperature, "alpha": alpha, "form": form,
        "feature_weight": feature_weight, "member": member,
        "features": [list(pair) for pair in features], **describe_teacher(teacher, member)}
    return wrapped


def distillation_record(loss_fn: LossFn) -> dict | None:
    """What `wrap` made `loss_fn` do, as summary.json records it; None for another loss."""
    return getattr(loss_fn, "distill_record", None)
