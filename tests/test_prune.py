"""Pruning's pieces: exact selection, every method on a model and optimizer defined here, the
patterns, ERK, the schedules, the population-uniform mask update, and the config block."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config

from jaxopt_lab import validate
from jaxopt_lab.core.layers import param_paths
from jaxopt_lab.core.population import MEMBER_AXIS
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques import prune
from jaxopt_lab.techniques.prune import masks as M
from jaxopt_lab.techniques.prune import schedule
from jaxopt_lab.techniques.prune.select import drop_smallest, float_keys


class TwoLayer(nn.Module):
    """A user's own module: nothing of the registry."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="hidden")(x))
        x = nn.relu(nn.Dense(24, name="middle")(x))
        return nn.Dense(5, name="out")(x)


X = jax.random.normal(jax.random.key(0), (64, 16))
Y = jax.random.randint(jax.random.key(1), (64,), 0, 5)
MODEL = TwoLayer()
PARAMS = MODEL.init(jax.random.key(2), X)["params"]


def _loss(params):
    logits = MODEL.apply({"params": params}, X)
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def _train(tx, steps=24, params=PARAMS):
    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state, history = tx.init(params), []
    for _ in range(steps):
        params, state = step(params, state)
        history.append((params, prune.find_state(state).masks))
    return params, state, history


def _kernels(tree):
    return {p: np.asarray(v) for p, v in zip(param_paths(tree), jax.tree.leaves(tree), strict=True)
            if p.endswith("['kernel']")}


@pytest.mark.parametrize("keys,k", [([3, 1, 2, 2, 0, 2], 3), ([5, 5, 5, 5], 2), ([1, 2], 0),
                                    ([1, 2], 2), ([0, 0, 7, 0], 2)])
def test_drop_smallest_drops_exactly_k_smallest_with_ties_by_position(keys, k):
    kept = np.asarray(jax.jit(drop_smallest)(jnp.array(keys, jnp.int32), jnp.int32(k)))
    assert (~kept).sum() == k
    if 0 < k < len(keys):
        assert max(np.array(keys)[~kept]) <= min(np.array(keys)[kept])


def test_float_keys_order_like_the_scores():
    scores = jnp.array([0.0, 1e-30, 3e-8, 0.5, 2.0, jnp.inf, jnp.nan, -1.0])
    keys = np.asarray(float_keys(scores))
    assert list(keys[:5]) == sorted(keys[:5]) and len(set(keys[:5])) == 5
    assert keys[6] == keys[7] == 0  # NaN and negatives count as zero scores


