"""Seam conformance: each seam takes a custom piece and the step really uses it.

The same checks run on 1 device here and on 4 simulated devices in a subprocess
(`test_seams_hold_on_four_devices`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ROOT, tiny_config, xla_flags

from jaxopt_lab import build_experiment
from jaxopt_lab.core.checkpoint import Checkpointer
from jaxopt_lab.core.distributed import data_mesh
from jaxopt_lab.core.feed import device_sampler, make_train_fn, replicate
from jaxopt_lab.core.optim import build_optimizer
from jaxopt_lab.core.population import (
    set_values,
    stack_trials,
    unstack_trials,
    vmap_over_trials,
)
from jaxopt_lab.core.state import TrainState, create_train_state
from jaxopt_lab.core.step import DATA_AXIS, Reducer, make_train_step
from jaxopt_lab.core.tasks import classification
from jaxopt_lab.data.sources import load_dataset
from jaxopt_lab.models import build_model

EXPECTED_DEVICES = int(os.environ.get("JAXOPT_LAB_EXPECT_DEVICES", "1"))


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist1d")


def _state(model, tx, mesh, data, reducer_init=lambda p: (), seed=0):
    sample_x = jnp.zeros((1, *data.input_shape))
    return create_train_state(model, sample_x, tx, reducer_init, mesh.size, seed)


def classification_loss(model):
    return classification(model).loss_fn


def _run(step, state, data, mesh, steps):
    fn = make_train_fn(step, 1, device_sampler(len(data.train["label"]), 100, mesh))
    source = replicate(data.train, mesh)
    metrics = []
    for _ in range(steps):
        state, m = fn(state, source)
        metrics.append(jax.device_get(m))
    return state, metrics


def _pmean():
    from jaxopt_lab.core.step import pmean_reducer
    return pmean_reducer()


def test_mesh_has_the_expected_devices():
    assert data_mesh().size == EXPECTED_DEVICES


def test_default_step_communicates_only_across_devices(data):
    """One device: no collective in the compiled step (XLA would keep a one-device all-reduce as
    a copy per array); more devices: the gradients and metrics are all-reduced."""
    mesh = data_mesh()
    model = build_model("mlp", 10)
    tx = optax.with_extra_args_support(optax.adam(1e-2))
    step = make_train_step(classification_loss(model), _pmean(), tx, mesh)
    fn = make_train_fn(step, 1, device_sampler(len(data.train["label"]), 100, mesh))
    hlo = fn.lower(_state(model, tx, mesh, data), replicate(data.train, mesh)).compile().as_text()
    assert ("all-reduce" in hlo) == (mesh.size > 1)


def test_custom_loss_wrapper_changes_what_the_step_optimizes(data):
    """A wrapper that replaces the task loss by 0.5*|params|^2: one SGD step scales params by 1-lr."""
    mesh = data_mesh()
    model = build_model("mlp", 10)
    task = classification_loss(model)

    def l2_only(params, model_state, batch, rng, hparams):
        _, aux = task(params, model_state, batch, rng, hparams)
        return 0.5 * sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params)), aux

    tx = optax.with_extra_args_support(optax.sgd(0.1))
    state = _state(model, tx, mesh, data)
    before = jax.device_get(state.params)
    state, metrics = _run(make_train_step(l2_only, _pmean(), tx, mesh), state, data, mesh, 1)
    after = jax.device_get(state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 0.9 * b, rtol=1e-5, atol=1e-7),
                 after, before)
    expected_loss = 0.5 * sum(np.sum(p ** 2) for p in jax.tree.leaves(before))
    assert metrics[0]["loss"][0] == pytest.approx(expected_loss, rel=1e-5)


class CountState(NamedTuple):
    calls: jax.Array  # int32 scalar, per device
    bytes_sent: jax.Array  # float32 scalar, per device


def bf16_mean_reducer() -> Reducer:
    """Casts gradients to bfloat16 for the all-reduce and counts calls and bytes sent."""

    def init(params):
        del params
        return CountState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

    def reduce(grads, state, rng, hparams):
        del rng, hparams
        low = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
        nbytes = sum(g.size * 2 for g in jax.tree.leaves(low))
        mean = jax.tree.map(lambda g: jax.lax.pmean(g, DATA_AXIS).astype(jnp.float32), low)
        state = CountState(state.calls + 1, state.bytes_sent + nbytes)
        return mean, state, {"comm_bytes": jnp.float32(nbytes)}

    return Reducer(init, reduce)


def test_custom_reducer_is_used_and_its_state_advances_and_checkpoints(data, tmp_path):
    mesh = data_mesh()
    model = build_model("mlp", 10)
    tx = optax.with_extra_args_support(optax.adam(1e-2))
    reducer = bf16_mean_reducer()
    state = _state(model, tx, mesh, data, reducer.init)
    state, metrics = _run(make_train_step(classification_loss(model), reducer, tx, mesh),
                          state, data, mesh, 3)
    num_params = sum(p.size for p in jax.tree.leaves(state.params))
    assert metrics[-1]["comm_bytes"][0] == 2 * num_params  # bf16: half of float32's bytes
    np.testing.assert_array_equal(state.comm_state.calls, [3] * mesh.size)
    np.testing.assert_allclose(state.comm_state.bytes_sent, [3 * 2 * num_params] * mesh.size)

    checkpointer = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    checkpointer.save(3, state)
    checkpointer.wait()
    fresh = _state(model, tx, mesh, data, reducer.init)
    restored, step = checkpointer.restore(fresh)
    checkpointer.close()
    assert step == 3
    np.testing.assert_array_equal(restored.comm_state.calls, [3] * mesh.size)


class MaskState(NamedTuple):
    inner: optax.OptState
    mask: optax.Params  # bool, like params: True = kept


def keep_largest_half(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """A pruning-shaped wrapper: the mask is optimizer state; masked weights are held at zero."""

    def init(params):
        def half(p):
            return jnp.abs(p) >= jnp.median(jnp.abs(p))

        return MaskState(inner.init(params), jax.tree.map(half, params))

    def update(updates, state, params):
        updates, inner_state = inner.update(updates, state.inner, params)
        updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, state.mask)
        return updates, MaskState(inner_state, state.mask)

    return optax.GradientTransformation(init, update)


def test_masking_optax_wrapper_keeps_masked_params_at_zero(data):
    mesh = data_mesh()
    model = build_model("mlp", 10)
    tx = optax.with_extra_args_support(keep_largest_half(optax.adam(1e-2)))
    state = _state(model, tx, mesh, data)
    state, _ = _run(make_train_step(classification_loss(model), _pmean(), tx, mesh),
                    state, data, mesh, 5)
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.opt_state.mask)):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
        assert np.any(np.asarray(p)[np.asarray(m)] != 0.0)


class ZeroDot(nn.Module):
    """A dot_general that returns zeros: if the step uses it, every logit is 0 and loss = ln 10."""

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                  preferred_element_type=preferred_element_type)
        return jnp.zeros_like(out)


def test_model_built_with_custom_dot_general_calls_it_in_the_step(data):
    mesh = data_mesh()
    model = build_model("mlp", 10, dot_general_cls=ZeroDot)
    tx = optax.with_extra_args_support(optax.adam(1e-2))
    state = _state(model, tx, mesh, data)
    # Zero the biases, so a used ZeroDot makes every logit exactly 0.
    state = state.replace(params=jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.zeros_like(p) if path[-1].key == "bias" else p, state.params))
    _, metrics = _run(make_train_step(classification_loss(model), _pmean(), tx, mesh),
                      state, data, mesh, 1)
    assert metrics[0]["loss"][0] == pytest.approx(np.log(10.0), rel=1e-6)


def test_vmapped_population_matches_trials_run_one_by_one(data):
    """Four trials (different learning rates and seeds) as one vmapped program."""
    mesh = data_mesh()
    config = tiny_config("mlp")
    experiment = build_experiment(config, data)
    tx = build_optimizer(config.optim, steps=10)
    step = make_train_step(experiment.loss_fn, experiment.reducer, tx, mesh)
    lrs, seeds = [1e-3, 3e-3, 1e-2, 3e-2], [0, 1, 2, 3]
    trials = [set_values(_state(experiment.model, tx, mesh, data, seed=s), {"optim.lr": lr})
              for lr, s in zip(lrs, seeds)]
    sample = device_sampler(len(data.train["label"]), 100, mesh)
    source = replicate(data.train, mesh)
    population = stack_trials(trials)  # a copy: running a trial alone donates its state

    one_by_one = []
    for trial in trials:
        fn = make_train_fn(step, 1, sample)
        for _ in range(10):
            trial, _ = fn(trial, source)
        one_by_one.append(jax.device_get(trial.params))

    fn = vmap_over_trials(make_train_fn(step, 1, sample))
    for _ in range(10):
        population, metrics = fn(population, source)
    assert metrics["loss"].shape == (4, 1)
    for alone, together in zip(one_by_one, unstack_trials(jax.device_get(population.params))):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                     alone, together)
    first, last = jax.device_get(unstack_trials(population.params)[0]), one_by_one[-1]
    assert not np.allclose(jax.tree.leaves(first)[0], jax.tree.leaves(last)[0])


class KeyState(NamedTuple):
    key_data: jax.Array  # uint32 [2]: the key this device's reducer got last step


def key_recording_reducer() -> Reducer:
    """Records its key and passes hparams["scale"] out as a stat: both hooks reach the reducer."""

    def init(params):
        del params
        return KeyState(jnp.zeros((2,), jnp.uint32))

    def reduce(grads, state, rng, hparams):
        del state
        return jax.lax.pmean(grads, DATA_AXIS), KeyState(jax.random.key_data(rng)), {
            "scale": hparams["scale"]}

    return Reducer(init, reduce)


def test_reducer_gets_a_key_per_step_and_device_and_the_hparams(data):
    mesh = data_mesh()
    model = build_model("mlp", 10)
    tx = optax.with_extra_args_support(optax.sgd(0.1))
    reducer = key_recording_reducer()
    step = make_train_step(classification_loss(model), reducer, tx, mesh)
    sample_x = jnp.zeros((1, *data.input_shape))
    state = create_train_state(model, sample_x, tx, reducer.init, mesh.size, 0,
                               hparams={"scale": 0.25})
    state, first = _run(step, state, data, mesh, 1)
    keys_1 = np.asarray(state.comm_state.key_data)
    state, _ = _run(step, state, data, mesh, 1)
    keys_2 = np.asarray(state.comm_state.key_data)
    assert first[0]["scale"][0] == 0.25
    assert len({k.tobytes() for k in keys_1}) == mesh.size  # one key per device
    assert not (keys_1 == keys_2).all(axis=1).any()  # a new key every step


def test_loss_aux_carries_augmented_inputs_and_requested_intermediates(data):
    from jaxopt_lab.data.augment import make_augment

    model = build_model("mlp", 10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 40)))["params"]
    batch = {"x": jnp.asarray(data.train["x"][:8]), "label": jnp.asarray(data.train["label"][:8])}
    task = classification(model, make_augment(noise=0.5), capture=("Dense_0", "Dense_2"))
    _, aux = task.loss_fn(params, {}, batch, jax.random.key(1), {})
    assert not np.allclose(aux["inputs"], batch["x"])  # the augmented inputs, not the batch's
    # What the teacher of a distillation would compute from them is what the student saw.
    np.testing.assert_allclose(model.apply({"params": params}, aux["inputs"]), aux["logits"],
                               rtol=1e-6)
    assert set(aux["intermediates"]) == {"Dense_0", "Dense_2"}
    assert aux["intermediates"]["Dense_0"].shape == (8, 100)
    np.testing.assert_allclose(aux["intermediates"]["Dense_2"], aux["logits"], rtol=1e-6)
    _, plain = classification(model).loss_fn(params, {}, batch, jax.random.key(1), {})
    np.testing.assert_array_equal(plain["inputs"], batch["x"])
    assert "intermediates" not in plain


class NoisyDense(nn.Module):
    """Draws from the "params" stream at apply time, as AQT's stochastic rounding does."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train=False):
        noise = jax.random.normal(self.make_rng("params"), x.shape) if train else 0.0
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1) + noise)


