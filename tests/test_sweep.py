"""Sweeps: checked spaces, samplers and every pruner on a real (tiny) study, populations that
equal trials run alone, and the study's bookkeeping."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from jaxopt_lab import default_config, model_config, validate
from jaxopt_lab.errors import UserError
from jaxopt_lab.tune import space
from jaxopt_lab.tune.samplers import PRUNERS, SAMPLERS, make_pruner, make_sampler
from jaxopt_lab.tune.sweep import check_sweep, prepare, run_sweep

LR = space.log_uniform("optim.lr", 1e-3, 1e-1)


def tiny(**sweep) -> object:
    """A digits MLP whose trial trains in a second or two; evaluation every 10 steps."""
    c = default_config()
    c.data.name = "digits"
    c.model = model_config("mlp", hidden=(16,))
    c.train.steps, c.train.eval_every, c.train.log_every = 30, 10, 10
    c.train.checkpoint_every, c.train.steps_per_call = 30, 1
    c.train.measure = False
    c.sweep.space = (LR, space.categorical("optim.schedule", ("constant", "cosine")))
    c.sweep.trials, c.sweep.startup_trials = 3, 2
    for key, value in sweep.items():
        c.sweep[key] = value
    validate(c)
    return c


def params(study: optuna.Study) -> list[dict]:
    return [t.params for t in sorted(study.trials, key=lambda t: t.number)]


@pytest.mark.parametrize("bad, message", [
    ((space.log_uniform("optim.nope", 1e-3, 1e-1),), "'optim.nope' is not a config key"),
    ((space.uniform("optim.lr", 0.1, 0.01),), "empty range"),
    ((space.log_uniform("optim.lr", 0.0, 0.1),), "log range needs low > 0"),
    ((space.uniform("data.batch_size", 16, 64),), "holds int values"),
    ((space.categorical("optim.name", ()),), "no choices"),
    ((space.categorical("optim.schedule", ("constant", "bogus")),), "unknown optim.schedule"),
    ((space.integer("optim.warmup_steps", 1, 9, when={"optim.schedule": ("cosine",)}),),
     "not an earlier categorical"),
    ((LR, LR), "names 'optim.lr' twice"),
    ((), "sweep.space is empty"),
])
def test_bad_spaces_get_one_line(bad, message):
    config = tiny()
    config.sweep.space = bad
    with pytest.raises(UserError, match=message):
        check_sweep(config)


@pytest.mark.parametrize("change, message", [
    ({"objectives": (("test_accuracy", "maximize"),)}, "never on test"),
    ({"objectives": (("validation_accuracy", "up"),)}, "'maximize' or 'minimize'"),
    ({"objectives": (("latency_ms_batch1", "minimize"),)}, "train.measure=True"),
    ({"sampler": "skopt_gp", "objectives": (("validation_accuracy", "maximize"),
                                            ("validation_loss", "minimize"))}, "use nsga2"),
    ({"sampler": "grid"}, "needs categorical or int dimensions"),
    ({"sampler": "cmaes"}, "unknown sweep.sampler"),
    ({"pruner": "median", "objectives": (("validation_accuracy", "maximize"),
                                         ("validation_loss", "minimize"))}, "one objective"),
    ({"trials": 0}, "sweep.trials must be >= 1"),
])
def test_bad_sweep_blocks_get_one_line(change, message):
    config = tiny(**change)
    with pytest.raises(UserError, match=message):
        prepare(config, "/nonexistent-never-written")


def test_no_validation_split_is_refused():
    config = tiny()
    config.data.validation_fraction = 0.0
    with pytest.raises(UserError, match="needs a validation split"):
        check_sweep(config)


def test_bad_sweep_config_exits_2_before_any_trial(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from jaxopt_lab import default_config\n"
        "from jaxopt_lab.tune import space\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.sweep.space = (space.log_uniform('optim.lr', -1.0, 0.1),)\n"
        "    return c\n")
    workdir = tmp_path / "sweep"
    result = subprocess.run([sys.executable, "-m", "jaxopt_lab.cli", "sweep", "--config",
                             str(path), "--workdir", str(workdir)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "jaxopt-lab: error: sweep.space 'optim.lr': a log range needs low > 0, got -1.0"]
    assert not (workdir / "trials").exists()


def test_conditional_keys_appear_only_where_they_apply():
    dims = [LR, *space.schedule_family(("constant", "warmup_cosine"), warmup=(2, 9))]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        values = space.suggest(trial, dims)
        assert ("optim.warmup_steps" in values) == (values["optim.schedule"] == "warmup_cosine")
        study.tell(trial, 0.0)
    assert {p["optim.schedule"] for p in params(study)} == {"constant", "warmup_cosine"}


def test_tuple_choices_reach_the_config_as_tuples():
    config = tiny()
    config.sweep.space = (space.categorical("model.hidden", ((8,), (16, 16))),)
    check_sweep(config)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    values = space.suggest(trial, space.dimensions(config.sweep.space))
    assert space.apply(config, values).model.hidden in ((8,), (16, 16))


# The model-based samplers (gp, skopt_gp, skopt_forest) take the same path through a sweep as TPE;
# what is theirs is asked and seeded in test_every_sampler_and_pruner_is_seeded, without training.
@pytest.mark.parametrize("sampler", [s if s == "random" else pytest.param(s, marks=pytest.mark.slow)
                                     for s in SAMPLERS
                                     if s not in ("gp", "skopt_gp", "skopt_forest")])
def test_every_sampler_runs_a_small_study(tmp_path, sampler):
    space_ = ((space.categorical("optim.lr", (1e-3, 1e-2, 3e-2)),
               space.categorical("optim.schedule", ("constant", "cosine")))
              if sampler == "grid" else None)
    objectives = ((("validation_accuracy", "maximize"), ("validation_loss", "minimize"))
                  if sampler == "nsga2" else (("validation_accuracy", "maximize"),))
    config = tiny(sampler=sampler, objectives=objectives)
    if space_:
        config.sweep.space = space_
    study = run_sweep(config, str(tmp_path / "a"), progress=False)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert all(0.0 < t.user_attrs["validation_accuracy"] <= 1.0 for t in trials)
    assert all("test_accuracy" in t.user_attrs for t in trials)  # recorded, not selected on
    assert [t.values[0] for t in trials] == [t.user_attrs["validation_accuracy"] for t in trials]
    assert all(os.path.exists(os.path.join(t.user_attrs["run_dir"], "summary.json"))
               for t in trials)
    # The first objective at each evaluation before the last step (one objective only: Optuna's)
    assert sorted(trials[0].intermediate_values) == ([] if len(objectives) > 1 else [10, 20])


@pytest.mark.slow
def test_a_sweep_is_reproducible_and_seeded(tmp_path):
    # That another seed asks other points: test_every_sampler_and_pruner_is_seeded, untrained.
    first = run_sweep(tiny(sampler="tpe", seed=3), str(tmp_path / "a"), progress=False)
    again = run_sweep(tiny(sampler="tpe", seed=3), str(tmp_path / "b"), progress=False)
    assert params(first) == params(again)
    assert [t.values for t in first.trials] == [t.values for t in again.trials]


@pytest.mark.slow
@pytest.mark.parametrize("pruner", [p for p in PRUNERS if p != "none"])
def test_every_pruner_stops_a_hopeless_trial(tmp_path, pruner):
    """Two good trials, then learning rates too small to learn anything in 30 steps: each
    pruner stops the hopeless ones at an evaluation, and the stopped run is checkpointed."""
    config = tiny(pruner=pruner, trials=5, sampler="random")
    config.sweep.space = (space.log_uniform("optim.lr", 1e-7, 1e-1),)
    sweep = prepare(config, str(tmp_path / "s"))
    for lr in (3e-2, 2e-2, 1e-7, 2e-7, 3e-7):
        sweep.study.enqueue_trial({"optim.lr": lr})
    study = run_sweep(config, str(tmp_path / "s"), progress=False)
    states = [t.state for t in study.trials]
    assert states[:2] == [TrialState.COMPLETE] * 2
    assert TrialState.PRUNED in states[2:]
    pruned = next(t for t in study.trials if t.state == TrialState.PRUNED)
    with open(os.path.join(pruned.user_attrs["run_dir"], "summary.json")) as f:
        summary = f.read()
    assert '"stopped_at"' in summary


@pytest.mark.slow
def test_population_trials_equal_the_same_trials_run_alone(tmp_path):
    """Three trials differing in values run as one vmapped program; a fourth with another
    schedule (a shape change) runs as its own program; each equals its trial run alone."""
    fixed = [{"optim.lr": 3e-2, "optim.schedule": "constant"},
             {"optim.lr": 1e-2, "optim.schedule": "constant"},
             {"optim.lr": 3e-3, "optim.schedule": "cosine"},
             {"optim.lr": 5e-3, "optim.schedule": "constant"}]
    results = {}
    for population in (1, 4):
        config = tiny(population=population, trials=4, sampler="random")
        sweep = prepare(config, str(tmp_path / f"p{population}"))
        for values in fixed:
            sweep.study.enqueue_trial(values)
        study = run_sweep(config, str(tmp_path / f"p{population}"), progress=False)
        results[population] = {t.params["optim.lr"]: t for t in study.trials}
    for lr, alone in results[1].items():
        together = results[4][lr]
        assert together.values[0] == pytest.approx(alone.values[0], abs=1e-6)
        assert together.user_attrs["validation_loss"] == pytest.approx(
            alone.user_attrs["validation_loss"], rel=1e-4)
    dirs = {t.user_attrs["population_dir"] for t in results[4].values()}
    assert len(dirs) == 2  # one program per shape: constant (3 members) and cosine (1)
    assert sorted(t.user_attrs["population_index"] for t in results[4].values()) == [0, 0, 1, 2]


@pytest.mark.slow
def test_a_sweep_over_target_sparsity_is_one_population_pruning_each_member_to_its_own(
        tmp_path):
    """`techniques.prune.sparsity` is a value: two targets train as one vmapped program, each
    member pruned to its own target (recorded on its trial), each equal to its trial run alone."""
    results = {}
    for population in (1, 2):
        config = tiny(population=population, trials=2, sampler="random")
        prune = config.techniques.prune
        prune.method, prune.schedule, prune.begin_step, prune.skip = "magnitude", "one_shot", 10, ()
        config.sweep.space = (space.categorical("techniques.prune.sparsity", (0.5, 0.75)),)
        sweep = prepare(config, str(tmp_path / f"p{population}"))
        for target in (0.5, 0.75):
            sweep.study.enqueue_trial({"techniques.prune.sparsity": target})
        study = run_sweep(config, str(tmp_path / f"p{population}"), progress=False)
        results[population] = {t.params["techniques.prune.sparsity"]: t for t in study.trials}
    assert len({t.user_attrs["population_dir"] for t in results[2].values()}) == 1
    for target, alone in results[1].items():
        together = results[2][target]
        assert together.user_attrs["sparsity"] == pytest.approx(target, abs=0.01)
        assert together.user_attrs["nonzero_params"] == alone.user_attrs["nonzero_params"]
        assert together.values[0] == pytest.approx(alone.values[0], abs=1e-6)


@pytest.mark.slow
def test_asha_masks_the_members_of_a_population_that_fall_behind(tmp_path):
    """Five trials as one vmapped program: the hopeless ones are stopped (masked, told PRUNED)
    at the first rung while the others train on in the same program."""
    config = tiny(pruner="asha", trials=5, population=5, sampler="random")
    config.sweep.space = (space.log_uniform("optim.lr", 1e-7, 1e-1),)
    sweep = prepare(config, str(tmp_path / "s"))
    for lr in (3e-2, 2e-2, 1e-7, 2e-7, 3e-7):
        sweep.study.enqueue_trial({"optim.lr": lr})
    study = run_sweep(config, str(tmp_path / "s"), progress=False)
    states = [t.state for t in sorted(study.trials, key=lambda t: t.number)]
    assert states[:2] == [TrialState.COMPLETE] * 2
    assert states[2:].count(TrialState.PRUNED) >= 2
    (directory,) = {t.user_attrs["population_dir"] for t in study.trials}
    with open(os.path.join(directory, "summary.json")) as f:
        members = json.load(f)["members"]
    assert [m["active"] for m in members] == [s == TrialState.COMPLETE for s in states]


@pytest.mark.parametrize("sampler", [pytest.param(s, marks=pytest.mark.slow)
                                     if s in ("gp", "skopt_gp", "skopt_forest") else s
                                     for s in SAMPLERS])
def test_every_sampler_and_pruner_is_seeded(sampler):
    """The same seed asks the same points and stops the same trials; another seed asks others
    (an analytic objective with intermediate values, so this costs no training)."""
    dims = [space.categorical("optim.lr", (1e-3, 1e-2, 1e-1)),
            space.categorical("optim.schedule", ("constant", "cosine", "one_cycle"))]
    if sampler != "grid":
        dims = [LR, space.integer("optim.warmup_steps", 1, 50),
                *space.schedule_family(("constant", "warmup_cosine"), warmup=(2, 9))[:1]]

    def study(seed: int, pruner: str) -> list:
        # Hyperband assigns brackets by the study's name: a sweep's is fixed by its config.
        s = optuna.create_study(sampler=make_sampler(sampler, seed, dims, startup_trials=3),
                                pruner=make_pruner(pruner, 10, 30), direction="maximize",
                                study_name="fixed")
        for _ in range(6):
            trial = s.ask()
            values = space.suggest(trial, dims)
            score = -abs(math.log10(float(values["optim.lr"])) + 2)
            for step in (10, 20):
                trial.report(score + step / 100, step)
                if trial.should_prune():
                    s.tell(trial, state=TrialState.PRUNED)
                    break
            else:
                s.tell(trial, score)
        return [(t.params, t.state) for t in s.trials]

    # Model-based asks cost seconds each here: the pruners are checked with the cheap samplers.
    cheap = sampler in ("random", "grid", "tpe", "nsga2")
    for pruner in ("median", "asha", "hyperband") if cheap else ("none",):
        assert study(0, pruner) == study(0, pruner)
    assert [p for p, _ in study(0, "none")] != [p for p, _ in study(1, "none")]
