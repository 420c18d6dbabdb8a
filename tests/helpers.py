"""Small configs and subprocess runners shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jaxopt_lab.core.config import default_config, model_config, validate

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


def run_cli(*args: str, devices: int = 1, env: dict | None = None, timeout: float = 300,
            **popen) -> subprocess.CompletedProcess:
    """Runs `python -m jaxopt_lab.cli ARGS` with `devices` simulated CPU devices."""
    full_env = dict(os.environ, **(env or {}))
    full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, "-m", "jaxopt_lab.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False, **popen)
