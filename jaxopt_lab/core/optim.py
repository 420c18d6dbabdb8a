"""The update seam's default: an optax optimizer and learning-rate schedule chosen from config.

Every value a population may vary is an injected hyperparameter (`optax.inject_hyperparams`):
the learning rate, weight decay, momentum (Adam's b1) and the warmup length. They live in the
optimizer state, so a vectorized population gives each member its own values by writing them into
the stacked state, and checkpoints carry them. `INJECTED` maps their config keys to their names.
"""

from __future__ import annotations

from collections.abc import Collection

import jax.numpy as jnp
import ml_collections
import optax

from jaxopt_lab.errors import UserError

INJECTED = {"optim.lr": "learning_rate", "optim.weight_decay": "weight_decay",
            "optim.momentum": "momentum", "optim.warmup_steps": "warmup_steps"}


def _schedule_shape(name: str, steps: int, warmup):
    """A multiplier of the peak learning rate as a function of the step count.

    `warmup` may be a traced value (it is injected), so the warmup-cosine shape is written with
    jnp rather than optax's join of schedules, whose boundary must be a Python number.
    """
    if name in ("constant", "reduce_on_plateau"):
        return optax.constant_schedule(1.0)
    if name == "cosine":
        return optax.cosine_decay_schedule(1.0, decay_steps=steps)
    if name == "warmup_cosine":
        def warmup_cosine(count):
            length = jnp.maximum(warmup, 1.0)
            progress = jnp.clip((count - length) / jnp.maximum(steps - length, 1.0), 0.0, 1.0)
            return jnp.where(count < length, count / length,
                             0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return warmup_cosine
    if name == "one_cycle":
        return optax.cosine_onecycle_schedule(transition_steps=steps, peak_value=1.0)
    raise UserError(f"unknown optim.schedule {name!r}")


def _base_optimizer(name: str, learning_rate, weight_decay, momentum, decay: bool):
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


def build_optimizer(optim: ml_collections.ConfigDict, steps: int,
                    swept: Collection[str] = ()) -> optax.GradientTransformationExtraArgs:
    """The optimizer `optim` names; its update accepts `value=loss` (for reduce-on-plateau).

    `swept` are the config keys a population varies: a swept weight decay stays in the graph even
    where this config's is 0 (otherwise the decay term is left out, saving a pass over the
    parameters each step).
    """
    decay = optim.weight_decay > 0 or "optim.weight_decay" in swept

    def make(learning_rate, weight_decay, momentum, warmup_steps):
        shape = _schedule_shape(optim.schedule, steps, warmup_steps)
        schedule = lambda count: learning_rate * shape(count)
        return _base_optimizer(optim.name, schedule, weight_decay, momentum, decay=decay)

    parts = []
    if optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    parts.append(optax.inject_hyperparams(make)(
        learning_rate=float(optim.lr), weight_decay=float(optim.weight_decay),
        momentum=float(optim.momentum), warmup_steps=float(optim.warmup_steps)))
    if optim.schedule == "reduce_on_plateau":
        parts.append(optax.contrib.reduce_on_plateau(
            factor=optim.plateau_factor, patience=optim.plateau_patience))
    return optax.with_extra_args_support(optax.chain(*parts))


def check_swept(optim: ml_collections.ConfigDict, keys: Collection[str]) -> None:
    """A swept optimizer value the configured optimizer or schedule ignores is a config error:
    the population would silently train its members alike."""
    if "optim.momentum" in keys and optim.name == "sgd":
        raise UserError("population varies optim.momentum, but optim.name='sgd' has none; "
                        "use momentum, nesterov, adam, adamw, rmsprop or lamb")
    if "optim.warmup_steps" in keys and optim.schedule != "warmup_cosine":
        raise UserError(f"population varies optim.warmup_steps, but optim.schedule="
                        f"'{optim.schedule}' has no warmup; use warmup_cosine")
