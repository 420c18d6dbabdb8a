"""The update seam's default: an optax optimizer and learning-rate schedule chosen from config.

The learning rate and weight decay are injected hyperparameters (`optax.inject_hyperparams`), so
they live in the optimizer state: a vectorized sweep gives each trial its own values by writing
them into a vmapped state, and checkpoints carry them.
"""

from __future__ import annotations

import ml_collections
import optax

from jaxopt_lab.errors import UserError


def _schedule_shape(name: str, steps: int, warmup: int):
    """A multiplier of the peak learning rate as a function of the step count."""
    if name in ("constant", "reduce_on_plateau"):
        return optax.constant_schedule(1.0)
    if name == "cosine":
        return optax.cosine_decay_schedule(1.0, decay_steps=steps)
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=max(warmup, 1),
                                                  decay_steps=max(steps, warmup + 1))
    if name == "one_cycle":
        return optax.cosine_onecycle_schedule(transition_steps=steps, peak_value=1.0)
    raise UserError(f"unknown optim.schedule {name!r}")


def _base_optimizer(name: str, learning_rate, weight_decay, momentum: float, decay: bool):
    if name == "adamw":
        return optax.adamw(learning_rate, b1=momentum, weight_decay=weight_decay)
    if name == "lamb":
        return optax.lamb(learning_rate, b1=momentum, weight_decay=weight_decay)
    base = {
        "sgd": lambda: optax.sgd(learning_rate),
        "momentum": lambda: optax.sgd(learning_rate, momentum=momentum),
        "nesterov": lambda: optax.sgd(learning_rate, momentum=momentum, nesterov=True),
        "adam": lambda: optax.adam(learning_rate, b1=momentum),
        "rmsprop": lambda: optax.rmsprop(learning_rate, momentum=momentum),
    }
    if name not in base:
        raise UserError(f"unknown optim.name {name!r}")
    if not decay:
        return base[name]()
    # Coupled (L2-style) decay for optimizers without a decoupled variant.
    return optax.chain(optax.add_decayed_weights(weight_decay), base[name]())


def build_optimizer(optim: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformationExtraArgs:
    """The optimizer `optim` names; its update accepts `value=loss` (for reduce-on-plateau)."""
    shape = _schedule_shape(optim.schedule, steps, optim.warmup_steps)

    def make(learning_rate, weight_decay):
        schedule = lambda count: learning_rate * shape(count)
        # With no decay configured the decay term is left out of the graph (it costs a pass over
        # the parameters each step); a sweep over weight decay configures one.
        return _base_optimizer(optim.name, schedule, weight_decay, optim.momentum,
                               decay=optim.weight_decay > 0)

    parts = []
    if optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    parts.append(optax.inject_hyperparams(make)(
        learning_rate=float(optim.lr), weight_decay=float(optim.weight_decay)))
    if optim.schedule == "reduce_on_plateau":
        parts.append(optax.contrib.reduce_on_plateau(
            factor=optim.plateau_factor, patience=optim.plateau_patience))
    return optax.with_extra_args_support(optax.chain(*parts))
