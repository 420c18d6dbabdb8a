"""Tasks beyond classification through the same loop (regression on diabetes, a character LM on
the Python standard library), and the validation split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_cli

from jaxopt_lab import load_config, train_and_evaluate
from jaxopt_lab.core.metrics import read_metrics
from jaxopt_lab.data.sources import load_dataset, with_validation
from jaxopt_lab.errors import UserError

TINY = ["--config.train.progress=False", "--config.train.steps=10",
        "--config.train.eval_every=10", "--config.train.log_every=5",
        "--config.train.checkpoint_every=10", "--config.train.steps_per_call=1"]
TINY_LM = ["--config.model.dim=32", "--config.model.depth=1", "--config.model.heads=2",
           "--config.model.mlp_dim=64", "--config.data.batch_size=8",
           "--config.train.eval_batch_size=512", "--config.train.measure=False"]


@pytest.mark.parametrize("config_file, extra, metric", [
    ("configs/diabetes_mlp.py", [], "mse"),
    pytest.param("configs/python_text_lm.py", TINY_LM, "bits_per_char", marks=pytest.mark.slow),
])
def test_task_config_trains_checkpoints_and_resumes(tmp_path, config_file, extra, metric):
    config = load_config(config_file, [*TINY, *extra])
    first = train_and_evaluate(config, str(tmp_path))
    for split in ("validation", "test"):
        assert np.isfinite(first[f"{split}_{metric}"])
    if metric == "bits_per_char":  # the loss is in nats
        assert first["test_bits_per_char"] == pytest.approx(first["test_loss"] / np.log(2))
        assert first["task"] == "language_model"
    else:
        assert first["test_mse"] == first["test_loss"] and "test_accuracy" not in first
        assert first["task"] == "regression"
    longer = load_config(config_file, [*TINY, *extra, "--config.train.steps=20",
                                       "--config.train.eval_every=20"])
    resumed = train_and_evaluate(longer, str(tmp_path))
    assert resumed["resumed_from"] == 10 and resumed["steps"] == 20
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [5, 10, 15, 20]
    assert resumed[f"test_{metric}"] < first[f"test_{metric}"]  # it learns from the start


def test_regression_rejects_label_smoothing(tmp_path):
    config = load_config("configs/diabetes_mlp.py", [*TINY, "--config.loss.label_smoothing=0.1"])
    with pytest.raises(UserError, match="label_smoothing applies to class labels"):
        train_and_evaluate(config, str(tmp_path))


def test_validation_split_is_fixed_disjoint_and_carved_from_train():
    data = load_dataset("mnist1d")
    a, b = with_validation(data, 0.1), with_validation(data, 0.1)
    assert len(a.validation["label"]) == 400 and len(a.train["label"]) == 3600
    np.testing.assert_array_equal(a.validation["x"], b.validation["x"])  # no seed involved
    rows = {row.tobytes() for row in data.train["x"]}
    held = {row.tobytes() for row in a.validation["x"]}
    kept = {row.tobytes() for row in a.train["x"]}
    assert held | kept == rows and not held & kept
    assert with_validation(data, 0.0).validation is None
    with pytest.raises(UserError, match="validation_fraction"):
        with_validation(data, 0.9999)


def test_paper_configs_keep_the_papers_protocol_and_new_ones_get_validation(tmp_path):
    for name in ("mnist1d_cnn", "mnist1d_mlp", "mnist1d_logreg", "mnist1d_cnn_shuffled"):
        assert load_config(f"configs/{name}.py").data.validation_fraction == 0.0
    result = run_cli("train", "--config", "configs/smoke.py", "--workdir", str(tmp_path), *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"validation_loss", "validation_accuracy", "test_loss", "test_accuracy"} <= set(summary)
    assert {"model_bytes", "flops_per_example", "latency_ms_batch1",
            "latency_ms_batch256"} <= set(summary)
    assert summary["model_bytes"] == 4 * summary["num_params"]
    assert summary["flops_per_example"] == 2 * (40 * 100 + 100 * 100 + 100 * 10)
