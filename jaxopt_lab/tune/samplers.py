"""The searchers and early stoppers a sweep names, as Optuna samplers and pruners.

Optuna's own (random, grid, TPE, GP, NSGA-II; successive halving, Hyperband, median) and the
scikit-optimize bridge (`tune/skopt_sampler.py`), all seeded so a study is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna

from jaxopt_lab.errors import UserError
from jaxopt_lab.tune.space import Dimension, grid

SAMPLERS = ("random", "grid", "tpe", "gp", "skopt_gp", "skopt_forest", "nsga2")
PRUNERS = ("none", "asha", "hyperband", "median")
SINGLE_OBJECTIVE = ("grid", "skopt_gp", "skopt_forest")  # beside every pruner


def check_names(sampler: str, pruner: str, objectives: int) -> None:
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sweep.sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise UserError(f"unknown sweep.pruner {pruner!r}; allowed: {', '.join(PRUNERS)}")
    if objectives > 1 and sampler in SINGLE_OBJECTIVE:
        raise UserError(f"sweep.sampler={sampler!r} optimizes one objective; with "
                        f"{objectives} sweep.objectives use nsga2, tpe, gp or random")
    if objectives > 1 and pruner != "none":
        raise UserError("sweep.pruner stops trials on one objective; with several "
                        "sweep.objectives set sweep.pruner='none'")


def make_sampler(name: str, seed: int, dims: Sequence[Dimension],
                 startup_trials: int = 10) -> optuna.samplers.BaseSampler:
    """`startup_trials`: random trials before a model-based sampler fits (TPE, GP, skopt)."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid(dims), seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name in ("skopt_gp", "skopt_forest"):
        from jaxopt_lab.tune.skopt_sampler import SkoptSampler

        return SkoptSampler("GP" if name == "skopt_gp" else "ET", seed=seed,
                            n_initial_points=startup_trials)
    raise UserError(f"unknown sweep.sampler {name!r}; allowed: {', '.join(SAMPLERS)}")


def make_pruner(name: str, first_eval: int, steps: int) -> optuna.pruners.BasePruner:
    """Rungs on training steps: the first at the first evaluation, the last at `steps`."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_eval,
                                                      reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first_eval, max_resource=steps,
                                              reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    raise UserError(f"unknown sweep.pruner {name!r}; allowed: {', '.join(PRUNERS)}")
