"""Pruning in a composed experiment: the `techniques.prune` block and its adapter.

The block is `PruneOptions` with two differences the config path needs: `method` defaults to
"none", the off switch, and `end_step` to -1, "three quarters of train.steps" (a number the
options cannot know without the run).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxopt_lab.techniques.contract import Parts, Technique
from jaxopt_lab.techniques.prune import (
    pruning_record,
    resolve_skip,
    sparsity_metrics,
    sparsity_summary,
    wrap,
)
from jaxopt_lab.techniques.prune.options import PruneOptions, prune_options

OFF = "none"
RUN_END = -1  # end_step: resolved to three quarters of train.steps


def check(config: ml_collections.ConfigDict) -> PruneOptions | None:
    """The block's options (checked; end_step -1 resolved), or None where pruning is off.

    Every key is checked whether or not pruning is on, as quantize's are (`sparsity=1.5` used
    to pass while the method was "none", `bits=3` did not): a block switched off is checked as
    the options' default method would use it. Off, the gradual schedule's "end after begin" is
    moot, so an end_step of -1 resolves past begin_step there.
    """
    block = TECHNIQUE.block(config)
    on = block["method"] != OFF
    if not on:
        block["method"] = PruneOptions.method
    if block["end_step"] == RUN_END:
        block["end_step"] = config.train.steps * 3 // 4
        begin = block["begin_step"]
        if not on and isinstance(begin, int) and not isinstance(begin, bool):
            block["end_step"] = max(block["end_step"], begin + 1)
    options = prune_options(**block)
    return options if on else None


def apply(parts: Parts, options: PruneOptions) -> Parts:
    """Masks at the update seam. The default skip is read from the float model: AQT's injected
    ops hide the layer order it is traced from."""
    skip = resolve_skip(options, parts.float_model, parts.sample_x)
    return _pruned(parts, wrap(parts.tx, model=parts.model, sample_x=parts.sample_x,
                               seed=parts.config.seed,
                               **{**dataclasses.asdict(options), "skip": skip}))


def recognise(parts: Parts) -> Parts | None:
    """An optimizer the caller passed through `prune.wrap`."""
    return _pruned(parts, parts.tx) if pruning_record(parts.tx) is not None else None


def _pruned(parts: Parts, tx) -> Parts:
    return dataclasses.replace(
        parts, tx=tx, record={**parts.record, "prune": pruning_record(tx)},
        state_metrics=(*parts.state_metrics, sparsity_metrics),
        state_summary=(*parts.state_summary, sparsity_summary))


TECHNIQUE = Technique(name="prune", options=PruneOptions, check=check, apply=apply,
                      seam="update", recognise=recognise,
                      config_defaults={"method": OFF, "end_step": RUN_END},
                      injected={"techniques.prune.sparsity": "sparsity"})
