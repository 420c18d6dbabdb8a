"""What every technique hands the composer: its config block, its checks and one adapter.

A technique is a value, `Technique(name, options, ...)`, that its package defines once
(`techniques/<name>/adapter.py`); the composer (`jaxopt_lab/compose/`) is given an ordered
tuple of them, in seam order, and knows nothing else about any of them. Nothing registers at
import: a new technique is a new package plus one entry in that tuple (or a tuple of your own,
`build_experiment(..., techniques=TECHNIQUES + (mine,))`).

    options:  a frozen dataclass; its fields and defaults ARE the config block
              `techniques.<name>` (written once). Where the config path must differ from the
              Python API (an off switch `method="none"`, `end_step=-1` meaning "the run's
              steps", a key the config leaves out), `config_defaults`, `config_only` and
              `python_only` declare the difference.
    check:    (config) -> options or None (off): every key of the block checked before anything
              compiles; a bad value is a UserError naming `techniques.<name>.<key>`.
    apply:    (Parts, options) -> Parts: the technique applied at its seam to the experiment's
              parts (model, loss, tx, reducer, data), with what it reports (its summary.json
              record, state metrics and summaries).
    seam:     model | loss | update | communication. A model-seam technique makes a caller's
              loss that applies its own module (no `apply_fn`) a one-line refusal.
    recognise: (Parts) -> Parts or None: the technique already applied by the caller from
              Python (a `quantize.wrap`ped model, a `prune.wrap`ped optimizer, a
              `distill.wrap`ped loss, a compressing reducer), recorded as if the config had
              applied it; the config may not apply it a second time.
    prepare_data: (config, Dataset) -> Dataset, for a technique that adds training data
              (distillation's transfer set), before anything is built.
Each option field carries its comment in the options class: that is the schema's documentation.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import ml_collections
import optax

from jaxopt_lab.core.step import Reducer
from jaxopt_lab.core.tasks import Augment, EvalFn, LossFn, make_task
from jaxopt_lab.data.sources import Dataset
from jaxopt_lab.errors import UserError

StateFn = Callable[[Any], dict]  # TrainState -> {name: value}


@dataclasses.dataclass(frozen=True)
class Parts:
    """The experiment as the composer hands it from one technique to the next.

    Each adapter returns `dataclasses.replace(parts, ...)` with what it changed; the composer
    turns the last one into an `Experiment`.
    """

    config: ml_collections.ConfigDict
    dataset: Dataset
    model: nn.Module  # the model seam, with the techniques applied so far
    float_model: nn.Module  # before any technique: what layer order and default skips read
    loss_fn: LossFn | None  # a loss-seam technique's loss; None: the caller's or the task's
    user_loss: LossFn | None  # the caller's own loss, as they passed it
    augment: Augment | None  # the on-device augmentation the task's loss applies
    eval_fn: EvalFn | None
    tx: optax.GradientTransformationExtraArgs
    reducer: Reducer | None  # None: the exact all-reduce (or the sharded one)
    caller_reducer: bool  # the caller passed a reducer of their own
    sample_x: Any  # one batch of inputs, for tracing
    hparams: dict[str, float] = dataclasses.field(default_factory=dict)
    state_metrics: tuple[StateFn, ...] = ()  # step metrics counted from the new state
    state_summary: tuple[StateFn, ...] = ()  # summary.json fields counted from the final state
    record: dict[str, dict] = dataclasses.field(default_factory=dict)  # summary.json techniques
    extra_params: Callable[[Any], dict] | None = None  # key -> params trained beside the model's
    train_data: Callable[[Dataset], Dataset] | None = None  # applied to the data before training
    load_run: Callable[..., Any] | None = None  # (directory, **objects) -> a run (load_run)
    model_changed_by: tuple[str, ...] = ()  # the techniques that changed the model seam

    @property
    def own_loss(self) -> bool:
        """The caller passed a loss: the task's loss cannot be rebuilt around it."""
        return self.user_loss is not None

    def task_loss(self, capture: Sequence[str] = ()) -> LossFn:
        """The data set's task's loss on the model as composed so far (`capture`: module paths
        whose outputs it returns in aux["intermediates"])."""
        return make_task(self.dataset.task, self.model, self.augment, capture).loss_fn

    def loss(self) -> LossFn:
        """The loss as composed so far: a wrapper's, else the caller's (handed the composed
        model's `apply` where it takes `apply_fn`), else the task's on the composed model.

        Raises:
          UserError: the caller's loss applies a model of its own while a technique changed the
            model seam: it would train without that technique.
        """
        if self.loss_fn is not None:
            return self.loss_fn
        if self.user_loss is None:
            return self.task_loss()
        if takes_apply_fn(self.user_loss):
            return functools.partial(self.user_loss, apply_fn=self.model.apply)
        if self.model_changed_by:
            names = ", ".join(f"techniques.{n}" for n in self.model_changed_by)
            raise UserError(f"{names} changed the model, but loss_fn "
                            f"{getattr(self.user_loss, '__name__', 'yours')!r} applies a model "
                            "of its own: give it an `apply_fn` keyword (the composed model's "
                            "apply) and call that, or leave the loss to the data set's task")
        return self.user_loss