def test_model_apply_gets_the_params_stream_and_state_metrics_reach_the_step(data):
    mesh = data_mesh()
    model = NoisyDense(10)
    tx = optax.with_extra_args_support(optax.sgd(0.1))

    def kernel_norm(state):
        return {"kernel_norm": optax.global_norm(state.params["Dense_0"]["kernel"])}

    step = make_train_step(classification_loss(model), _pmean(), tx, mesh, kernel_norm)
    state = _state(model, tx, mesh, data)
    state, metrics = _run(step, state, data, mesh, 2)
    assert metrics[0]["loss"][0] != metrics[1]["loss"][0]
    expected = np.linalg.norm(np.asarray(state.params["Dense_0"]["kernel"]))
    assert metrics[1]["kernel_norm"][0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop",
                                  "lamb"])
def test_every_optimizer_takes_its_values_from_the_state(name):
    """lr, weight decay, momentum and warmup are injected: set per state, they change the update
    (momentum only where the optimizer has one)."""
    config = tiny_config("mlp")
    config.optim.name = name
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_steps = 2
    tx = build_optimizer(config.optim, steps=10, swept=("optim.weight_decay",))
    params = {"w": jnp.ones((3,))}
    gradients = [{"w": jnp.asarray(g)} for g in ([0.1, -0.2, 0.3], [-0.3, 0.1, 0.2], [1., 2., 3.])]

    @jax.jit
    def three_updates(opt_state):  # different gradients: Adam's momentum shows only then; three,
        # as the warmup's first learning rate is 0
        for grads in gradients:
            updates, opt_state = tx.update(grads, opt_state, params, value=jnp.float32(1.0))
        return updates

    base = TrainState(step=0, params=params, opt_state=tx.init(params), model_state={},
                      comm_state=(), rng=0, data_rng=0, hparams={})
    reference = three_updates(base.opt_state)["w"]
    for key, value in (("optim.lr", 0.5), ("optim.weight_decay", 0.3), ("optim.warmup_steps", 7.0),
                       ("optim.momentum", 0.1)):
        changed = three_updates(set_values(base, {key: value}).opt_state)["w"]
        if key == "optim.momentum" and name == "sgd":
            np.testing.assert_array_equal(changed, reference)
        else:
            assert not np.allclose(changed, reference), key


@pytest.mark.slow
@pytest.mark.skipif(EXPECTED_DEVICES != 1, reason="this is the launcher of the 4-device run")
def test_seams_hold_on_four_devices():
    env = dict(os.environ, XLA_FLAGS=xla_flags(4),
               JAXOPT_LAB_EXPECT_DEVICES="4")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / __file__),
         "-k", "not four_devices"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    # Every other test ran there (parametrized ones count once per case), none skipped.
    others = [name for name in globals() if name.startswith("test_") and "four_devices" not in name]
    passed = int(re.search(r"(\d+) passed", result.stdout).group(1))
    assert passed >= len(others) and "skipped" not in result.stdout, result.stdout[-2000:]
