"""`tfds:<name>` data sets, offline: a data set prepared elsewhere trains from its data dir on both
feeds, and one that would need a download fails at once with one line.

No test downloads anything: the prepared data set is a tiny builder written here as array_record,
and the CLI's subprocess, which does not have the builder's code, reads it from the files alone.
The `tfds:mnist` test assumes no network, as in CI (with a network and TensorFlow it would
download MNIST).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import run_cli

from jaxopt_lab.data.sources import load_dataset
from jaxopt_lab.errors import UserError

NAME = "jaxopt_lab_tiny_images"  # what TFDS derives from the class name below


class JaxoptLabTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """8x8 grey images of 3 classes told apart by brightness: learnable in a few steps.

    Unregistered, so even in this process the data set is found the way a user's copied-in data
    set is: by its files in the data dir. Tensor, not Image, features: encoding PNGs needs
    TensorFlow, which the install leaves out.
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=3),
        }))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples(60, seed=0),
                "test": self._generate_examples(30, seed=1)}

    def _generate_examples(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        for i in range(n):
            label = i % 3
            noise = rng.integers(0, 40, size=(8, 8, 1))
            yield i, {"image": (80 * label + noise).astype(np.uint8), "label": label}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    JaxoptLabTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def _train(workdir, data_dir: str, name: str, *overrides: str) -> subprocess.CompletedProcess:
    return run_cli("train", "--config", "configs/smoke.py", "--workdir", str(workdir),
                   f"--config.data.name=tfds:{name}", f"--config.data.dir={data_dir}",
                   "--config.model.name=mlp", "--config.data.batch_size=16",
                   "--config.train.steps=20", "--config.train.eval_every=20",
                   "--config.train.log_every=10", "--config.train.checkpoint_every=20",
                   "--config.train.steps_per_call=1", *overrides)


def _one_line(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a user error: exit 2, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith("jaxopt-lab: error: "), lines[0]
    return lines[0]


def test_prepared_data_set_reads_from_its_files(prepared_dir):
    data = load_dataset(f"tfds:{NAME}", prepared_dir)
    assert data.num_classes == 3 and data.input_shape == (8, 8, 1)
    assert data.train["x"].shape == (60, 8, 8, 1) and data.test["x"].shape == (30, 8, 8, 1)
    assert data.train["x"].dtype == np.float32 and 0 <= data.train["x"].min()
    assert data.train["x"].max() <= 1  # uint8 images scaled to [0, 1]
    np.testing.assert_array_equal(np.bincount(data.test["label"]), [10, 10, 10])  # TFDS shuffles


@pytest.mark.parametrize("on_device", [True, False], ids=["on_device", "grain"])
def test_trains_from_a_prepared_data_dir(prepared_dir, tmp_path, on_device):
    result = _train(tmp_path / "run", prepared_dir, NAME, f"--config.data.on_device={on_device}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 20 and np.isfinite(summary["test_loss"])


def test_download_without_network_fails_at_once_in_one_line(tmp_path):
    data_dir = str(tmp_path / "empty")
    line = _one_line(_train(tmp_path / "run", data_dir, "mnist"))
    assert "'tfds:mnist'" in line and data_dir in line, line
    assert not os.path.exists(tmp_path / "run" / "summary.json")


def test_unknown_catalog_name_is_one_line(tmp_path):
    data_dir = str(tmp_path / "data")
    line = _one_line(_train(tmp_path / "run", data_dir, "no_such_data_set"))
    assert re.search(r"'no_such_data_set' is neither in the TFDS catalog .* nor prepared in "
                     + re.escape(data_dir), line), line


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="TensorFlow is installed: preparing would go ahead")
def test_preparing_without_tensorflow_says_so_before_downloading(tmp_path, monkeypatch):
    # A registered builder with no download URLs, not yet prepared: only TensorFlow is missing.
    monkeypatch.setattr(tfds.core.registered, "_DATASET_REGISTRY",
                        dict(tfds.core.registered._DATASET_REGISTRY))

    class JaxoptLabUnprepared(JaxoptLabTinyImages):
        """Registered (by subclassing without skip_registration) for this test only."""

    with pytest.raises(UserError, match=r"'tfds:jaxopt_lab_unprepared' is not prepared in .* "
                                        r"needs TensorFlow"):
        load_dataset("tfds:jaxopt_lab_unprepared", str(tmp_path))
