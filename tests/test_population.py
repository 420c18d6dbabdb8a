"""Populations through the loop: each member equals the same values run alone; one run directory
with per-member metrics; a diverging member is stopped while the others go on; bad populations
get one line."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import run_cli, tiny_config

from jaxopt_lab import evaluate_run, load_run, train_and_evaluate, validate
from jaxopt_lab.core.metrics import read_metrics
from jaxopt_lab.errors import UserError

STEPS = 12


def _config(key: str, **optim):
    config = tiny_config("mlp", steps=STEPS, log_every=6, eval_every=STEPS,
                         checkpoint_every=STEPS, measure=False)
    config.data.validation_fraction = 0.1
    for name, value in optim.items():
        config.optim[name] = value
    if key == "optim.momentum":
        config.optim.name = "momentum"
    return config


def _with(config, key: str, value):
    config = config.copy_and_resolve_references()
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    validate(config)
    return config


# Every key a population may vary, each with two values that train differently within 12 steps,
# all varied at once: a member equals its run alone only if every one of its values reached it.
CASES = {
    "optim.momentum": (0.5, 0.95),
    "optim.warmup_steps": (2, 10),
    "optim.weight_decay": (0.0, 0.5),  # the config's decay is 0: it must stay in the graph
    "data.seed": (1, 2),
    "seed": (1, 2),  # initialisation and data order
    "loss.label_smoothing": (0.0, 0.3),
}


def test_population_member_equals_the_member_run_alone(tmp_path):
    base = _config("optim.momentum", lr=0.05, schedule="warmup_cosine")
    population = _with(base, "population", tuple(CASES.items()))
    together = train_and_evaluate(population, str(tmp_path / "population"))
    stacked = load_run(str(tmp_path / "population")).state.params

    assert [m["values"] for m in together["members"]] == [
        {key: values[i] for key, values in CASES.items()} for i in range(2)]
    for i in range(2):
        alone_config = base
        for key, values in CASES.items():
            alone_config = _with(alone_config, key, values[i])
        alone = train_and_evaluate(alone_config, str(tmp_path / f"alone{i}"))
        member = together["members"][i]
        for metric in ("validation_loss", "test_loss", "test_accuracy"):
            assert member[metric] == pytest.approx(alone[metric], rel=2e-4, abs=1e-6), metric
        alone_params = load_run(str(tmp_path / f"alone{i}")).state.params
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=2e-4, atol=1e-6),
                     stacked, alone_params)
    # The values matter: the members did not train alike.
    first, second = together["members"]
    assert first["validation_loss"] != pytest.approx(second["validation_loss"], rel=1e-4)


def test_population_writes_one_run_directory_with_metrics_per_member(tmp_path):
    config = _with(_config("optim.lr"), "population",
                   (("optim.lr", (1e-3, 1e-2, 3e-2)), ("seed", (0, 1, 2))))
    config.train.steps_per_call = 3  # scanned: the population's steps in lax.scan
    summary = train_and_evaluate(config, str(tmp_path))
    records = read_metrics(str(tmp_path))
    assert sorted({(r["step"], r["member"]) for r in records}) == [
        (s, m) for s in (6, 12) for m in range(3)]
    final = [r for r in records if r["step"] == STEPS]
    assert all("validation_accuracy" in r and "test_loss" in r and r["active"] for r in final)
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == [
        "member_0", "member_1", "member_2"]
    losses = [m["validation_loss"] for m in summary["members"]]
    assert summary["best_member"] == int(np.argmin(losses))  # selected on validation
    assert summary["num_params"] == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10  # one member
    # The stacked checkpoint evaluates to what the loop reported, member by member.
    reloaded = evaluate_run(load_run(str(tmp_path)), "validation")["members"]
    for got, want in zip(reloaded, summary["members"], strict=True):
        assert got["validation_loss"] == pytest.approx(want["validation_loss"], rel=1e-6)
    printed = run_cli("eval", "--workdir", str(tmp_path), "--split", "test")
    assert printed.returncode == 0, printed.stderr[-2000:]
    members = json.loads(printed.stdout.strip().splitlines()[-1])["members"]
    assert [m["test_loss"] for m in members] == pytest.approx(
        [m["test_loss"] for m in summary["members"]], rel=1e-6)


def test_population_on_the_streamed_feed_equals_its_members_alone(tmp_path):
    """The grain feed hands every member the same batch; lr values still make the difference."""
    base = _config("optim.lr")
    base.data.on_device = False
    together = train_and_evaluate(_with(base, "population", (("optim.lr", (1e-3, 1e-2)),)),
                                  str(tmp_path / "population"))
    for i, lr in enumerate((1e-3, 1e-2)):
        alone = train_and_evaluate(_with(base, "optim.lr", lr), str(tmp_path / f"alone{i}"))
        assert together["members"][i]["validation_loss"] == pytest.approx(
            alone["validation_loss"], rel=2e-4)
    with pytest.raises(UserError, match="needs data.on_device=True"):
        train_and_evaluate(_with(base, "population", (("data.seed", (1, 2)),)),
                           str(tmp_path / "bad"))


def test_a_diverging_member_stops_at_its_last_good_state_and_the_others_go_on(tmp_path, capfd):
    config = _with(_config("optim.lr"), "population", (("optim.lr", (1e-3, 1e30)),))
    summary = train_and_evaluate(config, str(tmp_path))
    assert "population member 1" in capfd.readouterr().err
    good, diverged = summary["members"]
    assert good["active"] and not diverged["active"]
    assert np.isfinite(good["validation_loss"])
    assert summary["best_member"] == 0
    state = load_run(str(tmp_path)).state
    assert int(state.step[0]) == STEPS and int(state.step[1]) < STEPS  # frozen where it stopped
    assert all(np.isfinite(p[1]).all() for p in jax.tree.leaves(state.params))
    records = [r for r in read_metrics(str(tmp_path)) if r["member"] == 1]
    assert all(np.isfinite(r["loss"]) for r in records)  # its non-finite steps are not averaged in


def test_members_stopped_by_a_search_are_masked(tmp_path):
    config = _with(_config("optim.lr"), "population", (("optim.lr", (1e-3, 1e-2)),))
    config.train.eval_every = 6
    calls = []

    def stop_second(step, evaluations):
        calls.append((step, len(evaluations)))
        return [1]

    train_and_evaluate(config, str(tmp_path), stop_members=stop_second)
    assert calls == [(6, 2)]  # not at the last step: nothing is left to stop there
    state = load_run(str(tmp_path)).state
    assert [int(s) for s in state.step] == [STEPS, 6]


@pytest.mark.parametrize("population, message", [
    ((("optim.lrx", (1e-3, 1e-2)),), "'optim.lrx' is not a per-trial value"),
    ((("optim.lr", (1e-3, 1e-2)), ("seed", (0, 1, 2))), "differ in length"),
    ((("optim.momentum", (0.5, 0.9)),), "optim.name='sgd' has none"),
    ((("optim.warmup_steps", (1, 2)),), "has no warmup"),
    ((("optim.lr", ()),), "must be (config key, (value, ...))"),
])
def test_bad_populations_get_one_line(tmp_path, population, message):
    config = _config("optim.lr")
    config.optim.name = "sgd"
    with pytest.raises(UserError, match=None) as error:
        config.population = population
        validate(config)
        train_and_evaluate(config, str(tmp_path))
    assert message in str(error.value)
