"""The scikit-optimize bridge on pure Optuna studies with analytic objectives (no training)."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState
from skopt import Optimizer
from skopt.space import Categorical, Integer, Real
from threadpoolctl import threadpool_limits

from jaxopt_lab.errors import UserError
from jaxopt_lab.tune.skopt_sampler import POINT_ATTR, SkoptSampler, _seed

optuna.logging.set_verbosity(optuna.logging.WARNING)
CHOICES = ["a", "b", "warmup"]


def suggest(trial: optuna.Trial, name: str):
    """The test space: a log-uniform float, a stepped int, a categorical and a plain float."""
    if name == "lr":
        return trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    if name == "n":
        return trial.suggest_int("n", 1, 9, step=2)
    if name == "c":
        return trial.suggest_categorical("c", CHOICES)
    return trial.suggest_float("x", -2.0, 2.0)


def quadratic(trial: optuna.Trial, conditional: bool = True) -> float:
    """Best at lr=1e-2, n=5, c="b", x=0.5; "w" exists only where c == "warmup" (conditional)."""
    p = {name: suggest(trial, name) for name in ("lr", "n", "c", "x")}
    penalty = {"a": 0.5, "b": 0.0}.get(p["c"], 0.25)
    if p["c"] == "warmup" and conditional:
        penalty += abs(trial.suggest_int("w", 0, 100) - 50) / 100
    return ((math.log10(p["lr"]) + 2) ** 2 + (p["n"] - 5) ** 2 / 10 + (p["x"] - 0.5) ** 2
            + penalty)


def params(study: optuna.Study) -> list[dict]:
    return [t.params for t in study.trials]


def test_same_seed_same_asks_also_when_resumed_and_another_seed_differs():
    first = optuna.create_study(sampler=SkoptSampler(seed=0, n_initial_points=5))
    first.optimize(quadratic, n_trials=10)
    # the model asked trials 5..9, over the params every trial has ("w" is conditional)
    assert [POINT_ATTR in t.system_attrs for t in first.trials] == [False] * 5 + [True] * 5
    assert set(first.trials[-1].system_attrs[POINT_ATTR]) == {"c", "lr", "n", "x"}
    assert any("w" in p for p in params(first))

    storage = optuna.storages.InMemoryStorage()
    resumed = optuna.create_study(storage=storage, study_name="s",
                                  sampler=SkoptSampler(seed=0, n_initial_points=5))
    resumed.optimize(quadratic, n_trials=7)
    resumed = optuna.load_study(storage=storage, study_name="s",
                                sampler=SkoptSampler(seed=0, n_initial_points=5))
    resumed.optimize(quadratic, n_trials=3)
    assert params(resumed) == params(first)

    other = optuna.create_study(sampler=SkoptSampler(seed=1, n_initial_points=5))
    other.optimize(quadratic, n_trials=10)
    assert params(other)[0] != params(first)[0] and params(other)[-1] != params(first)[-1]


def test_batch_of_running_trials_is_skopts_own_batch_ask():
    names = ("c", "lr", "n", "x")  # the order of the search space: sorted names
    study = optuna.create_study(direction="maximize", sampler=SkoptSampler(seed=3,
                                                                           n_initial_points=4))
    study.optimize(lambda t: -quadratic(t, conditional=False), n_trials=4)
    batch = [study.ask() for _ in range(4)]
    for name in names:  # interleaved: trial 1 is asked while trial 0 has one param stored
        for trial in batch:
            suggest(trial, name)
    asked = [tuple(t.params[n] for n in names) for t in batch]
    assert len(set(asked)) == 4

    ref = Optimizer([Categorical([0, 1, 2]), Real(1e-4, 1e-1, prior="log-uniform"),
                     Integer(0, 4), Real(-2.0, 2.0)], base_estimator="GP", n_initial_points=4,
                    acq_func="gp_hedge", random_state=_seed(3, 4))
    done = study.get_trials(states=(TrialState.COMPLETE,))
    ref.tell([[CHOICES.index(t.params["c"]), t.params["lr"], (t.params["n"] - 1) // 2,
               t.params["x"]] for t in done], [-t.value for t in done], fit=False)
    with threadpool_limits(limits=1):  # as the sampler does, or it runs 3x slower
        ref_batch = ref.ask(n_points=4, strategy="cl_min")
    expected = [(CHOICES[c], lr, 1 + 2 * k, x) for c, lr, k, x in ref_batch]
    assert asked == [pytest.approx(e) for e in expected]


def test_maximize_concentrates_near_the_maximum():
    study = optuna.create_study(direction="maximize",
                                sampler=SkoptSampler(seed=0, n_initial_points=5))
    study.optimize(lambda t: -(t.suggest_float("x", -1.0, 1.0) - 0.3) ** 2, n_trials=9)
    model_asks = [t.params["x"] for t in study.trials[5:]]
    # the initial random points are 0.65 from it on average; a sign error would send asks to -1
    assert max(abs(x - 0.3) for x in model_asks) < 0.5, model_asks
    assert sum(abs(x - 0.3) for x in model_asks) / len(model_asks) < 0.2, model_asks


def test_forest_uses_pruned_trials_and_keeps_steps_on_the_grid():
    study = optuna.create_study(sampler=SkoptSampler("ET", seed=0, n_initial_points=4))
    for i in range(4):  # pruned trials count at their last intermediate value
        trial = study.ask()
        suggest(trial, "n"), suggest(trial, "x")
        trial.report(float(i), step=1)
        study.tell(trial, state=TrialState.PRUNED)
    study.optimize(lambda t: (suggest(t, "n") - 5) ** 2 + suggest(t, "x") ** 2, n_trials=3)
    assert all(POINT_ATTR in t.system_attrs for t in study.trials[4:])
    assert {t.params["n"] for t in study.trials} <= {1, 3, 5, 7, 9}


def test_multi_objective_and_bad_arguments_are_user_errors():
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=SkoptSampler())
    with pytest.raises(UserError, match="nsga2"):
        study.ask().suggest_float("x", 0.0, 1.0)
    with pytest.raises(UserError, match="base_estimator 'SVM'"):
        SkoptSampler("SVM")
    with pytest.raises(UserError, match="n_initial_points=0"):
        SkoptSampler(n_initial_points=0)
