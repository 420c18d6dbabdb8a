"""`jaxopt-lab shrink --workdir RUN`: a channel-pruned run's smaller dense model, as a run of its own.

RUN/shrunk/ is a run directory like any other: config.json (the model at its new per-layer widths,
pruning off), run.json, a checkpoint at step 0 that `load_run`, `jaxopt-lab eval` and `optimize`
read, and summary.json with the shrunk and the original model's size, FLOPs, latency and test
metrics side by side. It also holds config.py, the same config as a file `train` takes, so that
fine-tuning is an ordinary training run resumed from that checkpoint (a fresh optimizer, the
original's recipe over `train.steps`):

    jaxopt-lab train --config RUN/shrunk/config.py --workdir RUN/shrunk --config.train.steps=N

or, with a learning rate or anything else of its own, a new run from its weights:
`--workdir NEW --config.train.init_from=RUN/shrunk`.
"""

from __future__ import annotations

import json
import os
import pprint

import jax
import ml_collections
import numpy as np

from jaxopt_lab.compose import model_config
from jaxopt_lab.core.checkpoint import Checkpointer
from jaxopt_lab.core.keys import keep_type, set_key
from jaxopt_lab.core.measure import measure_model
from jaxopt_lab.core.state import model_params, sample_input
from jaxopt_lab.core.tasks import inference
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import model_hparams
from jaxopt_lab.run.build import build_run, evaluate_splits, load_run, member_state
from jaxopt_lab.run.rundir import prepare_workdir
from jaxopt_lab.techniques.prune.groups import wiring
from jaxopt_lab.techniques.prune.shrink import shrink

_CONFIG_PY = '''"""The config of the run {source} shrunk by `jaxopt-lab shrink`; fine-tune with

    jaxopt-lab train --config {config_py} --workdir {workdir} --config.train.steps=N
"""

import ml_collections

from jaxopt_lab import default_config

CONFIG = {literal}


def get_config():
    # On default_config(), so that keys it leaves unset (None) keep their type and take
    # --config overrides, e.g. --config.train.init_from=RUN.
    config = default_config()
    config.model = ml_collections.ConfigDict(CONFIG["model"])
    config.update({{k: v for k, v in CONFIG.items() if k != "model"}})
    return config
'''


# What a run given parts from Python passes on to its shrunk run: all but the model (the shrunk
# one is built from the config at its new widths) and the optimizer (pruning is done).
CARRIED = ("dataset", "loss_fn", "eval_fn", "hparams")


def shrink_run(workdir: str, member: int | None = None, out: str | None = None,
               **objects) -> dict:
    """Shrinks the run in `workdir` (member `member` of a population) into `out` (default
    workdir/shrunk/); returns (and writes) its summary.json. `objects` are what the run was
    trained with from Python (`load_run`'s); the shrunk run is built from its config's model at
    the new widths, with the same data set, loss, evaluation and per-trial values."""
    run = load_run(workdir, **objects)
    carried = {k: v for k, v in objects.items() if k in CARRIED}
    check_channel_pruned(run, workdir)
    state = member_state(run, member, workdir)
    original = {"params": model_params(state.params), **state.model_state}
    model, variables = shrink(run.experiment.model, original)
    values = run.members[member] if run.members else {}
    config = shrunk_config(run.config, model, values)
    out = out or os.path.join(workdir, "shrunk")
    if os.path.isdir(os.path.join(out, "checkpoints")):
        raise UserError(f"{out} already holds a run (shrunk before, perhaps fine-tuned); "
                        "remove it to shrink again")
    prepare_workdir(out, config, is_chief=True)
    _write_checkpoint(out, config, {**carried, "dataset": run.dataset}, variables)
    _write_config_py(out, config, workdir)

    shrunk = load_run(out, **carried)  # read back as `jaxopt-lab eval` will
    sample_x = sample_input(run.dataset)
    x = run.dataset.test["x"][:256]
    difference = np.abs(np.asarray(inference(run.experiment.model)(original, x))
                        - np.asarray(inference(shrunk.experiment.model)(variables, x))).max()
    before = _figures(run.experiment.model, original, sample_x, evaluate_splits(run), member)
    after = _figures(shrunk.experiment.model, variables, sample_x, evaluate_splits(shrunk), None)
    summary = {
        "shrunk_from": os.path.abspath(workdir), "from_step": run.step, "member": member,
        "model": config.model.to_dict(),
        "groups": [{"name": w.group.name, "channels": small.group.size, "of": w.group.size}
                   for w, small in zip(wiring(run.experiment.model, original["params"]),
                                       wiring(model, variables["params"]), strict=True)],
        "max_abs_output_difference": float(difference),
        **after, **{f"original_{k}": v for k, v in before.items()},
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def check_channel_pruned(run, workdir: str) -> None:
    """Only a run pruned with pattern="channels" has whole channels to cut: any other run would
    come out as an identical "shrunk" copy of itself, which says nothing was gained."""
    record = run.experiment.techniques.get("prune")
    pattern = record.get("pattern") if record else None
    if pattern != "channels":
        how = "was never pruned" if record is None else f"was pruned with pattern={pattern!r}"
        raise UserError(f"{workdir} {how}: shrink cuts the channels that pruning with "
                        "techniques.prune.pattern=channels removed; nothing to shrink here")


def shrunk_config(config: ml_collections.ConfigDict, model,
                  values: dict) -> ml_collections.ConfigDict:
    """`config` for the shrunk model: its widths, a population member's `values` fixed, one run,
    pruning off (the channels are gone; fine-tuning trains the smaller model densely)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model = model_config(config.model.name, **{k: getattr(model, k)
                                                          for k in model_hparams(config.model.name)})
        for key, value in values.items():
            set_key(config, key, value, convert=keep_type)
        config.population = ()
        if "prune" in config.techniques:
            config.techniques.prune.method = "none"
    return config


def _write_checkpoint(out: str, config, objects: dict, variables: dict) -> None:
    """The shrunk variables in a fresh TrainState of the new config, saved at step 0."""
    state = build_run(config, **objects).state
    placed = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding),
                          {"params": variables["params"],
                           "model_state": {k: v for k, v in variables.items() if k != "params"}},
                          {"params": state.params, "model_state": state.model_state})
    state = state.replace(**placed)
    checkpointer = Checkpointer(os.path.join(out, "checkpoints"), config.train.keep_checkpoints)
    try:
        checkpointer.save(0, state)
    finally:
        checkpointer.close()


def _write_config_py(out: str, config, source: str) -> None:
    config_py = os.path.join(out, "config.py")
    literal = pprint.pformat(_tuples(config.to_dict()), indent=4, sort_dicts=False)
    with open(config_py, "w") as f:
        f.write(_CONFIG_PY.format(source=source, config_py=config_py, workdir=out,
                                  literal=literal))


def _figures(model, variables: dict, sample_x, metrics: dict, member: int | None) -> dict:
    """Size, FLOPs, latency and evaluation metrics of one model."""
    host = jax.tree.map(np.asarray, variables)
    if member is not None:
        metrics = metrics["members"][member]
    return {"num_params": sum(int(np.size(a)) for a in jax.tree.leaves(host["params"])),
            **measure_model(model, host, sample_x), **metrics}


def _tuples(value):
    """A config as Python literals: lists (as JSON configs hold tuples) back to tuples."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value

