"""Tasks: a loss for the loss seam and the evaluation that belongs with it.

    loss_fn(params, model_state, batch, rng, hparams) -> (loss, aux)
    eval_fn(params, model_state, batch) -> {metric: per-example values [B]}

`aux` holds "metrics" (scalars to log), "model_state" (updated collections), "logits", "inputs"
(the batch's inputs after on-device augmentation, so a teacher can see exactly what the student
saw) and, when the loss was built with `capture`, "intermediates" (named activations). `hparams` is
`TrainState.hparams`: per-trial scalars a population may vary (here `loss.label_smoothing`).

An evaluation returns per-example values; the evaluator masks padding, sums over a split and
divides by the count, so every metric is a mean over examples (for a language model, of each
sequence's mean over its tokens: the token mean, since all sequences have one length).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.errors import UserError

LossFn = Callable[[Any, Any, dict, jax.Array, dict], tuple[jax.Array, dict]]
EvalFn = Callable[[Any, Any, dict], dict[str, jax.Array]]
Augment = Callable[[jax.Array, jax.Array], jax.Array]

LABEL_SMOOTHING = "loss.label_smoothing"  # the hparams key (a config path, as all hparams keys are)
# An optional batch key, float [B]: 1 for an example with a label, 0 for one without (a
# distillation transfer example), whose label is a placeholder the loss must not train on.
LABELED = "labeled"
# Set by gradient accumulation (`core/accumulate.py`) on each microbatch of a batch with LABELED:
# the labelled examples per microbatch, averaged over the step's microbatches and devices.
LABELED_COUNT = "labeled_count"
DATA_AXIS = "data"  # the mesh axis the step's per-device region runs over
EVAL_SEED = 0  # evaluation is deterministic; AQT still asks for a "params" stream


class Task(NamedTuple):
    """A loss and its evaluation, built for one model."""

    loss_fn: LossFn
    eval_fn: EvalFn


def apply_model(model, params, model_state, x, rng: jax.Array | None, *, train: bool,
                capture: Sequence[str] = ()) -> tuple[jax.Array, dict, dict]:
    """`model.apply` with the random streams techniques need; returns (outputs, model_state,
    intermediates).

    Streams: "dropout", and "params", from which AQT draws its stochastic-rounding noise at apply
    time. The outputs come back in float32 whatever the model computes in. `capture` are regular expressions over module paths ("Dense_0", "block_1/.*"); the
    matching modules' outputs come back by path.
    """
    rng = jax.random.key(EVAL_SEED) if rng is None else rng
    dropout_key, noise_key = jax.random.split(rng)
    mutable = list(model_state.keys()) if train else []
    if capture:
        patterns = [re.compile(p) for p in capture]

        def wanted(module, method_name: str) -> bool:
            path = "/".join(module.path)
            return method_name == "__call__" and any(p.fullmatch(path) for p in patterns)

        mutable = [*mutable, "intermediates"]
        extra = {"capture_intermediates": wanted}
    else:
        extra = {}
    out = model.apply({"params": params, **model_state}, x, mutable=mutable or False,
                      rngs={"dropout": dropout_key, "params": noise_key},
                      **train_kwargs(model, train), **extra)
    outputs, collections = out if mutable else (out, {})
    # Whatever the model computes in (train.compute_dtype), the loss and its softmax run in float32.
    outputs = jax.tree.map(lambda y: y.astype(jnp.float32)
                           if jnp.issubdtype(y.dtype, jnp.floating) else y, outputs)
    if not mutable:
        return outputs, model_state, {}
    captured = collections.pop("intermediates", {})
    intermediates = {"/".join(path[:-1]): value[0] for path, value in _flat_items(captured)}
    new_state = {**model_state, **collections} if train else model_state
    return outputs, new_state, intermediates


def inference(model) -> Callable[[dict, jax.Array], jax.Array]:
    """`apply(variables, x) -> outputs`: the model in inference mode from all its collections
    ({"params": ..., "batch_stats": ...}), as the evaluation and the measurements call it."""

    def apply(variables: dict, x: jax.Array) -> jax.Array:
        state = {k: v for k, v in variables.items() if k != "params"}
        return apply_model(model, variables["params"], state, x, None, train=False)[0]

    return apply


def stateless_inference(model) -> Callable[[dict, jax.Array], jax.Array]:
    """`inference` without random streams, for converters that trace the program into another
    runtime (ONNX): no key is split in it, and a model that draws randomness at inference fails
    loudly instead of carrying a fixed key into the artifact."""

    def apply(variables: dict, x: jax.Array) -> jax.Array:
        y = model.apply(variables, x, **train_kwargs(model, False))
        return y.astype(jnp.float32) if jnp.issubdtype(y.dtype, jnp.floating) else y

    return apply


def train_kwargs(model, train: bool) -> dict:
    """{"train": train} for modules whose __call__ takes it (every registry model); a user's
    module without the argument is called without it."""
    try:
        parameters = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return {"train": train}
    takes = "train" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return {"train": train} if takes else {}


def _flat_items(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat_items(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _forward(model, augment, capture, params, model_state, batch, rng):
    aug_key, model_key = jax.random.split(rng)
    x = batch["x"] if augment is None else augment(aug_key, batch["x"])
    outputs, model_state, intermediates = apply_model(model, params, model_state, x, model_key,
                                                      train=True, capture=capture)
    aux = {"model_state": model_state, "logits": outputs, "inputs": x}
    if capture:
        aux["intermediates"] = intermediates
    return outputs, aux


def _smoothed_cross_entropy(logits, labels, hparams):
    """Cross-entropy against labels smoothed by hparams[LABEL_SMOOTHING] (Szegedy et al. 2016).

    Written as (1 - e) * CE(label) + e * CE(uniform), so e = 0 gives the unsmoothed loss exactly.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if LABEL_SMOOTHING not in hparams:
        return ce
    e = hparams[LABEL_SMOOTHING]
    uniform = -jnp.mean(jax.nn.log_softmax(logits), axis=-1)
    return (1.0 - e) * ce + e * uniform


