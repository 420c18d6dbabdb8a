"""scikit-optimize's `Optimizer` (a GP with gp_hedge, or a forest) as an Optuna sampler.

optuna-integration 5 no longer ships a scikit-optimize sampler, so this bridge is ours; a sweep
names it (`skopt_gp`, `skopt_forest`) beside Optuna's own samplers and can swap it for any of them.
It keeps no state between asks: each ask rebuilds the optimizer from the study, seeded by the
sampler's seed and the number of finished trials, so a resumed study, a second worker or a rerun
with the same history asks the same points.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.search_space import intersection_search_space
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from skopt import Optimizer
from skopt.space import Categorical, Integer, Real
from threadpoolctl import threadpool_limits

from jaxopt_lab.errors import UserError

ESTIMATORS = ("GP", "RF", "ET", "GBRT")
# A trial's asked point, stored when it is asked: a running trial that has not suggested all its
# params yet (a batch asked before any suggests) still counts as a lie for the next asks.
POINT_ATTR = "skopt:params"


def _stepped(dist: BaseDistribution) -> bool:
    """Ints without log and floats with a step are searched as the index of their grid point."""
    if isinstance(dist, IntDistribution):
        return not dist.log  # Optuna allows log only with step 1
    return isinstance(dist, FloatDistribution) and dist.step is not None


def _dimension(dist: BaseDistribution) -> Categorical | Integer | Real:
    if isinstance(dist, CategoricalDistribution):  # indices: choices may be None, bools, mixed
        return Categorical(list(range(len(dist.choices))))
    if _stepped(dist):
        return Integer(0, round((dist.high - dist.low) / dist.step))
    kind = Integer if isinstance(dist, IntDistribution) else Real
    return kind(dist.low, dist.high, prior="log-uniform" if dist.log else "uniform")


def _to_point(dist: BaseDistribution, value: Any) -> int | float:
    if isinstance(dist, CategoricalDistribution):
        return int(dist.to_internal_repr(value))
    if _stepped(dist):
        return round((value - dist.low) / dist.step)
    return int(value) if isinstance(dist, IntDistribution) else float(value)


def _from_point(dist: BaseDistribution, x: Any) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[int(x)]
    if _stepped(dist):
        value = dist.low + int(x) * dist.step
        return int(value) if isinstance(dist, IntDistribution) else min(float(value), dist.high)
    return int(x) if isinstance(dist, IntDistribution) else float(x)


def _seed(*keys: int) -> int:
    """A 32-bit seed from several keys, without the collisions of adding them."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _observed_value(trial: FrozenTrial) -> float | None:
    """A complete trial's value; a pruned one's last intermediate value.

    Pruned trials count, at the (pessimistic) value they had when stopped: the pruner judged that
    region poor, and leaving them out would have the model propose it again.
    """
    if trial.state == TrialState.COMPLETE:
        value = trial.value
    elif trial.intermediate_values:
        value = trial.intermediate_values[max(trial.intermediate_values)]
    else:
        return None
    return value if value is not None and math.isfinite(value) else None


class SkoptSampler(optuna.samplers.BaseSampler):
    """`skopt.Optimizer` over the params every finished trial has; the rest sampled independently.

    Until `n_initial_points` trials have finished, every param is drawn by the independent
    sampler. Trials still running when a new one is asked are told to the optimizer with the
    best value seen (constant liar, skopt's "cl_min"), so a batch of k asks is skopt's
    `ask(n_points=k, strategy="cl_min")` and never repeats a point.
    """

    def __init__(self, base_estimator: str = "GP", *, seed: int = 0, n_initial_points: int = 10,
                 acq_func: str = "gp_hedge",
                 independent_sampler: optuna.samplers.BaseSampler | None = None) -> None:
        if str(base_estimator).upper() not in ESTIMATORS:
            raise UserError(f"skopt base_estimator {base_estimator!r}: allowed "
                            f"{', '.join(ESTIMATORS)}")
        if n_initial_points < 1:
            raise UserError(f"skopt n_initial_points={n_initial_points}: must be at least 1")
        if seed < 0:
            raise UserError(f"skopt seed={seed}: must be non-negative")
        self._estimator = str(base_estimator).upper()
        self._seed = int(seed)
        self._n_initial = int(n_initial_points)
        self._acq_func = acq_func
        # None: a RandomSampler seeded per trial and param (see sample_independent)
        self._independent = independent_sampler

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if len(study.directions) > 1:
            raise UserError("the scikit-optimize sampler optimizes one objective; for several "
                            "sweep.objectives use sweep.sampler='nsga2'")
        space = intersection_search_space(study.get_trials(deepcopy=False), include_pruned=True)
        return {name: dist for name, dist in space.items() if not dist.single()}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        names, dists = list(search_space), list(search_space.values())
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0  # skopt minimizes
        xs, ys, running = [], [], []
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        for other in study.get_trials(deepcopy=False, states=states):
            params = {**other.system_attrs.get(POINT_ATTR, {}), **other.params}
            if other.number == trial.number or any(
                    n not in params or other.distributions.get(n, d) != d
                    for n, d in zip(names, dists)):
                continue
            x = [_to_point(d, params[n]) for n, d in zip(names, dists)]
            if other.state == TrialState.RUNNING:
                running.append(x)
            elif (value := _observed_value(other)) is not None:
                xs.append(x)
                ys.append(sign * value)
        if len(xs) < self._n_initial:
            return {}
        opt = Optimizer([_dimension(d) for d in dists], base_estimator=self._estimator,
                        n_initial_points=self._n_initial, acq_func=self._acq_func,
                        random_state=_seed(self._seed, len(xs)))
        opt.tell(xs, ys, fit=False)
        # The model's matrices are trials x trials: BLAS threads cost more than they save (3x
        # slower asks measured on a busy 2-core CPU).
        with threadpool_limits(limits=1):
            # The steps of skopt's own batch ask: a copy seeded from the optimizer's stream is
            # fitted, then told each running point with the lie; its next point is this trial's.
            batch = opt.copy(random_state=opt.rng.randint(0, np.iinfo(np.int32).max))
            for x in running:
                batch.tell(x, min(ys))
            point = batch.ask()
        params = {n: _from_point(d, v) for n, d, v in zip(names, dists, point)}
        study._storage.set_trial_system_attr(trial._trial_id, POINT_ATTR, params)
        return params

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        """By default a random draw keyed by (seed, trial number, param name).

        One RandomSampler's stream depends on how many draws this process made before, so a
        resumed study or a second worker would draw other values; keyed per trial, they don't.
        """
        sampler = self._independent or optuna.samplers.RandomSampler(
            seed=_seed(self._seed, trial.number, zlib.crc32(param_name.encode())))
        return sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self._independent is not None:
            self._independent.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        if self._independent is not None:
            self._independent.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self._independent is not None:
            self._independent.reseed_rng()
