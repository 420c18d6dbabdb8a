"""Configs: every shipped config validates; bad keys, types and names fail in one line, exit 2."""

from __future__ import annotations

import glob

import pytest
from helpers import ROOT, run_cli

from jaxopt_lab import load_config
from jaxopt_lab.errors import UserError

CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.rsplit("/", 1)[-1])
def test_shipped_configs_validate_and_name_their_command(path):
    config = load_config(path)
    assert config.train.steps > 0
    with open(path) as f:
        assert "jaxopt-lab train --config configs/" in f.read(600)


def test_overrides_are_typed_and_applied():
    config = load_config(str(ROOT / "configs/mnist1d_cnn.py"),
                         ["--config.optim.lr=3e-3", "--config.train.steps=7",
                          "--config.model.channels=8"])
    assert config.optim.lr == pytest.approx(3e-3)
    assert config.train.steps == 7
    assert config.model.channels == 8


@pytest.mark.parametrize("override, culprit", [
    ("--config.optim.lrx=3", "lrx"),
    ("--config.train.steps=abc", "config.train.steps"),
    ("--config.data.name=imagenet_fake", "data.name"),
    ("--config.model.name=transformerx", "model.name"),
    ("--config.optim.name=adamx", "optim.name"),
    ("--config.optim.schedule=linearx", "optim.schedule"),
    ("--config.train.steps=0", "train.steps"),
    ("--config.data.prefetch=-1", "data.prefetch"),
    ("--config.data.workers=-2", "data.workers"),
    ("--config.model.channels=true", "model.channels"),
])
def test_bad_overrides_name_the_culprit(override, culprit):
    with pytest.raises(UserError, match=culprit.replace(".", r"\.")):
        load_config(str(ROOT / "configs/mnist1d_cnn.py"), [override])


@pytest.mark.parametrize("override, culprit", [
    ("--config.techniques.prune.skip=('Conv_[',)",
     r"techniques\.prune\.skip: 'Conv_\[' is not a regular"),
    ("--config.techniques.quantize.skip=('Conv_[',)",
     r"techniques\.quantize\.skip: 'Conv_\[' is not a regular"),
    ("--config.train.float32_layers=('Conv_[',)",
     r"train\.float32_layers: 'Conv_\[' is not a regular"),
    ("--config.techniques.quantize.skip=(1,)",
     r"techniques\.quantize\.skip=\(1,\) must be a tuple of regular"),
])
def test_a_bad_layer_pattern_is_one_line_wherever_layers_are_named(override, culprit):
    """Prune and quantize `skip` and `train.float32_layers` are checked by one function, before
    anything is built (a bad quantize pattern used to pass validation and fail in training)."""
    with pytest.raises(UserError, match=culprit):
        load_config(str(ROOT / "configs/mnist1d_cnn.py"),
                    ["--config.techniques.prune.method=magnitude",
                     "--config.techniques.quantize.method=qat", override])


def test_unknown_model_hparam_names_allowed_keys(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from jaxopt_lab import default_config\n"
                    "def get_config():\n"
                    "    c = default_config()\n    c.model.name = 'mlp'\n"
                    "    c.model.channels = 3\n    return c\n")
    with pytest.raises(UserError, match=r"model\.channels.*allowed: hidden"):
        load_config(str(path))


@pytest.mark.parametrize("body, culprit", [
    ("c = ConfigDict({'train': {'steps': 'many'}})", r"'train\.steps' must be int"),
    ("c = ConfigDict({'train': {'stepz': 3}})", r"unknown config key 'train\.stepz'"),
    ("c = ConfigDict({'optimizer': {}})", r"unknown config key 'optimizer'"),
    ("c = default_config(); c.train.steps = 'many'", r"steps.*cannot be casted"),
])
def test_config_files_with_bad_keys_or_types(tmp_path, body, culprit):
    path = tmp_path / "bad.py"
    path.write_text("from ml_collections import ConfigDict\n"
                    "from jaxopt_lab import default_config\n"
                    f"def get_config():\n    {body}\n    return c\n")
    with pytest.raises(UserError, match=culprit) as error:
        load_config(str(path))
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)


@pytest.mark.parametrize("args", [
    ("train", "--config", "configs/smoke.py", "--workdir", "unused", "--config.optim.lrx=1"),
    ("train", "--config", "configs/missing.py", "--workdir", "unused"),
    ("train", "--config", "configs/smoke.py", "--workdir", "unused", "--config.data.name=nope"),
    ("train", "--config", "configs/smoke.py"),
    ("launch", "-n", "2"),
])
def test_cli_bad_input_is_one_line_exit_2(args):
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("jaxopt-lab")