def takes_apply_fn(loss_fn: Callable) -> bool:
    """Whether a loss still takes the `apply_fn` keyword, the composed model's `apply` (one
    already handed it, a `functools.partial`, does not)."""
    if isinstance(loss_fn, functools.partial) and "apply_fn" in loss_fn.keywords:
        return False
    try:
        parameters = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):  # no signature to inspect: a builtin or C callable
        return False
    return "apply_fn" in parameters


@dataclasses.dataclass(frozen=True)
class Technique:
    """One technique as the composer sees it (see the module docstring)."""

    name: str
    options: type  # a frozen dataclass
    check: Callable[[ml_collections.ConfigDict], Any]
    apply: Callable[[Parts, Any], Parts]
    seam: str  # model | loss | update | communication: where it applies
    config_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config_only: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # keys first
    python_only: tuple[str, ...] = ()  # option fields the config block leaves out
    # per-trial values it keeps in its optimizer state, under a `hyperparams` dict as
    # optax.inject_hyperparams does (config key -> name there): a population may vary them
    injected: Mapping[str, str] = dataclasses.field(default_factory=dict)
    prepare_data: Callable[[ml_collections.ConfigDict, Dataset], Dataset] | None = None
    # the technique applied by the caller from Python (a wrapped model, loss, optimizer or
    # reducer passed in): parts with its record and reports, else None
    recognise: Callable[[Parts], Parts | None] | None = None

    def defaults(self) -> dict[str, Any]:
        """The block's keys and defaults, in order: the config-only keys, then the options'
        fields with the declared config differences."""
        values = dict(self.config_only)
        for field in dataclasses.fields(self.options):
            if field.name not in self.python_only:
                values[field.name] = self.config_defaults.get(field.name, field.default)
        return values

    def config_block(self) -> ml_collections.ConfigDict:
        """`techniques.<name>`: every key with its default; a None default is a placeholder of
        the field's type, so a config may set it."""
        block = ml_collections.ConfigDict()
        hints = typing.get_type_hints(self.options)
        for key, value in self.defaults().items():
            if value is None:
                block[key] = ml_collections.config_dict.placeholder(_base_type(hints[key]))
            else:
                block[key] = value
        return block

    def block(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """This technique's block of `config` as a dict (tuples kept as tuples)."""
        return {k: tuple(v) if isinstance(v, list) else v
                for k, v in config.techniques[self.name].items()}


def _base_type(hint: Any) -> type:
    """`tuple` for `tuple[str, ...] | None`, `bool` for `bool | None`: what a placeholder holds."""
    for arg in typing.get_args(hint) or (hint,):
        origin = typing.get_origin(arg) or arg
        if origin is not type(None):
            return origin
    raise TypeError(f"no type in {hint!r}")
