"""Small configs and subprocess runners shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxopt_lab import default_config, model_config, validate
from jaxopt_lab.core.launch import with_device_count
from jaxopt_lab.data.sources import Dataset

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(model: str = "mlp", steps: int = 20, **train):
    """A validated config that trains `model` on MNIST-1D for a few steps."""
    config = default_config()
    config.model = model_config(model)
    config.train.steps = steps
    config.train.eval_every = train.pop("eval_every", steps)
    config.train.log_every = train.pop("log_every", min(10, steps))
    config.train.checkpoint_every = train.pop("checkpoint_every", steps)
    config.train.steps_per_call = train.pop("steps_per_call", 1)
    config.train.progress = False
    for key, value in train.items():
        config.train[key] = value
    validate(config)
    return config


def xla_flags(devices: int) -> str:
    """This process's XLA_FLAGS (conftest's fast-compile flags) with `devices` CPU devices."""
    return with_device_count(os.environ.get("XLA_FLAGS", ""), devices)


def run_cli(*args: str, devices: int = 1, env: dict | None = None, timeout: float = 300,
            **popen) -> subprocess.CompletedProcess:
    """Runs `python -m jaxopt_lab.cli ARGS` with `devices` simulated CPU devices."""
    full_env = dict(os.environ, **(env or {}))
    full_env["XLA_FLAGS"] = xla_flags(devices)
    return subprocess.run([sys.executable, "-m", "jaxopt_lab.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False, **popen)


# A 20-step run of the 8-channel MNIST-1D CNN from the command line: what technique run tests use.
QUIET = ["--config.train.progress=False", "--config.train.measure=False"]
SHORT = [*QUIET, "--config.train.steps=20", "--config.train.log_every=10",
         "--config.train.eval_every=20", "--config.train.checkpoint_every=20"]
SMALL_CNN = ["--config", "configs/mnist1d_cnn.py", "--config.model.channels=8",
             "--config.train.steps_per_call=1"]


def summary_of(workdir: Path) -> dict:
    return json.loads((workdir / "summary.json").read_text())


def assert_one_four_and_two_processes_agree(tmp_path: Path, args: list[str], env: dict) -> None:
    """Trains `jaxopt-lab ARGS` on 1 device, 4 simulated devices and 2 processes; the same test
    loss and parameters (to float tolerance) from each."""
    from jaxopt_lab import load_run

    for name, kwargs in {"one": {}, "four": {"devices": 4}}.items():
        result = run_cli(*args, "--workdir", str(tmp_path / name), env=env, **kwargs)
        assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("launch", "-n", "2", "--", *args, "--workdir", str(tmp_path / "two"),
                     env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = load_run(str(tmp_path / "one")).state.params
    for name in ("four", "two"):
        assert summary_of(tmp_path / name)["test_loss"] == pytest.approx(
            summary_of(tmp_path / "one")["test_loss"], rel=1e-4)
        params = load_run(str(tmp_path / name)).state.params
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6, err_msg=name)


def blobs(classes: int = 3, features: int = 8, train: int = 600, test: int = 200,
          seed: int = 0):
    """Gaussian blobs, one per class: a data set of a user's own, made in Python."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, features)).astype(np.float32) * 2

    def split(n):
        label = rng.integers(0, classes, n).astype(np.int32)
        return {"x": centres[label] + rng.normal(size=(n, features)).astype(np.float32),
                "label": label}

    return Dataset(train=split(train), test=split(test), num_classes=classes,
                   input_shape=(features,), name="blobs")
