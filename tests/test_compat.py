"""A run directory written before the restructure into compose/, run/ and workflows/ (by the code
of 4000ee9, `tests/data/make_run_before_restructure.py`: a QAT + magnitude-pruned MLP on digits,
20 steps) still loads, evaluates, keeps its summary keys and resumes."""

import json
import shutil
from pathlib import Path

import pytest

from jaxopt_lab import evaluate_run, load_run, train_and_evaluate, validate
from jaxopt_lab.run.build import read_config

OLD_RUN = Path(__file__).parent / "data" / "run_before_restructure"


@pytest.fixture()
def old_run(tmp_path) -> Path:
    copy = tmp_path / "old"
    shutil.copytree(OLD_RUN, copy)
    return copy


def test_an_old_run_loads_and_evaluates_as_it_did(old_run):
    saved = json.loads((old_run / "summary.json").read_text())
    run = load_run(str(old_run))
    assert run.step == 20 and not run.members
    assert set(run.experiment.techniques) == {"quantize", "prune"}
    assert run.experiment.techniques["prune"] == saved["techniques"]["prune"]
    assert run.experiment.techniques["quantize"] == saved["techniques"]["quantize"]
    test = evaluate_run(run, "test")
    assert test["test_accuracy"] == pytest.approx(saved["test_accuracy"], abs=0.01)
    assert test["test_loss"] == pytest.approx(saved["test_loss"], rel=1e-3)


def test_an_old_run_resumes_with_the_same_summary_keys(old_run):
    saved = json.loads((old_run / "summary.json").read_text())
    config = read_config(str(old_run))
    validate(config)
    config.train.steps = 30  # extending a run is a changed config a workdir accepts
    summary = train_and_evaluate(config, str(old_run))
    assert summary["resumed_from"] == 20 and summary["steps"] == 30
    assert set(summary) == set(saved)
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.01)
