"""Width NAS from `jaxopt-lab sweep` (`sweep.widths`): killed and rerun, it finishes every trial
once; each batch is one width-masked population whose run directory is what
`workflows.nas.train_widths` writes; the best trial is the best on validation; each trial's
size and costs are its narrow model's; bad input gets one line before anything trains."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_sweep_runs import checkpointed, finished_once, kill_when

from jaxopt_lab.cli import main
from jaxopt_lab.compose.config import load_config
from jaxopt_lab.core.measure import count_flops
from jaxopt_lab.core.tasks import inference
from jaxopt_lab.models import CNN1D
from jaxopt_lab.workflows.nas import train_widths, width_config

CONFIG = """
from jaxopt_lab import default_config, model_config

def get_config():
    c = default_config()
    c.model = model_config("cnn1d", channels=8)
    c.train.steps, c.train.eval_every, c.train.log_every = 20, 10, 10
    c.train.checkpoint_every, c.train.steps_per_call = 10, 1
    c.sweep.widths = (2, 4, 8)
    c.sweep.trials, c.sweep.population, c.sweep.sampler = 4, 2, "random"
    return c
"""
KEYS = ["model.channels[0]", "model.channels[1]", "model.channels[2]"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config") / "widths.py"
    path.write_text(CONFIG)
    return str(path)


@pytest.fixture(scope="module")
def swept(config_file, tmp_path_factory, env):
    """The sweep killed (kill -9) once a population has written its start, then the same
    command rerun; its trials, its populations' summaries and what the rerun printed."""
    workdir = tmp_path_factory.mktemp("sweep") / "nas"
    command = [sys.executable, "-m", "jaxopt_lab.cli", "sweep", "--config", config_file,
               "--workdir", str(workdir)]
    proc = subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when(proc, checkpointed(str(workdir / "populations/*")))
    printed = subprocess.run(command, env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=600, check=False)
    assert printed.returncode == 0, printed.stderr[-3000:]
    trials = finished_once(workdir, 4)
    summaries = {}
    for trial in trials:
        directory = trial.user_attrs["population_dir"]
        if directory not in summaries:
            with open(os.path.join(directory, "summary.json")) as f:
                summaries[directory] = json.load(f)
    return workdir, trials, summaries, printed.stdout


def _widths(trial) -> tuple[int, ...]:
    return tuple(trial.params[key] for key in KEYS)


def _member(summaries, trial) -> dict:
    return summaries[trial.user_attrs["population_dir"]]["members"][
        trial.user_attrs["population_index"]]


@pytest.mark.slow  # two sweep processes and a population trained from Python: ~25 s
def test_a_killed_width_sweep_resumes_and_trains_each_batch_as_one_population(swept):
    workdir, trials, summaries, printed = swept
    assert [t.user_attrs["population_dir"] for t in trials] == [  # two batches of two
        str(workdir / "populations" / n) for n in ("0", "0", "2", "2")]
    resumed = [t for t in trials if t.user_attrs.get("resumed")]
    assert resumed, "the population killed after its start was not resumed"
    assert summaries[resumed[0].user_attrs["population_dir"]]["resumed_from"] is not None
    for trial in trials:  # member i trained at trial i's sampled widths, to the end
        member = _member(summaries, trial)
        assert member["layer_widths"] == {"channels": list(_widths(trial))}
        assert trial.user_attrs["steps"] == 20
    assert "val_acc" in printed and "populations/" in printed


@pytest.mark.slow  # the `swept` fixture
def test_a_population_holds_what_train_widths_writes(swept, config_file, tmp_path):
    _, trials, summaries, _ = swept
    batch = [t for t in trials if t.user_attrs["population_dir"].endswith("/2")]
    widths = [_widths(t) for t in batch]
    config = load_config(config_file)
    python = train_widths(width_config(config, widths, [config.seed] * 2), widths,
                          str(tmp_path))
    for got, want in zip(summaries[batch[0].user_attrs["population_dir"]]["members"],
                         python["members"], strict=True):
        for key in ("layer_widths", "num_params", "model_bytes", "flops_per_example"):
            assert got[key] == want[key], key
        for key in ("validation_accuracy", "validation_loss", "test_accuracy"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


@pytest.mark.slow  # the `swept` fixture
def test_each_trial_records_its_narrow_models_size_and_costs(swept):
    _, trials, summaries, _ = swept
    x = np.zeros((1, 40), np.float32)  # one MNIST-1D example
    for trial in trials:
        model = CNN1D(num_classes=10, channels=_widths(trial))
        variables = model.init(jax.random.key(0), x)
        member = _member(summaries, trial)
        assert trial.user_attrs["num_params"] == member["num_params"] == sum(
            p.size for p in jax.tree.leaves(variables["params"]))
        assert trial.user_attrs["flops_per_example"] == member["flops_per_example"] == (
            count_flops(inference(model), variables, x))
        assert trial.user_attrs["latency_ms_batch1"] == member["latency_ms_batch1"] > 0


@pytest.mark.slow  # the `swept` fixture
def test_the_best_trial_is_the_best_on_validation(swept):
    workdir, trials, summaries, _ = swept
    report = json.loads((workdir / "sweep_report.json").read_text())
    accuracies = [_member(summaries, t)["validation_accuracy"] for t in trials]
    best = report["top_trials"][0]
    assert best["objectives"]["validation_accuracy"] == max(accuracies)
    (chosen,) = [t for t in trials if t.number == best["number"]]
    assert _member(summaries, chosen)["validation_accuracy"] == max(accuracies)
    assert best["params"] == chosen.params
    assert main(["sweep", "--status", str(workdir)]) == 0


@pytest.mark.parametrize("overrides, message", [
    (["--config.model.name=logreg"], "sweep.widths: model 'logreg' has no width keys"),
    (["--config.model.name=transformer_lm"], "model 'transformer_lm' cannot be width-masked"),
    (["--config.sweep.widths=(2,16)"], r"sweep.widths has 16, wider than Conv_0 .*\(8\)"),
    (["--config.sweep.widths=(0,2)"], r"sweep.widths=\(0, 2\) must be distinct ints >= 1"),
    (["--config.sweep.widths=(2,2)"], "must be distinct ints"),
    (["--config.sweep.widths=(2.5,4)"], "must be distinct ints"),
    (["--config.techniques.prune.method=magnitude"], "techniques.prune holds the width masks"),
    (["--config.sweep.space=(('optim.lr','log_uniform',(0.001,0.1),()),)"],
     "sweep.widths makes the search space"),
])
def test_bad_width_sweeps_get_one_line(config_file, tmp_path, capsys, overrides, message):
    workdir = tmp_path / "never"
    assert main(["sweep", "--config", config_file, "--workdir", str(workdir),
                 *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxopt-lab: error:"), err
    assert re.search(message, err), err
    assert not workdir.exists()  # refused before anything was written