METHODS = {
    "magnitude": {"schedule": "gradual", "begin_step": 2, "end_step": 14, "frequency": 3},
    "magnitude_global": {"method": "magnitude", "scope": "global", "end_step": 14,
                         "frequency": 3},
    "magnitude_erk": {"method": "magnitude", "distribution": "erk", "end_step": 14,
                      "frequency": 3},
    "random": {"end_step": 14, "frequency": 3},
    "snip": {"schedule": "one_shot", "begin_step": 0},
    "set": {"schedule": "one_shot", "end_step": 20, "frequency": 4},
    "rigl": {"schedule": "one_shot", "end_step": 20, "frequency": 4},
    "ste": {"end_step": 14, "frequency": 2},
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_keeps_pruned_weights_exactly_zero_after_every_update(name):
    options = {"method": name, **METHODS[name]}
    tx = prune.wrap(optax.adamw(3e-2, weight_decay=1e-2), skip=(), sparsity=0.75, **options)
    params, _, history = _train(tx)
    for params_t, masks_t in history:
        for path, kernel in _kernels(params_t).items():
            mask = np.asarray(_kernels(masks_t)[path])
            assert np.all(kernel[~mask] == 0), (name, path)
    pruned = sum(int((~m).sum()) for m in _kernels(history[-1][1]).values())
    total = sum(k.size for k in _kernels(params).values())
    # The target is met exactly over all kernels (per layer, rounded, for layer scope); a kept
    # weight may be 0 too (one SET regrew where the gradient is 0 starts and stays there).
    assert abs(pruned / total - 0.75) < 3 / total, (name, pruned / total)
    assert _loss(params) < _loss(PARAMS)  # it trained


def test_sparse_training_changes_its_topology_at_a_fixed_sparsity():
    tx = prune.wrap(optax.adam(3e-2), skip=(), method="rigl", schedule="one_shot",
                    sparsity=0.8, end_step=20, frequency=4)
    _, _, history = _train(tx)
    first, last = _kernels(history[0][1]), _kernels(history[-1][1])
    for path in first:
        assert first[path].sum() == last[path].sum()  # the same number kept
        assert (first[path] != last[path]).any()  # but not the same ones


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_a_regrown_weight_starts_with_no_optimizer_state(method):
    # Momentum built from gradients taken while a weight was pruned must not move it once regrown.
    tx = prune.wrap(optax.sgd(3e-2, momentum=0.9), skip=(), method=method,
                    schedule="one_shot", sparsity=0.8, end_step=20, frequency=4)
    state, params = tx.init(PARAMS), PARAMS
    step_fn = jax.jit(tx.update)
    for step in range(9):
        before = _kernels(prune.find_state(state).masks)
        updates, state = step_fn(jax.grad(_loss)(params), state, params)
        params = optax.apply_updates(params, updates)
        if step in (4, 8):  # the topology updates (every 4 updates after the first cut)
            after = _kernels(prune.find_state(state).masks)
            trace = _kernels(prune.find_state(state).inner[0].trace)
            grown = {p: after[p] & ~before[p] for p in after}
            assert sum(int(g.sum()) for g in grown.values()) > 0
            for path, new in grown.items():
                assert np.all(trace[path][new] == 0), (method, step, path)
                assert np.count_nonzero(trace[path][after[path] & before[path]]) > 0


def test_ste_trains_the_dense_weights_behind_the_mask():
    tx = prune.wrap(optax.adam(3e-2), skip=(), method="ste", sparsity=0.8, end_step=30,
                    frequency=1, schedule="one_shot")
    params, state, _ = _train(tx, steps=10)
    dense = _kernels(prune.find_state(state).dense)
    for path, kernel in _kernels(params).items():
        assert (kernel == 0).mean() == pytest.approx(0.8, abs=0.01)
        assert np.count_nonzero(dense[path]) > np.count_nonzero(kernel)  # held, not zeroed


def test_n_of_m_keeps_n_largest_of_every_m_along_the_input():
    tx = prune.wrap(optax.sgd(0.1), skip=(), pattern="2:4", schedule="one_shot", begin_step=0)
    params, _, _ = _train(tx, steps=3)
    for kernel in _kernels(params).values():
        groups = kernel.reshape(-1, 4, kernel.shape[-1])
        assert np.all((groups != 0).sum(axis=1) == 2)


def smallest_first(weights, grads):
    """A score of this test's own, the opposite of magnitude: the smallest weights are kept."""
    del grads
    return {path: 1.0 / (jnp.abs(w) + 1e-6) for path, w in weights.items()}


def test_a_score_of_your_own_named_by_import_path_decides_the_mask():
    tx = prune.wrap(optax.sgd(0.0), skip=(), sparsity=0.5, schedule="one_shot", begin_step=0,
                    method="test_prune:smallest_first")
    params, _, _ = _train(tx, steps=2)
    for path, kernel in _kernels(params).items():
        original = np.abs(_kernels(PARAMS)[path])
        kept = kernel != 0
        assert kept.mean() == pytest.approx(0.5, abs=0.01), path
        assert original[kept].max() <= original[~kept].min(), path
    with pytest.raises(UserError, match="ranks filters"):
        prune.wrap(optax.sgd(0.1), skip=(), pattern="channels", model=MODEL, sample_x=X,
                   method="test_prune:smallest_first")


def test_n_of_m_names_a_layer_whose_inputs_do_not_divide():
    tx = prune.wrap(optax.sgd(0.1), skip=(), pattern="1:3", schedule="one_shot")
    with pytest.raises(UserError, match=r"layer \['hidden'\]\['kernel'\] has 16 inputs"):
        tx.init(PARAMS)


def test_channels_take_their_bias_with_them():
    groups = [M.ChannelMembers(name, ((f"['{name}']['kernel']", 1), (f"['{name}']['bias']", 0)),
                               size) for name, size in (("hidden", 32), ("middle", 24))]
    tx = prune.wrap(optax.adam(1e-2), skip=(), groups=groups, pattern="channels",
                    schedule="one_shot", begin_step=0, sparsity=0.5, norm="l2")
    params, _, _ = _train(tx, steps=4)
    for name, size in (("hidden", 32), ("middle", 24)):
        kernel, bias = np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])
        removed = np.all(kernel == 0, axis=0)
        assert removed.sum() == size // 2
        assert np.all(bias[removed] == 0) and np.all(bias[~removed] != 0)
    assert np.count_nonzero(params["out"]["kernel"] == 0) == 0  # consumers are not masked


