"""`train.init_from`: a new run that starts from another run's weights (a fine-tune with its own
learning rate and steps), at step 0 with a fresh optimizer; its resume is its own; anything that
does not fit is refused in one line."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import run_cli, tiny_config

from jaxopt_lab import build_run, load_run, model_config, train_and_evaluate
from jaxopt_lab.errors import UserError


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                    strict=True))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A trained ResNet on digits: params and BatchNorm statistics to start from."""
    config = tiny_config("resnet", steps=6)
    config.data.name = "digits"
    config.model = model_config("resnet", depth=8, width=4)
    workdir = str(tmp_path_factory.mktemp("init") / "source")
    train_and_evaluate(config, workdir)
    return workdir


def _finetune(source: str, steps: int, **model):
    config = tiny_config("resnet", steps=steps)
    config.data.name = "digits"
    config.model = model_config("resnet", depth=8, width=model.get("width", 4))
    config.optim.lr = 1e-4
    config.train.init_from = source
    return config


def test_a_run_starts_from_another_runs_weights_with_a_fresh_optimizer(source, tmp_path):
    start = build_run(_finetune(source, steps=3))
    trained = load_run(source)
    assert _equal(start.carry.params, trained.state.params)
    assert _equal(start.carry.model_state, trained.state.model_state)  # BatchNorm statistics
    assert int(start.carry.step) == 0
    fresh = build_run(_without_init(source))
    assert not _equal(start.carry.params, fresh.carry.params)  # not the model's own init
    # Adam's moments start at zero, as in any new run (not the source's moments)
    mu = [x for x in jax.tree.leaves(start.carry.opt_state) if x.ndim > 0]
    assert mu and all(not np.any(np.asarray(x)) for x in mu)

    summary = train_and_evaluate(_finetune(source, steps=3), str(tmp_path / "tuned"))
    assert summary["steps"] == 3 and summary["resumed_from"] is None
    assert summary["initialized_from"] == {"run": source, "step": 6}
    with open(tmp_path / "tuned" / "config.json") as f:
        assert json.load(f)["train"]["init_from"] == source


def _without_init(source: str):
    config = _finetune(source, steps=3)
    config.train.init_from = None
    return config


@pytest.mark.slow
def test_a_fine_tunes_resume_is_its_own_and_exact(source, tmp_path):
    straight = train_and_evaluate(_finetune(source, steps=6), str(tmp_path / "straight"))
    train_and_evaluate(_finetune(source, steps=3), str(tmp_path / "resumed"))
    resumed = train_and_evaluate(_finetune(source, steps=6), str(tmp_path / "resumed"))
    assert resumed["resumed_from"] == 3 and resumed["initialized_from"]["step"] == 6
    assert _equal(load_run(str(tmp_path / "straight")).state.params,
                  load_run(str(tmp_path / "resumed")).state.params)
    assert resumed["test_accuracy"] == straight["test_accuracy"]


def test_what_does_not_fit_is_refused_in_one_line(source, tmp_path):
    with pytest.raises(UserError, match=r"init_from=.*not this model's at \[.*"
                                        r"\(there \(4,\) float32, here \(8,\) "):
        build_run(_finetune(source, steps=3, width=8))
    with pytest.raises(UserError, match=r"train\.init_from=.*: .*holds no config\.json"):
        build_run(_finetune(str(tmp_path / "nowhere"), steps=3))
    population = _finetune(source, steps=3)
    population.population = (("optim.lr", (1e-3, 1e-4)),)
    with pytest.raises(UserError, match="a population cannot start from one run's weights"):
        build_run(population)
    population.train.init_from = None
    train_and_evaluate(population, str(tmp_path / "population"))
    with pytest.raises(UserError, match="holds a population of 2: start from a single run"):
        build_run(_finetune(str(tmp_path / "population"), steps=3))
    result = run_cli("train", "--config", "configs/digits_cnn.py", "--workdir",
                     str(tmp_path / "cli"), "--config.train.steps=2",
                     "--config.optim.warmup_steps=0", f"--config.train.init_from={source}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "not this model's" in result.stderr