def labeled_mean(values: jax.Array, batch: dict) -> jax.Array:
    """The mean of per-example (or per-token [B, T]) values over the examples that have a label:
    all of them unless the batch says otherwise under LABELED.

    Inside the step's per-device region the divisor is the labelled count averaged over the
    devices, not this device's own: the devices' mean gradient is then the gradient of the whole
    batch's labelled mean, however the labels fell among the shards. Under gradient accumulation
    the batch's LABELED_COUNT carries that average over the step's microbatches too.
    """
    if LABELED not in batch:
        return jnp.mean(values)
    weights = jnp.broadcast_to(
        batch[LABELED].reshape(-1, *([1] * (values.ndim - 1))), values.shape)
    if LABELED_COUNT in batch:  # per example: a token loss [B, T] counts T positions each
        count = batch[LABELED_COUNT] * (values.size // values.shape[0])
    else:
        count = _mean_over_devices(jnp.sum(weights))
    safe = jnp.where(count > 0, count, 1.0)
    return jnp.sum(values * weights) / safe


def _mean_over_devices(x: jax.Array) -> jax.Array:
    try:
        return jax.lax.pmean(x, DATA_AXIS)
    except NameError:  # called outside the step (a test, a notebook): one device's batch
        return x


def _cross_entropy_loss(model, augment: Augment | None, capture: Sequence[str]) -> LossFn:
    """Mean (label-smoothed) softmax cross-entropy and accuracy over every labelled position: one
    per example for classes, one per token for a language model."""

    def loss_fn(params, model_state, batch, rng, hparams):
        logits, aux = _forward(model, augment, capture, params, model_state, batch, rng)
        loss = labeled_mean(_smoothed_cross_entropy(logits, batch["label"], hparams), batch)
        accuracy = labeled_mean(jnp.argmax(logits, -1) == batch["label"], batch)
        return loss, {**aux, "metrics": {"accuracy": accuracy}}

    return loss_fn


def classification(model, augment: Augment | None = None, capture: Sequence[str] = ()) -> Task:
    """Softmax cross-entropy on {"x", "label": int [B]}; accuracy."""

    def eval_fn(params, model_state, batch):
        logits, _, _ = apply_model(model, params, model_state, batch["x"], None, train=False)
        return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]),
                "accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)}

    return Task(_cross_entropy_loss(model, augment, capture), eval_fn)


def _squared_error(outputs, labels):
    predictions = outputs.reshape(labels.shape) if labels.ndim == 1 else outputs
    error = jnp.square(predictions - labels)
    return error if error.ndim == 1 else jnp.mean(error.reshape(error.shape[0], -1), axis=1)


def regression(model, augment: Augment | None = None, capture: Sequence[str] = ()) -> Task:
    """Mean squared error on {"x", "label": float [B] or [B, K]}: the loss and the metric."""

    def loss_fn(params, model_state, batch, rng, hparams):
        del hparams
        outputs, aux = _forward(model, augment, capture, params, model_state, batch, rng)
        return labeled_mean(_squared_error(outputs, batch["label"]), batch), {**aux, "metrics": {}}

    def eval_fn(params, model_state, batch):
        outputs, _, _ = apply_model(model, params, model_state, batch["x"], None, train=False)
        error = _squared_error(outputs, batch["label"])
        return {"loss": error, "mse": error}

    return Task(loss_fn, eval_fn)


def language_model(model, augment: Augment | None = None,
                   capture: Sequence[str] = ()) -> Task:
    """Next-token cross-entropy on {"x": int [B, T], "label": int [B, T]}, in nats; bits per
    token (here, per character: 1 / ln 2 nats) and next-token accuracy."""

    def eval_fn(params, model_state, batch):
        logits, _, _ = apply_model(model, params, model_state, batch["x"], None, train=False)
        nats = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["label"]), axis=-1)
        correct = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32), -1)
        return {"loss": nats, "bits_per_char": nats / math.log(2.0), "accuracy": correct}

    return Task(_cross_entropy_loss(model, augment, capture), eval_fn)


TASKS: dict[str, Callable[..., Task]] = {
    "classification": classification,
    "regression": regression,
    "language_model": language_model,
}


def make_task(name: str, model, augment: Augment | None = None,
              capture: Sequence[str] = ()) -> Task:
    """The task a data set declares (`Dataset.task`), built for `model`."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name](model, augment, capture)

