"""A validation split from MNIST-1D's generator: fresh examples, the paper's splits untouched, and
training unchanged by it (so test figures measured without one still stand)."""

import numpy as np
import pytest

from jaxopt_lab import UserError, model_config, prepare_dataset, train_and_evaluate, validate
from jaxopt_lab.data.generated import VALIDATION_GENERATOR_SEED, generated_examples
from jaxopt_lab.data.sources import load_dataset
from jaxopt_lab.techniques.distill.transfer import TRANSFER_SEED, transfer_inputs
from tests.helpers import tiny_config


def _config(generated: int, fraction: float = 0.0):
    config = tiny_config("cnn1d", steps=20)
    config.model.channels = 4
    config.data.validation_fraction = fraction
    config.data.generated_validation = generated
    return config


def _checked(generated: int, fraction: float = 0.0):
    config = _config(generated, fraction)
    validate(config)
    return config


def test_generated_validation_leaves_train_and_test_as_the_paper_has_them():
    plain = load_dataset("mnist1d")
    dataset = prepare_dataset(_checked(300))
    for split in ("train", "test"):
        for key in ("x", "label"):
            assert np.array_equal(getattr(dataset, split)[key], getattr(plain, split)[key])
    validation = dataset.validation
    assert validation["x"].shape == (300, 40) and validation["x"].dtype == plain.train["x"].dtype
    assert np.bincount(validation["label"], minlength=10).tolist() == [30] * 10
    # fresh: no validation signal is one of the training or test signals
    seen = {row.tobytes() for row in np.concatenate([plain.train["x"], plain.test["x"]])}
    assert not any(row.tobytes() in seen for row in validation["x"])


def test_validation_and_transfer_examples_come_from_different_generator_seeds(tmp_path):
    assert VALIDATION_GENERATOR_SEED != TRANSFER_SEED
    validation = generated_examples("mnist1d", 50, VALIDATION_GENERATOR_SEED, str(tmp_path))
    transfer = transfer_inputs("mnist1d", 50, str(tmp_path))
    assert not np.array_equal(validation["x"], transfer)
    cached = generated_examples("mnist1d", 50, VALIDATION_GENERATOR_SEED, str(tmp_path))
    assert np.array_equal(cached["x"], validation["x"])


def test_a_run_trains_identically_with_a_generated_validation_split(tmp_path):
    without = train_and_evaluate(_checked(0), str(tmp_path / "without"))
    with_it = train_and_evaluate(_checked(200), str(tmp_path / "with"))
    assert with_it["test_accuracy"] == without["test_accuracy"]
    assert with_it["test_loss"] == without["test_loss"]
    assert "validation_accuracy" not in without
    assert 0.0 <= with_it["validation_accuracy"] <= 1.0


@pytest.mark.parametrize(("generated", "fraction", "message"), [
    (-1, 0.0, "data.generated_validation must be an int >= 0"),
    (100, 0.1, "both make a validation split"),
])
def test_bad_generated_validation_is_one_line(generated, fraction, message):
    with pytest.raises(UserError, match=message):
        _checked(generated, fraction)


def test_a_data_set_without_a_generator_is_pointed_to_validation_fraction():
    config = _config(100)
    config.data.name = "digits"
    config.model = model_config("cnn2d")
    validate(config)
    with pytest.raises(UserError, match="validation_fraction instead"):
        prepare_dataset(config)


def test_a_prepared_data_set_keeps_its_validation_split():
    config = _checked(100)
    prepared = prepare_dataset(config)
    again = prepare_dataset(config, prepared)  # shrink and export hand a run's data set back
    assert np.array_equal(again.validation["x"], prepared.validation["x"])
