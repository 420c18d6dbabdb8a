"""jaxopt_lab: profile, tune, compress and train JAX/Flax models, every technique a pure function.

The public entry points, importable from here whatever module holds them:

    from jaxopt_lab import load_config, train_and_evaluate, load_run, evaluate_run
    from jaxopt_lab import default_config, model_config, build_experiment, prepare_dataset
    from jaxopt_lab import prune, quantize, distill, compress      # the technique packages

They are loaded on first use (PEP 562), so `jaxopt-lab --help` and a bad command line answer
without importing JAX.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "train_and_evaluate": "jaxopt_lab.workflows.train",
    "load_run": "jaxopt_lab.run.build",
    "evaluate_run": "jaxopt_lab.run.build",
    "build_run": "jaxopt_lab.run.build",
    "build_experiment": "jaxopt_lab.run.build",
    "Run": "jaxopt_lab.run.build",
    "load_config": "jaxopt_lab.compose.config",
    "default_config": "jaxopt_lab.compose.config",
    "model_config": "jaxopt_lab.compose.config",
    "validate": "jaxopt_lab.compose.config",
    "prepare_dataset": "jaxopt_lab.compose.experiment",
    "Experiment": "jaxopt_lab.compose.experiment",
    "TECHNIQUES": "jaxopt_lab.compose.techniques",
    "UserError": "jaxopt_lab.errors",
    "choose": "jaxopt_lab.selection",
}
_PACKAGES = {name: f"jaxopt_lab.techniques.{name}"
             for name in ("prune", "quantize", "distill", "compress")}

__all__ = [
    "TECHNIQUES",
    "Experiment",
    "Run",
    "UserError",
    "build_experiment",
    "build_run",
    "choose",
    "compress",
    "default_config",
    "distill",
    "evaluate_run",
    "load_config",
    "load_run",
    "model_config",
    "prepare_dataset",
    "prune",
    "quantize",
    "train_and_evaluate",
    "validate",
]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in _PACKAGES:
        return importlib.import_module(_PACKAGES[name])
    raise AttributeError(f"module 'jaxopt_lab' has no attribute {name!r}")


def __dir__():
    return __all__
