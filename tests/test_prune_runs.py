"""Pruning through whole runs: every method's final checkpoint holds exactly the target's zeros,
the CLI logs and summarizes sparsity, exact resume after kill -9 (RigL's random regrowth
included), 1 device = 4 devices = 2 processes, a scanned population of targets equals its
members run alone, and pruning composes with quantization."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import (
    SHORT,
    SMALL_CNN,
    assert_one_four_and_two_processes_agree,
    run_cli,
    summary_of,
    tiny_config,
)
from test_reliability import LONG, _assert_same_run, _killed_after_a_checkpoint, _Run, _train

from jaxopt_lab import load_run, train_and_evaluate, validate
from jaxopt_lab.core.layers import param_paths
from jaxopt_lab.techniques import prune

pytestmark = pytest.mark.slow  # real subprocesses and whole runs

P = "--config.techniques.prune"


def _kernel_zeros(params, skip_first_and_last=True) -> float:
    kernels = [np.asarray(v) for p, v in zip(param_paths(params), jax.tree.leaves(params),
                                             strict=True) if p.endswith("['kernel']")]
    if skip_first_and_last:
        kernels = kernels[1:-1]
    return sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)


METHODS = {
    "magnitude": {"schedule": "gradual", "end_step": 12, "frequency": 4},
    "random": {"schedule": "gradual", "end_step": 12, "frequency": 4},
    "snip": {"schedule": "one_shot", "begin_step": 0},
    "set": {"schedule": "one_shot", "end_step": 16, "frequency": 4},
    "rigl": {"schedule": "one_shot", "end_step": 16, "frequency": 4},
    "ste": {"schedule": "gradual", "end_step": 12, "frequency": 2},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_trained_runs_checkpoint_holds_exactly_the_targets_zeros(tmp_path, method):
    config = tiny_config("mlp", steps=20, measure=False)
    config.model.hidden = (64, 64, 64)
    block = config.techniques.prune
    block.method, block.sparsity = method, 0.8
    for key, value in METHODS[method].items():
        block[key] = value
    validate(config)
    summary = train_and_evaluate(config, str(tmp_path / method))
    run = load_run(str(tmp_path / method))
    # The default skip leaves the first and last Dense layers whole; the middle two hold 0.8,
    # exactly 0 where masked (a kept weight may be 0 too: SET regrows where the gradient is 0).
    masks = prune.find_state(run.state.opt_state).masks
    assert _kernel_zeros(masks) == pytest.approx(0.8, abs=1e-3)  # bools: False counts
    for kept, weight in zip(jax.tree.leaves(masks), jax.tree.leaves(run.state.params),
                            strict=True):
        assert not np.asarray(weight)[~np.broadcast_to(kept, np.shape(weight))].any()
    zeros = _kernel_zeros(run.state.params)
    assert zeros >= 0.8 - 1e-3 and summary["sparsity"] == pytest.approx(zeros, abs=1e-6)
    assert summary["nonzero_params"] < summary["num_params"]
    assert summary["techniques"]["prune"]["method"] == method


def test_cli_logs_sparsity_and_summarizes_sizes(tmp_path, env):
    workdir = tmp_path / "run"
    result = run_cli("train", *SMALL_CNN, "--workdir", str(workdir), *SHORT, f"{P}.method=magnitude",
                     f"{P}.sparsity=0.75", f"{P}.end_step=10", f"{P}.frequency=5",
                     f"{P}.skip=()", "--config.train.measure=True", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    summary = summary_of(workdir)
    assert summary["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert summary["techniques"]["prune"]["skip"] == []
    assert summary["model_bytes_bitmask"] < summary["model_bytes"]


@pytest.mark.parametrize("args,message", [
    ([f"{P}.method=magnitude", f"{P}.pattern=2:3"], "techniques.prune.pattern='2:3'"),
    ([f"{P}.method=magic"], "techniques.prune.method='magic' is unknown"),
])
def test_bad_prune_options_get_one_line(args, message, env):
    result = run_cli("train", *SMALL_CNN, "--workdir", "/tmp/never", *SHORT, *args, env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_pruned_runs_agree_on_one_device_four_devices_and_two_processes(tmp_path, env):
    assert_one_four_and_two_processes_agree(
        tmp_path, ["train", *SMALL_CNN, *SHORT, f"{P}.method=magnitude", f"{P}.sparsity=0.5",
                   f"{P}.end_step=10", f"{P}.frequency=5"], env)


RIGL = [*LONG, f"{P}.method=rigl", f"{P}.schedule=one_shot", f"{P}.sparsity=0.7",
        f"{P}.end_step=500", f"{P}.frequency=50"]


def test_rigl_killed_and_rerun_resumes_exactly(tmp_path, env):
    """Masks, the update count and the regrowth key are in the checkpoint."""
    reference = _Run(env, tmp_path / "reference", *RIGL)
    workdir = _killed_after_a_checkpoint(env, tmp_path / "run", *RIGL)
    result = _train(env, workdir, *RIGL)
    assert result.returncode == 0, result.stderr
    assert summary_of(workdir)["resumed_from"] is not None
    _assert_same_run(workdir, reference.finish())


def test_scanned_population_of_targets_equals_its_members_run_alone(tmp_path):
    def config(**population):
        c = tiny_config("mlp", steps=12, log_every=6, measure=False, steps_per_call=3)
        c.techniques.prune.method = "magnitude"
        c.techniques.prune.end_step = 8
        c.techniques.prune.frequency = 2
        c.population = tuple(population.items())
        validate(c)
        return c

    targets = (0.3, 0.9)
    together = train_and_evaluate(config(**{"techniques.prune.sparsity": targets}),
                                  str(tmp_path / "population"))
    stacked = load_run(str(tmp_path / "population")).state.params
    for i, target in enumerate(targets):
        alone = config()
        alone.techniques.prune.sparsity = target
        alone.train.steps_per_call = 1
        summary = train_and_evaluate(alone, str(tmp_path / f"alone{i}"))
        assert together["members"][i]["test_loss"] == pytest.approx(summary["test_loss"],
                                                                    rel=2e-4)
        assert together["members"][i]["sparsity"] == summary["sparsity"]
        params = load_run(str(tmp_path / f"alone{i}")).state.params
        for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=1e-6)


def test_pruning_composes_with_quantization_in_one_run(tmp_path):
    config = tiny_config("cnn1d", steps=16, measure=False)
    config.model.channels = 8
    config.techniques.quantize.method = "qat"
    config.techniques.prune.method = "magnitude"
    config.techniques.prune.schedule = "one_shot"
    config.techniques.prune.begin_step = 4
    config.techniques.prune.sparsity = 0.5
    validate(config)
    summary = train_and_evaluate(config, str(tmp_path / "both"))
    assert set(summary["techniques"]) == {"quantize", "prune"}
    # The default skip (first and last layers) is read from the float model: AQT's ops hide it.
    skip = summary["techniques"]["prune"]["skip"]
    assert len(skip) == 2 and skip == summary["techniques"]["quantize"]["skip"]
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert np.isfinite(summary["test_loss"])
