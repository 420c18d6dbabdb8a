"""The TPU VM example config loads, validates and builds; JAXOPT_LAB_DISTRIBUTED=auto fails with one
line where JAX finds no cluster. Joining a real slice needs a TPU VM and is not tested here (the
multi-process path itself is, on loopback: tests/test_distributed.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jaxopt_lab import build_experiment, load_config
from jaxopt_lab.data.sources import load_dataset
from jaxopt_lab.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tpu" / "resnet18_cifar10.py"


def test_tpu_config_loads_validates_and_builds():
    config = load_config(str(CONFIG), ["--config.data.batch_size=512"])  # a v5e-16's override
    assert config.train.compute_dtype == "bfloat16"
    assert config.train.steps_per_call == 50 and config.data.batch_size == 512
    assert config.model.name == "resnet18" and not config.data.on_device
    # Builds on a stand-in of CIFAR-10's shapes (tfds:cifar10 needs a network): nothing compiles.
    stand_in = load_dataset("synthetic", synthetic_shape=(32, 32, 3), synthetic_size=64)
    experiment = build_experiment(config, stand_in)
    assert isinstance(experiment.model, MODELS["resnet18"])  # bfloat16: with its float32 layers


def test_distributed_auto_without_a_cluster_is_one_line(tmp_path):
    env = dict(os.environ, JAXOPT_LAB_DISTRIBUTED="auto",
               PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "jaxopt_lab.cli", "train", "--config", "configs/smoke.py",
         "--workdir", str(tmp_path / "run")],
        check=False, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "JAXOPT_LAB_DISTRIBUTED=auto" in lines[0], result.stderr
    assert "detected no cluster" in lines[0]
