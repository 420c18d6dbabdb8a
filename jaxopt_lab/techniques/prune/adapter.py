"""Pruning in a composed experiment: the `techniques.prune` block and its adapter.

The block is `PruneOptions` with two differences the config path needs: `method` defaults to
"none", the off switch, and `end_step` to -1, "three quarters of train.steps" (a number the
options cannot know without the run).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxopt_lab.techniques.contract import Parts, Technique
from jaxopt_lab.techniques.prune import resolve_skip, sparsity_metrics, sparsity_summary, wrap
from jaxopt_lab.techniques.prune.options import PruneOptions, prune_options

OFF = "none"
RUN_END = -1  # end_step: resolved to three quarters of train.steps


def check(config: ml_collections.ConfigDict) -> PruneOptions | None:
    """The block's options (checked; end_step -1 resolved), or None where pruning is off."""
    block = TECHNIQUE.block(config)
    if block["method"] == OFF:
        return None
    if block["end_step"] == RUN_END:
        block["end_step"] = config.train.steps * 3 // 4
    return prune_options(**block)


def apply(parts: Parts, options: PruneOptions) -> Parts:
    """Masks at the update seam. The default skip is read from the float model: AQT's injected
    ops hide the layer order it is traced from."""
    skip = resolve_skip(options, parts.float_model, parts.sample_x)
    tx = wrap(parts.tx, model=parts.model, sample_x=parts.sample_x, seed=parts.config.seed,
              **{**dataclasses.asdict(options), "skip": skip})
    return dataclasses.replace(
        parts, tx=tx,
        record={**parts.record, "prune": {**options.describe(), "skip": list(skip)}},
        state_metrics=(*parts.state_metrics, sparsity_metrics),
        state_summary=(*parts.state_summary, sparsity_summary))


TECHNIQUE = Technique(name="prune", options=PruneOptions, check=check, apply=apply,
                      config_defaults={"method": OFF, "end_step": RUN_END},
                      injected={"techniques.prune.sparsity": "sparsity"})
