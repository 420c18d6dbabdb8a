"""The whole config schema, assembled: the core's blocks, one block per technique (generated from
its options: each default written once, in the technique), and the blocks of the drivers above
(`sweep` for tune/, `optimize` for optimize/), declared here so that one schema checks a config
file before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from jaxopt_lab.compose.techniques import TECHNIQUES
from jaxopt_lab.core.config import (
    check_names,
    check_values,
    core_config,
    fill_defaults,
    model_config,
    parse_config,
    schema_errors,
)
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.contract import Technique

__all__ = ["default_config", "load_config", "model_config", "validate"]


def default_config(techniques: Sequence[Technique] = TECHNIQUES) -> ml_collections.ConfigDict:
    """Every key a config may set, with its default (the MNIST-1D CNN of the paper)."""
    c = core_config()
    c.techniques = ml_collections.ConfigDict()
    for technique in techniques:  # each off by default
        c.techniques[technique.name] = technique.config_block()

    w = c.sweep = ml_collections.ConfigDict()  # `jaxopt-lab sweep` (tune/): an Optuna study
    w.space = ()  # dimensions built with jaxopt_lab.tune.space: log_uniform("optim.lr", ...), ...
    # Width NAS instead of a space: each channel group of the model (the widest) takes a width
    # from these, e.g. (8, 16, 32, 64); a batch of trials trains as one width-masked population
    w.widths = ()
    w.objectives = (("validation_accuracy", "maximize"),)  # (metric, direction) pairs
    w.trials = 20
    w.sampler = "tpe"  # random | grid | tpe | gp | skopt_gp | skopt_forest | nsga2
    w.pruner = "none"  # none | asha | hyperband | median (on the first objective, at evals)
    w.population = 1  # trials asked as a batch and vmapped as one program (1: one a program)
    w.workers = 1  # worker processes on this machine against the one study
    w.storage = ""  # "" = the journal file WORKDIR/study.journal; or sqlite:///..., postgresql://...
    w.seed = 0  # the sampler's
    w.startup_trials = 10  # random trials before a model-based sampler (TPE, GP, skopt) fits

    o = c.optimize = ml_collections.ConfigDict()  # `jaxopt-lab optimize` (optimize/)
    # structured | unstructured | int8 | distill | distill_structured | structured_int8 |
    # distill_structured_int8
    o.candidates = ("structured", "unstructured", "int8", "distill", "distill_structured",
                    "structured_int8", "distill_structured_int8")
    o.structured_sparsities = (0.5, 0.75)  # fractions of channels removed; one population
    o.unstructured_sparsities = (0.8, 0.9, 0.95)  # fractions of weights zeroed; one population
    o.student = ()  # "--config.KEY=VALUE" strings making the student; () = half the widths
    o.max_accuracy_drop = 1.0  # points of validation accuracy the best may lose to the baseline
    o.objective = "size_latency"  # size_latency (bytes x batch-256 latency) | latency | size
    # Where candidates are timed and their accuracy measured: xla | onnxruntime | openvino (each
    # exported to ONNX; int8 recipes then train w8a8 and calibrate static activation scales)
    o.runtime = "xla"
    return c


def check_techniques(config: ml_collections.ConfigDict,
                     techniques: Sequence[Technique] = TECHNIQUES) -> None:
    """Every technique block's values, before anything is built; a technique's own message
    ("prune sparsity=1.5 ...") is named by its config path ("techniques.prune.sparsity=1.5")."""
    for technique in techniques:
        try:
            technique.check(config)
        except UserError as e:
            message = str(e)
            if not message.startswith("techniques."):
                message = message.replace(f"{technique.name} ", f"techniques.{technique.name}.", 1)
            raise UserError(message) from None


def validate(config: ml_collections.ConfigDict, check_model: bool = True,
             techniques: Sequence[Technique] = TECHNIQUES) -> None:
    """Checks every key, type and name against the schema; fills keys a config left out.

    `check_model=False` leaves the model block unchecked, for a run rebuilt around a module the
    caller passes (its recorded import path may not import here, e.g. a notebook's class).
    """
    schema = default_config(techniques)
    for error in schema_errors(config, schema):
        raise UserError(error)
    fill_defaults(config, schema)
    check_names(config, check_model)
    check_techniques(config, techniques)
    check_values(config)


def load_config(path: str, overrides: Sequence[str] = (),
                techniques: Sequence[Technique] = TECHNIQUES) -> ml_collections.ConfigDict:
    """Loads `path`'s get_config(), applies `--config.x.y=v` overrides, validates.

    Raises:
      UserError: on a missing file, an unknown key, a wrong type or a disallowed value.
    """
    config = parse_config(path, overrides)
    validate(config, techniques=techniques)
    return config
