"""Distillation through whole runs: transfer sets with precomputed or in-step teacher logits,
feature hints in the checkpoint, a teacher trained first by the same command, 1 device = 4
devices = 2 processes, and the composed int8 + pruned + distilled student resumed after kill -9."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import (
    QUIET,
    SHORT,
    SMALL_CNN,
    assert_one_four_and_two_processes_agree,
    run_cli,
    summary_of,
    tiny_config,
)
from test_reliability import LONG, _assert_same_run, _killed_after_a_checkpoint, _Run, _train

from jaxopt_lab import build_experiment, load_run, prepare_dataset, train_and_evaluate, validate
from jaxopt_lab.core.distributed import data_mesh
from jaxopt_lab.core.state import HINTS, init_sharded_state, sample_input
from jaxopt_lab.core.tasks import LABELED
from jaxopt_lab.workflows.train import TEACHER_SUBDIR

pytestmark = pytest.mark.slow  # whole runs and subprocesses

D = "--config.techniques.distill"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A 16-channel MNIST-1D CNN trained for 30 steps."""
    config = tiny_config("cnn1d", steps=30, measure=False)
    config.model.channels = 16
    workdir = str(tmp_path_factory.mktemp("teacher") / "run")
    train_and_evaluate(config, workdir)
    return workdir


def _student(teacher: str, steps: int = 12, **distill):
    config = tiny_config("cnn1d", steps=steps, measure=False)
    config.model.channels = 4
    config.techniques.distill.teacher = teacher
    for key, value in distill.items():
        config.techniques.distill[key] = value
    validate(config)
    return config


def test_a_transfer_set_trains_the_same_with_precomputed_and_in_step_teacher_logits(
        tmp_path, teacher):
    summaries = {mode: train_and_evaluate(
        _student(teacher, transfer_size=300, teacher_logits=mode), str(tmp_path / mode))
        for mode in ("precomputed", "in_step")}
    assert summaries["precomputed"]["techniques"]["distill"]["teacher_logits"] == "precomputed"
    assert summaries["precomputed"]["test_loss"] == pytest.approx(
        summaries["in_step"]["test_loss"], rel=1e-4)
    run = load_run(str(tmp_path / "precomputed"))
    assert int((run.dataset.train[LABELED] == 0).sum()) == 300  # the transfer set joined
    auto = train_and_evaluate(_student(teacher), str(tmp_path / "auto"))
    assert auto["techniques"]["distill"]["teacher_logits"] == "precomputed"  # no augmentation


def test_feature_hints_are_trained_checkpointed_and_left_out_of_the_model(tmp_path, teacher):
    config = _student(teacher, features=(("Conv_2", "Conv_2"),), feature_weight=0.5)
    summary = train_and_evaluate(config, str(tmp_path / "hints"))
    assert summary["techniques"]["distill"]["teacher_logits"] == "in_step"
    params = load_run(str(tmp_path / "hints")).state.params
    projection = np.asarray(params[HINTS]["0"]["projection"])
    assert projection.shape == (4, 16)
    dataset = prepare_dataset(config)
    initial = init_sharded_state(build_experiment(config, dataset), sample_input(dataset),
                                 data_mesh(), config.seed).params[HINTS]["0"]["projection"]
    assert not np.allclose(projection, np.asarray(initial))  # the optimizer trained it
    model_only = sum(x.size for k, v in params.items() if k != HINTS for x in jax.tree.leaves(v))
    assert summary["num_params"] == model_only
    records = (tmp_path / "hints" / "metrics.jsonl").read_text()
    assert "distill_hint_loss" in records


def test_a_teacher_is_trained_first_by_the_same_command_and_reused_after(tmp_path, env):
    teacher_overrides = repr(("--config.model.channels=8", "--config.train.steps=10",
                              "--config.train.progress=False", "--config.train.measure=False"))
    args = ["train", *SMALL_CNN, *SHORT, "--workdir", str(tmp_path / "student"),
            f"{D}.teacher_config=configs/mnist1d_cnn.py",
            f"{D}.teacher_overrides={teacher_overrides}"]
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "training the teacher" in first.stdout
    teacher_dir = tmp_path / "student" / TEACHER_SUBDIR
    assert summary_of(teacher_dir)["steps"] == 10
    recorded = json.loads((tmp_path / "student" / "config.json").read_text())
    assert recorded["techniques"]["distill"]["teacher"] == str(teacher_dir)
    described = summary_of(tmp_path / "student")["techniques"]["distill"]
    assert described["teacher_test_accuracy"] == summary_of(teacher_dir)["test_accuracy"]
    again = run_cli(*args, "--config.train.steps=30", env=env)  # extend the student
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training the teacher" not in again.stdout


def test_a_missing_teacher_config_is_one_line(tmp_path):
    result = run_cli("train", *SMALL_CNN, *QUIET, "--workdir", str(tmp_path / "s"),
                     f"{D}.teacher_config=configs/nothing.py")
    assert result.returncode != 0
    assert "techniques.distill.teacher_config='configs/nothing.py': no such config file" in (
        result.stderr)
    assert "Traceback" not in result.stderr


def test_distilled_runs_agree_on_one_device_four_devices_and_two_processes(tmp_path, env,
                                                                          teacher):
    assert_one_four_and_two_processes_agree(
        tmp_path, ["train", *SMALL_CNN, *SHORT, f"{D}.teacher={teacher}",
                   f"{D}.transfer_size=200"], env)


COMPOSED = [*LONG, f"{D}.teacher_overrides=" + repr((
    "--config.model.features=(16, 32)", "--config.train.steps=50",
    "--config.train.progress=False", "--config.train.measure=False")),
    "--config.techniques.prune.begin_step=50", "--config.techniques.prune.end_step=400",
    "--config.techniques.prune.frequency=50"]


def test_the_composed_student_trains_from_one_config_and_resumes_exactly_after_kill_9(
        tmp_path, env):
    """int8 QAT + 80 % magnitude pruning + distillation from a float teacher trained first."""
    config = "configs/compose_digits.py"
    reference = _Run(env, tmp_path / "reference", *COMPOSED, config=config)
    workdir = _killed_after_a_checkpoint(env, tmp_path / "run", *COMPOSED, config=config,
                                         deadline_s=400)
    result = _train(env, workdir, *COMPOSED, config=config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert reference.wait(timeout=400) == 0, reference.stderr[-3000:]
    summary = summary_of(workdir)
    assert summary["resumed_from"] is not None
    assert set(summary["techniques"]) == {"quantize", "prune", "distill"}
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert summary["techniques"]["distill"]["teacher_logits"] == "in_step"  # augmented inputs
    _assert_same_run(workdir, reference.workdir)


def test_a_teacher_of_another_data_set_is_one_line(tmp_path, teacher):
    result = run_cli("train", "--config", "configs/digits_cnn.py", *QUIET, "--workdir",
                     str(tmp_path / "s"), f"{D}.teacher={teacher}")
    assert result.returncode != 0
    assert "was trained on 'mnist1d' (inputs (40,), 10 outputs); the student's 'digits'" in (
        result.stderr)
    assert "Traceback" not in result.stderr