def test_erk_keeps_small_layers_denser_and_meets_the_total():
    layout = M.Layout(("a", "b", "c"), {"a": (16, 32), "b": (256, 256), "c": (256, 8)})
    per_layer = {k: float(v) for k, v in M.layer_sparsities(layout, jnp.float32(0.9),
                                                            "erk").items()}
    sizes = {"a": 512, "b": 65536, "c": 2048}
    total = sum(per_layer[k] * sizes[k] for k in sizes) / sum(sizes.values())
    assert total == pytest.approx(0.9, abs=1e-5)
    # density ∝ (sum of dims) / (product of dims): c (256 × 8) > a (16 × 32) > b (256 × 256)
    assert per_layer["c"] < per_layer["a"] < per_layer["b"]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_every_pruned_tensor_keeps_at_least_its_largest_weight(scope):
    # jaxpruner's rule: max(1, round(n (1 - s))) kept per tensor. A [32, 1] kernel at 0.99 keeps
    # its largest weight, not none; a big layer beside it keeps its share.
    layout = M.Layout(("small", "big"), {"small": (32, 1), "big": (64, 64)})
    scores = {p: jax.random.uniform(jax.random.key(i), shape)
              for i, (p, shape) in enumerate(layout.shapes.items())}
    for sparsity in (0.5, 0.97, 0.99, 1.0):
        masks = jax.jit(lambda s: M.unstructured(scores, layout, s, scope, "uniform"))(
            jnp.float32(sparsity))
        small = np.asarray(masks["small"])
        if scope == "layer":
            for p, mask in masks.items():
                n = mask.size
                assert int(mask.sum()) == max(1, round(n * (1 - sparsity))), (p, sparsity)
        assert small.sum() >= 1 and small[np.asarray(scores["small"]).argmax()], sparsity
        assert np.asarray(masks["big"]).sum() >= 1


def test_gradual_schedule_is_cubic_between_begin_and_end():
    o = prune.prune_options(sparsity=0.8, initial_sparsity=0.1, begin_step=10, end_step=30,
                            frequency=5)
    at = lambda t: float(schedule.sparsity_at(o, jnp.int32(t), jnp.float32(0.8)))
    assert at(9) == 0.0 and at(10) == pytest.approx(0.1) and at(30) == pytest.approx(0.8)
    assert at(20) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5**3)
    due = [t for t in range(40) if schedule.due(o, jnp.int32(t))]
    assert due == [10, 15, 20, 25, 30]


def test_a_population_of_targets_equals_each_alone_and_recomputes_masks_only_when_due():
    tx = prune.wrap(optax.adam(1e-2), skip=(), sparsity=0.5, end_step=8, frequency=4)
    targets = jnp.array([0.0, 0.5, 0.9])

    def update(params, state):
        updates, state = tx.update(jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    def member(target):
        state = tx.init(PARAMS)
        return state._replace(hyperparams={"sparsity": target})

    stacked = jax.vmap(member)(targets)
    params = jax.tree.map(lambda a: jnp.stack([a] * 3), PARAMS)
    vmapped = jax.jit(jax.vmap(update, axis_name=MEMBER_AXIS))
    alone = [(PARAMS, member(t)) for t in targets]
    for _ in range(10):
        params, stacked = vmapped(params, stacked)
        alone = [jax.jit(update)(*a) for a in alone]
    for i, (p, _) in enumerate(alone):
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(p), strict=True):
            np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-7)
    jaxpr = str(jax.make_jaxpr(jax.vmap(update, axis_name=MEMBER_AXIS))(params, stacked))
    assert "cond[" in jaxpr  # the masks are recomputed under a branch, not at every step


def test_the_default_skip_needs_the_model():
    with pytest.raises(UserError, match="needs model= and sample_x="):
        prune.wrap(optax.sgd(0.1))
    tx = prune.wrap(optax.sgd(0.1), model=MODEL, sample_x=X[:1], sparsity=0.5,
                    schedule="one_shot")
    params, _, _ = _train(tx, steps=2)
    sparsities = {p: (k == 0).mean() for p, k in _kernels(params).items()}
    assert sparsities["['middle']['kernel']"] == 0.5
    assert sparsities["['hidden']['kernel']"] == sparsities["['out']['kernel']"] == 0.0


@pytest.mark.parametrize("key,value,message", [
    ("method", "prune_it", "techniques.prune.method='prune_it' is unknown"),
    ("pattern", "4:2", "needs 0 < N < M"),
    ("sparsity", 1.0, "techniques.prune.sparsity=1.0 must be a number in [0, 1)"),
    ("scope", "global", "pattern='channels' is layer-wise"),
    ("schedule", "gradual", "method='rigl' trains at a fixed sparsity"),
    ("frequency", 0, "techniques.prune.frequency=0 must be >= 1"),
])
def test_bad_prune_config_is_one_line_naming_the_key(key, value, message):
    config = tiny_config("mlp")
    config.techniques.prune.method = "rigl" if key == "schedule" else "magnitude"
    config.techniques.prune.schedule = "one_shot"
    if key == "scope":
        config.techniques.prune.pattern = "channels"
    config.techniques.prune[key] = value
    with pytest.raises(UserError, match=re.escape(message)):
        validate(config)


def test_a_sparsity_population_needs_pruning_on(tmp_path):
    from jaxopt_lab import train_and_evaluate

    config = tiny_config("mlp")
    config.population = (("techniques.prune.sparsity", (0.5, 0.9)),)
    with pytest.raises(UserError, match="techniques.prune.sparsity needs techniques.prune"):
        train_and_evaluate(config, str(tmp_path / "run"))
