"""End-to-end runs of the loop: summary, metrics, resume, scanned steps, streamed data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_cli, tiny_config

from jaxopt_lab import train_and_evaluate
from jaxopt_lab.core.metrics import read_metrics

SUMMARY_KEYS = {"test_accuracy", "test_loss", "steps", "train_wall_s", "steps_per_s", "num_params"}


def test_cli_train_writes_summary_metrics_and_checkpoints(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("train", "--config", "configs/smoke.py", "--workdir", str(workdir),
                     "--config.train.steps=60", "--config.train.eval_every=30",
                     "--config.train.log_every=20", "--config.train.checkpoint_every=30")
    assert result.returncode == 0, result.stderr
    assert f"run directory: {workdir}" in result.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == 60
    assert summary["num_params"] == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    records = read_metrics(str(workdir))
    assert [r["step"] for r in records] == [20, 30, 40, 60]  # log and eval steps
    assert [r["step"] for r in records if "test_accuracy" in r] == [30, 60]
    assert (workdir / "config.json").exists() and (workdir / "tensorboard").is_dir()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "30", "60"]


def test_training_learns(tmp_path):
    summary = train_and_evaluate(tiny_config("mlp", steps=300, eval_every=300), str(tmp_path))
    assert summary["test_accuracy"] > 0.3  # chance is 0.1; the paper's MLP ends near 0.68


def test_scanned_steps_match_one_call_per_step(tmp_path):
    finals = []
    for k in (1, 5):
        config = tiny_config("cnn1d", steps=20, steps_per_call=k)
        finals.append(train_and_evaluate(config, str(tmp_path / f"k{k}")))
    assert finals[0]["test_loss"] == pytest.approx(finals[1]["test_loss"], rel=1e-4)
    assert finals[1]["steps_per_call"] == 5


def test_auto_steps_per_call_picks_a_measured_candidate(tmp_path):
    config = tiny_config("mlp", steps=20, steps_per_call=0, log_every=10, eval_every=20)
    summary = train_and_evaluate(config, str(tmp_path))
    assert summary["steps_per_call"] in (1, 10)
    assert summary["steps"] == 20


def test_rerun_on_finished_workdir_resumes_without_training(tmp_path):
    config = tiny_config("mlp", steps=20)
    first = train_and_evaluate(config, str(tmp_path))
    second = train_and_evaluate(config, str(tmp_path))
    assert second["resumed_from"] == 20
    assert second["test_loss"] == pytest.approx(first["test_loss"], rel=1e-6)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [10, 20]


def test_extending_a_run_continues_from_its_checkpoint(tmp_path):
    short = train_and_evaluate(tiny_config("mlp", steps=20, checkpoint_every=10), str(tmp_path / "a"))
    del short
    extended = train_and_evaluate(tiny_config("mlp", steps=40, checkpoint_every=10),
                                  str(tmp_path / "a"))
    straight = train_and_evaluate(tiny_config("mlp", steps=40, checkpoint_every=10),
                                  str(tmp_path / "b"))
    assert extended["resumed_from"] == 20
    # The constant schedule and step-indexed data order make the two trajectories identical.
    assert extended["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-5)


def test_streamed_grain_feed_trains_and_resumes_exactly(tmp_path):
    def config(steps):
        c = tiny_config("mlp", steps=steps, checkpoint_every=10)
        c.data.on_device = False
        return c

    straight = train_and_evaluate(config(30), str(tmp_path / "straight"))
    train_and_evaluate(config(10), str(tmp_path / "split"))
    resumed = train_and_evaluate(config(30), str(tmp_path / "split"))
    assert resumed["resumed_from"] == 10
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-5)


def test_schedules_and_optimizers_build_and_step(tmp_path):
    for i, (name, schedule) in enumerate([("sgd", "cosine"), ("adamw", "warmup_cosine"),
                                          ("momentum", "one_cycle"),
                                          ("adam", "reduce_on_plateau"), ("lamb", "constant")]):
        config = tiny_config("logreg", steps=6, log_every=3)
        config.optim.name, config.optim.schedule = name, schedule
        config.optim.weight_decay = 1e-4
        config.optim.grad_clip = 1.0
        summary = train_and_evaluate(config, str(tmp_path / str(i)))
        assert np.isfinite(summary["test_loss"]), (name, schedule)
