"""Width-masked NAS populations: a member computes what its shrunk model computes, trains in a
population as it trains alone, keeps its masked channels at exactly 0, and a width beyond the
widest model is refused."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import tiny_config

from jaxopt_lab import load_run, model_config, train_and_evaluate
from jaxopt_lab.core.tasks import inference
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import CNN1D, MLP, ResNet
from jaxopt_lab.techniques.prune import find_state, shrink
from jaxopt_lab.techniques.prune.groups import wiring
from jaxopt_lab.workflows.nas import (
    grow,
    narrow_model,
    shrunk_member,
    start_population,
    train_widths,
    width_config,
    width_masks,
)

WIDTHS = [(2, 5, 8), (8, 3, 1)]  # the widest CNN has 8 channels in each of its three convs
SEEDS = [0, 1]


def _config(steps: int = 20):
    config = tiny_config("cnn1d", steps=steps, measure=False)
    config.model = model_config("cnn1d", channels=8)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The population of WIDTHS, its first member trained alone (a population of one), and
    that member's narrow model trained alone from the same seed."""
    together, alone, narrow_dir = (str(tmp_path_factory.mktemp(name))
                                   for name in ("together", "alone", "narrow"))
    summary = train_widths(width_config(_config(), WIDTHS, SEEDS), WIDTHS, together)
    train_widths(width_config(_config(), WIDTHS[:1], SEEDS[:1]), WIDTHS[:1], alone)
    narrow = _config()
    narrow.model, narrow.seed = model_config("cnn1d", channels=WIDTHS[0]), SEEDS[0]
    train_and_evaluate(narrow, narrow_dir)
    return summary, load_run(together), load_run(alone), load_run(narrow_dir)


def _member(state, i):
    return jax.tree.map(lambda a: np.asarray(a[i]), state)


@pytest.mark.slow  # the `runs` fixture: 4 loop runs, ~30 s with a warm compile cache
def test_a_member_computes_what_its_shrunk_model_computes(runs):
    summary, run, _, _ = runs
    x = run.dataset.validation["x"][:200]
    for i, widths in enumerate(WIDTHS):
        model, variables = shrunk_member(run, i)
        assert model.channels == widths
        masked = inference(run.experiment.model)({"params": _member(run.state.params, i)}, x)
        np.testing.assert_allclose(inference(model)(variables, x), masked, atol=1e-5)
        assert "validation_accuracy" in summary["members"][i]  # selection reads validation


@pytest.mark.slow  # the `runs` fixture: 4 loop runs, ~30 s with a warm compile cache
def test_a_member_trains_in_the_population_as_it_trains_alone(runs):
    _, together, alone, _ = runs
    for got, want in zip(jax.tree.leaves(_member(together.state.params, 0)),
                         jax.tree.leaves(_member(alone.state.params, 0)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the `runs` fixture: 4 loop runs, ~30 s with a warm compile cache
def test_a_member_trains_as_its_narrow_model_trained_alone(runs):
    _, together, _, narrow = runs
    model, variables = shrunk_member(together, 0)
    assert model == narrow.experiment.model
    for got, want in zip(jax.tree.leaves(variables["params"]),
                         jax.tree.leaves(narrow.state.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the `runs` fixture: 4 loop runs, ~30 s with a warm compile cache
def test_masked_channels_stay_exactly_zero_and_the_masks_never_change(runs):
    _, run, _, _ = runs
    assert run.step == 20
    groups = wiring(run.experiment.model, _member(run.state.params, 0))
    for i, widths in enumerate(WIDTHS):
        params = _member(run.state.params, i)
        masks = find_state(_member(run.state.opt_state, i)).masks
        expected = width_masks(jax.tree.map(lambda m: np.ones(np.shape(m), bool), masks),
                               groups, widths)
        for p, m, e in zip(jax.tree.leaves(params), jax.tree.leaves(masks),
                           jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(m, e)
            assert np.all(np.where(m, 0, p) == 0)  # masked: exactly 0
        conv1 = params["Conv_1"]["kernel"]  # reads Conv_0's channels: rows past its width are 0
        assert np.all(conv1[:, widths[0]:, :] == 0)


@pytest.mark.parametrize("model, widths", [
    (CNN1D(num_classes=10, channels=(6, 7, 4)), (3, 1, 4)),
    (MLP(num_classes=10, hidden=(12, 9)), (5, 9)),
    (ResNet(num_classes=10, depth=8, width=4), (2, 3, 8, 1, 5, 7)),
])
def test_grow_places_the_narrow_model_where_surgery_takes_it_back(model, widths):
    x = np.zeros((1, *((32, 32, 3) if isinstance(model, ResNet) else (40,))), np.float32)
    wide = jax.tree.map(lambda s: np.ones(s.shape, s.dtype),
                        jax.eval_shape(model.init, jax.random.key(0), x))
    groups = wiring(model, wide["params"])
    narrow = narrow_model(model, wide["params"], groups, widths)
    shapes = jax.eval_shape(narrow.init, jax.random.key(0), x)
    rng = np.random.default_rng(0)
    small = jax.tree.map(lambda s: rng.uniform(0.5, 1.0, s.shape).astype(s.dtype), shapes)
    grown = grow(wide, small, groups, widths)
    cut_model, cut = shrink(model, grown)
    assert cut_model == narrow
    for got, want in zip(jax.tree.leaves(cut), jax.tree.leaves(small), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_width_beyond_the_widest_model_is_refused_in_one_line(tmp_path):
    config = width_config(_config(), [(9, 8, 8)], [0])
    with pytest.raises(UserError, match=r"^nas width 9 for Conv_0 must be an int in \[1, 8\]"):
        start_population(config, [(9, 8, 8)], str(tmp_path))
    with pytest.raises(UserError, match="one width per channel group: Conv_0, Conv_1, Conv_2"):
        start_population(config, [(8, 8)], str(tmp_path))
    pruned = _config()
    pruned.techniques.prune.method = "magnitude"
    with pytest.raises(UserError, match="techniques.prune holds the width masks"):
        width_config(pruned, [(8, 8, 8)], [0])
