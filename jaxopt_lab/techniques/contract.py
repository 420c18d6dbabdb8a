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
    prepare_data: (config, Dataset) -> Dataset, for a technique that adds training data
              (distillation's transfer set), before anything is built.
Each option field carries its comment in the options class: that is the schema's documentation.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import ml_collections
import optax

from jaxopt_lab.core.step import Reducer
from jaxopt_lab.core.tasks import Augment, EvalFn, LossFn, make_task
from jaxopt_lab.data.sources import Dataset

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
    loss_fn: LossFn | None  # None: the data set's task's loss on the final model
    own_loss: bool  # the caller passed loss_fn (the task's loss cannot be rebuilt around it)
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
    load_run: Callable[[str], Any] | None = None  # directory -> a run (`jaxopt_lab.load_run`)

    def task_loss(self, capture: Sequence[str] = ()) -> LossFn:
        """The data set's task's loss on the model as composed so far (`capture`: module paths
        whose outputs it returns in aux["intermediates"])."""
        return make_task(self.dataset.task, self.model, self.augment, capture).loss_fn

    def loss(self) -> LossFn:
        """The loss as composed so far: the caller's or a wrapper's, else the task's."""
        return self.loss_fn if self.loss_fn is not None else self.task_loss()


@dataclasses.dataclass(frozen=True)
class Technique:
    """One technique as the composer sees it (see the module docstring)."""

    name: str
    options: type  # a frozen dataclass
    check: Callable[[ml_collections.ConfigDict], Any]
    apply: Callable[[Parts, Any], Parts]
    config_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config_only: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # keys first
    python_only: tuple[str, ...] = ()  # option fields the config block leaves out
    # per-trial values it keeps in its optimizer state, under a `hyperparams` dict as
    # optax.inject_hyperparams does (config key -> name there): a population may vary them
    injected: Mapping[str, str] = dataclasses.field(default_factory=dict)
    prepare_data: Callable[[ml_collections.ConfigDict, Dataset], Dataset] | None = None

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
