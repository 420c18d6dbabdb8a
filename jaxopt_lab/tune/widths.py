"""Width NAS in a sweep (`sweep.widths`): the search space is one width per channel group of
the config's model, which is the widest a trial can be, each from `sweep.widths`; a batch of
asked trials trains as one width-masked population of that model (`workflows.nas`), so trials of
different widths share one program, and each trial's size and costs are its narrow model's.

A dimension is named by the width key entry it sets, e.g. "model.channels[1]" for the CNN's
second conv: a trial is retrained alone with those entries as `--config.model.channels=(...)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import optuna

from jaxopt_lab.compose.experiment import model_kwargs
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import build_model, width_keys
from jaxopt_lab.models.channels import ChannelModel
from jaxopt_lab.tune.space import Dimension, categorical
from jaxopt_lab.workflows.nas import train_widths, width_config


def width_dims(config: ml_collections.ConfigDict) -> list[Dimension]:
    """One categorical dimension over `sweep.widths` per channel group of the config's model,
    in the order `workflows.nas` indexes widths by. Nothing is initialised: the model says its
    groups and their widths itself (`models.channels.ChannelModel`).

    Raises:
      UserError: one line naming the culprit (the model, a width, the space, pruning).
    """
    name, choices = config.model.name, tuple(config.sweep.widths)
    if config.sweep.space:
        raise UserError("sweep.widths makes the search space (one width per channel group of "
                        "the model); leave sweep.space empty")
    if not choices or len(set(choices)) != len(choices) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in choices):
        raise UserError(f"sweep.widths={choices!r} must be distinct ints >= 1, e.g. "
                        "(8, 16, 32, 64)")
    if not width_keys(name):
        raise UserError(f"sweep.widths: model {name!r} has no width keys (WIDTH_KEYS) to search")
    model = build_model(name, 1, **model_kwargs(config))
    refusal = getattr(type(model), "CHANNEL_PRUNING_REFUSED", None)
    if refusal or not isinstance(model, ChannelModel):
        raise UserError(f"sweep.widths: model {name!r} cannot be width-masked: "
                        + (refusal or "it does not describe its channel groups "
                                      "(models.channels.ChannelModel)"))
    width_config(config, [()], [config.seed])  # refuses pruning on, or a population
    sizes = model.layer_widths()
    dims = []
    for wired in model.channel_wiring():
        key, entries = wired.width
        size = sizes[key][entries[0]]
        if max(choices) > size:
            raise UserError(f"sweep.widths has {max(choices)}, wider than {wired.group.name} "
                            f"of the config's model ({size}), the widest a trial can be: widen "
                            f"model.{key} or drop the width")
        dims.append(categorical(f"model.{key}[{','.join(map(str, entries))}]", choices))
    return dims


def train_job(base: ml_collections.ConfigDict, trials: Sequence[optuna.Trial], run_dir: str,
              stop_members=None) -> dict:
    """Trains `trials` as one width-masked population of the base config's model in `run_dir`
    (resuming it), member i at trial i's widths, every member from the config's seed (as its
    narrow model trained alone would start). Returns the summary, each member with its narrow
    model's size and, with train.measure, costs (`workflows.nas.train_widths`)."""
    keys = [key for key, *_ in width_dims(base)]
    widths = [tuple(int(t.params[key]) for key in keys) for t in trials]
    config = width_config(base, widths, [base.seed] * len(widths))
    config.train.progress = False
    return train_widths(config, widths, run_dir, stop_members=stop_members)
