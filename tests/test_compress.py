"""Gradient compressors at the communication seam (`jaxopt_lab.techniques.compress`).

In-process, `jax.vmap(reduce, axis_name="data")` plays n devices: the reducers' collectives
(`pmean`, `all_gather`) bind to the vmapped axis exactly as to shard_map's. One subprocess test
runs them on 4 simulated CPU devices under `jax.shard_map`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ROOT, xla_flags
from jax.sharding import Mesh

from jaxopt_lab.core.state import create_train_state
from jaxopt_lab.core.step import DATA_AXIS, make_train_step
from jaxopt_lab.core.tasks import classification
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques import compress
from jaxopt_lab.techniques.compress.powersgd import initial_q, matrix_shape

METHODS = ("topk", "randomk", "powersgd", "signsgd", "qsgd", "int8")


def on_devices(reducer, grads, state=None, seed=0):
    """`reducer.reduce` on n devices (the leading axis of every gradient leaf); returns each
    device's (mean, state, stats)."""
    n = jax.tree.leaves(grads)[0].shape[0]
    if state is None:
        one = reducer.init(jax.tree.map(lambda g: g[0], grads))
        state = jax.tree.map(lambda x: jnp.stack([x] * n), one)
    keys = jax.random.split(jax.random.key(seed), n)
    run = jax.vmap(reducer.reduce, in_axes=(0, 0, 0, None), axis_name=DATA_AXIS)
    return jax.jit(run)(grads, state, keys, {})


def stacked(*trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def normal(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape)


def low_rank(seed, m, n, rank):
    return normal(seed, m, rank) @ normal(seed + 1, rank, n)


GRADS = {"dense": {"kernel": normal(1, 8, 16), "bias": normal(2, 16)},
         "conv": {"kernel": normal(3, 3, 4, 8)}}  # a conv kernel [width, in, out]


def test_topk_with_ratio_one_is_the_exact_mean():
    grads = stacked(*[jax.tree.map(lambda g, i=i: g * (i + 1) - i, GRADS) for i in range(4)])
    mean, _, _ = on_devices(compress.topk(1.0, min_size=0), grads)
    for got, g in zip(jax.tree.leaves(mean), jax.tree.leaves(grads), strict=True):
        for device in got:
            np.testing.assert_allclose(device, g.mean(0), rtol=1e-6, atol=1e-6)


def test_topk_keeps_the_k_largest_entries_of_each_tensor():
    mean, state, _ = on_devices(compress.topk(0.1, error_feedback=False, min_size=0),
                                stacked(GRADS))
    assert state == ()
    for got, g in zip(jax.tree.leaves(mean), jax.tree.leaves(GRADS), strict=True):
        got, g = np.asarray(got[0]).ravel(), np.asarray(g).ravel()
        k = math.ceil(0.1 * g.size)
        kept = np.flatnonzero(got)
        assert len(kept) == k
        np.testing.assert_array_equal(got[kept], g[kept])  # the values themselves
        assert set(kept) == set(np.argsort(-np.abs(g))[:k])  # of the largest magnitude


@pytest.mark.parametrize("method", ["topk", "randomk"])
def test_sparse_error_feedback_keeps_exactly_what_was_not_sent(method):
    reducer = compress.make_reducer(method, ratio=0.2, min_size=0)
    mean, state, _ = on_devices(reducer, stacked(GRADS), seed=1)
    first = state.residual
    assert any(np.any(e != 0) for e in jax.tree.leaves(first))
    later = jax.tree.map(lambda g: g * 0.5 + 1, GRADS)
    mean, state, _ = on_devices(reducer, stacked(later), state, seed=2)
    # One device: the mean is what it sent. Residual + sent == g + e, bit for bit.
    for e, sent, g, e0 in zip(*map(jax.tree.leaves, (state.residual, mean, later, first)),
                              strict=True):
        np.testing.assert_array_equal(e[0] + sent[0], g + e0[0])
        assert np.all((e[0] == 0) | (sent[0] == 0))  # each entry either sent or owed


@pytest.mark.parametrize("method", ["signsgd", "qsgd", "int8", "powersgd"])
def test_error_feedback_residual_plus_sent_is_the_corrected_gradient(method):
    reducer = compress.make_reducer(method, error_feedback=True, min_size=0, start_step=0,
                                    rank=1, levels=2)
    _, state, _ = on_devices(reducer, stacked(GRADS), seed=1)
    later = jax.tree.map(lambda g: g * 0.5 + 1, GRADS)
    mean, new, _ = on_devices(reducer, stacked(later), state, seed=2)
    for e, sent, g, e0 in zip(*map(jax.tree.leaves, (new.residual, mean, later, state.residual)),
                              strict=True):
        np.testing.assert_allclose(e[0] + sent[0], g + e0[0], rtol=1e-5, atol=1e-5)
    assert any(np.abs(e).max() > 1e-3 for e in jax.tree.leaves(new.residual))


def test_randomk_draws_its_own_indices_per_key_and_device():
    g = normal(5, 400)
    reducer = compress.randomk(0.05, error_feedback=False, min_size=0)
    picks = []
    for seed in (0, 1):
        mean, _, _ = on_devices(reducer, g[None], seed=seed)
        kept = np.flatnonzero(mean[0])
        assert len(kept) == 20
        np.testing.assert_array_equal(mean[0][kept], g[kept])
        picks.append(set(kept))
    assert picks[0] != picks[1]
    # Four devices with the same gradient and their own keys: the mean of four different picks.
    mean, _, _ = on_devices(reducer, jnp.stack([g] * 4))
    kept = np.flatnonzero(mean[0])
    assert 20 < len(kept) <= 80
    counts = np.round(np.asarray(mean[0])[kept] / np.asarray(g)[kept] * 4)  # devices that sent it
    assert counts.sum() == 80 and counts.min() >= 1 and counts.max() <= 4
    np.testing.assert_allclose(np.asarray(mean[0])[kept], np.asarray(g)[kept] * counts / 4,
                               rtol=1e-6)


def test_powersgd_reproduces_a_low_rank_mean_with_two_small_factors():
    grads = {"w": low_rank(0, 16, 12, 2), "conv": low_rank(2, 12, 8, 2).reshape(3, 4, 8),
             "b": normal(4, 12)}
    mean, state, stats = on_devices(compress.powersgd(2, start_step=0, min_size=0),
                                    stacked(grads))
    for got, g in zip(jax.tree.leaves(mean), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got[0], g, atol=2e-5)
    assert [q.shape for q in state.q] == [(1, 8, 2), (1, 12, 2)]  # conv, w in leaf order
    assert stats["comm_bytes"][0] == (16 + 12) * 2 * 4 + (12 + 8) * 2 * 4 + 12 * 4
    assert stats["comm_bytes_uncompressed"][0] == (16 * 12 + 96 + 12) * 4
    assert np.abs(state.residual["w"]).max() < 1e-4  # nothing owed: all was captured


def test_powersgd_is_a_plain_mean_before_start_step_then_compresses():
    grads = stacked(*[{"w": normal(i, 16, 12)} for i in range(3)])
    reducer = compress.powersgd(1, start_step=2, min_size=0)
    state = None
    for step in range(3):
        mean, state, stats = on_devices(reducer, grads, state)
        assert state.step.tolist() == [step + 1] * 3
        if step < 2:
            np.testing.assert_allclose(mean["w"][0], grads["w"].mean(0), rtol=1e-6, atol=1e-6)
            assert stats["comm_bytes"][0] == 16 * 12 * 4
            np.testing.assert_array_equal(state.q[0][0], initial_q(0, 12, 1))
            assert np.all(state.residual["w"] == 0)
        else:  # rank 1 of a full-rank mean: close but not equal, and every device agrees
            assert stats["comm_bytes"][0] == (16 + 12) * 1 * 4
            error = np.linalg.norm(mean["w"][0] - grads["w"].mean(0))
            assert 0 < error < np.linalg.norm(grads["w"].mean(0))
            np.testing.assert_array_equal(mean["w"][0], mean["w"][1])


def test_powersgd_sends_vectors_small_and_unprofitable_tensors_uncompressed():
    assert matrix_shape((100,), 2, 0) is None  # a bias
    assert matrix_shape((32, 32), 2, 2048) is None  # under min_size
    assert matrix_shape((4, 4), 2, 0) is None  # (4 + 4) * 2 floats are not fewer than 16
    assert matrix_shape((3, 4, 8), 2, 0) == (12, 8)  # a conv kernel, by its output channels
    mean, state, stats = on_devices(compress.powersgd(2, start_step=0), stacked(GRADS))
    assert state.q == () and stats["comm_bytes"][0] == stats["comm_bytes_uncompressed"][0]
    np.testing.assert_array_equal(mean["conv"]["kernel"][0], GRADS["conv"]["kernel"])


def test_signsgd_without_error_feedback_sends_the_scaled_sign():
    grads = stacked(*[jax.tree.map(lambda g, i=i: g + 0.3 * i, GRADS) for i in range(3)])
    mean, state, _ = on_devices(compress.signsgd(error_feedback=False, min_size=0), grads)
    assert state == ()
    for got, g in zip(jax.tree.leaves(mean), jax.tree.leaves(grads), strict=True):
        axes = tuple(range(1, g.ndim))
        scaled = np.mean(np.abs(g), axis=axes, keepdims=True) * np.sign(g)
        np.testing.assert_allclose(got[0], scaled.mean(0), rtol=1e-5, atol=1e-6)


def test_qsgd_is_unbiased_and_on_its_grid():
    g = normal(7, 50)
    reducer = compress.qsgd(4, min_size=0)
    runs = jax.vmap(lambda seed: on_devices(reducer, g[None], seed=seed)[0][0])(jnp.arange(4000))
    norm = np.linalg.norm(g)
    steps = np.asarray(runs) / (norm / 4)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)  # multiples of ||g|| / s
    assert np.abs(steps).max() <= 4 + 1e-4
    # Each draw is within one level of g, so the mean of 4000 is within ~4 standard errors.
    np.testing.assert_allclose(runs.mean(0), g, atol=4 * 0.5 * norm / 4 / math.sqrt(4000))
    assert not np.allclose(runs[0], runs[1])


def test_int8_round_trips_within_half_a_scale():
    g = normal(8, 300) * 3
    mean, _, _ = on_devices(compress.int8(min_size=0), g[None])
    scale = np.abs(g).max() / 127
    assert np.abs(mean[0] - g).max() <= scale / 2 * (1 + 1e-5)
    assert len(np.unique(np.round(np.asarray(mean[0]) / scale))) > 100


def expected_bytes(method, grads, min_size, ratio=0.1, rank=2, levels=16):
    """Bytes one device hands to collectives, counted from the shapes alone."""
    total = 0
    for g in jax.tree.leaves(grads):
        d = g.size
        if d < min_size or (method == "powersgd" and g.ndim < 2):
            total += 4 * d
        elif method in ("topk", "randomk"):
            total += 8 * math.ceil(ratio * d)  # int32 index + float32 value
        elif method == "powersgd":
            m, n = d // g.shape[-1], g.shape[-1]
            total += 4 * (m + n) * rank if (m + n) * rank < m * n else 4 * d
        elif method == "signsgd":
            total += math.ceil(d / 8) + 4  # packed bits + a float32 scale
        elif method == "qsgd":  # 2 levels + 1 symbols at ceil(log2(2 levels + 1)) bits
            total += math.ceil(d * math.ceil(math.log2(2 * levels + 1)) / 8) + 4
        else:
            total += d + 4  # int8 values + a float32 scale
    return total


@pytest.mark.parametrize("method", METHODS)
def test_bytes_are_what_is_handed_to_collectives(method):
    reducer = compress.make_reducer(method, ratio=0.1, rank=2, start_step=0, min_size=64)
    mean, state, stats = on_devices(reducer, stacked(GRADS))
    assert stats["comm_bytes"][0] == expected_bytes(method, GRADS, 64)
    assert stats["comm_bytes_uncompressed"][0] == 4 * (128 + 16 + 96)
    assert stats["comm_bytes"][0] < stats["comm_bytes_uncompressed"][0]
    np.testing.assert_array_equal(mean["dense"]["bias"][0], GRADS["dense"]["bias"])  # < min_size
    # The state keeps its structure, shapes and dtypes from step to step (it is checkpointed
    # and scanned).
    def spec(x):
        return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))

    assert jax.tree.map(spec, state) == jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((1, *jnp.shape(x)), jnp.result_type(x)),
        reducer.init(GRADS))


def test_make_reducer_defaults_and_bad_options():
    assert isinstance(compress.make_reducer("topk").init(GRADS), compress.ResidualState)
    assert compress.make_reducer("qsgd").init(GRADS) == ()  # unbiased: no error feedback
    assert compress.make_reducer("qsgd", error_feedback=True).init(GRADS) != ()
    assert compress.make_reducer("none").init(GRADS) == ()
    plain = compress.make_reducer("powersgd", error_feedback=False, start_step=0, min_size=0)
    mean, state, _ = on_devices(plain, stacked(GRADS))
    assert state.residual == () and state.step.tolist() == [1]
    assert np.linalg.norm(mean["conv"]["kernel"][0] - GRADS["conv"]["kernel"]) < np.linalg.norm(
        GRADS["conv"]["kernel"])
    mean, _, stats = on_devices(compress.make_reducer("none"), stacked(GRADS))
    assert stats["comm_bytes"][0] == stats["comm_bytes_uncompressed"][0] == 4 * 240
    np.testing.assert_array_equal(mean["dense"]["kernel"][0], GRADS["dense"]["kernel"])
    for options, culprit in [({"method": "zip"}, "method='zip'"), ({"ratio": 0}, "ratio=0"),
                             ({"ratio": 1.5}, "ratio=1.5"), ({"rank": 0}, "rank=0"),
                             ({"levels": 0}, "levels=0"), ({"start_step": -1}, "start_step"),
                             ({"min_size": 1.5}, "min_size"), ({"error_feedback": 1}, "error_f"),
                             ({"bogus": 1}, "'bogus'")]:
        with pytest.raises(UserError, match=culprit) as error:
            compress.make_reducer(**{"method": "topk", **options})
        assert "\n" not in str(error.value)
    assert "topk, randomk, powersgd" in str(pytest.raises(
        UserError, compress.make_reducer, "zip").value)
    with pytest.raises(UserError, match="ratio"):
        compress.topk(ratio=2.0)


class TinyNet(nn.Module):
    """A user's own module: no `train` argument, a conv and a dense layer."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3,))(x[..., None]))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("method", METHODS)
def test_a_compressor_plugs_into_the_train_step_and_trains(method):
    mesh = Mesh(np.array(jax.devices()[:1]), (DATA_AXIS,))
    x = np.asarray(normal(0, 64, 16))
    batch = {"x": x, "label": np.asarray(np.argmax(x[:, :3], axis=1), np.int32)}
    model = TinyNet()
    reducer = compress.make_reducer(method, ratio=0.1, rank=2, start_step=5, min_size=16)
    tx = optax.with_extra_args_support(optax.adam(1e-2))
    state = create_train_state(model, batch["x"][:1], tx, reducer.init, 1, seed=0)
    step = jax.jit(make_train_step(classification(model).loss_fn, reducer, tx, mesh))
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    leaves = jax.tree.leaves(state.params)
    assert float(metrics["comm_bytes"]) == expected_bytes(method, state.params, 16)
    assert float(metrics["comm_bytes_uncompressed"]) == 4 * sum(p.size for p in leaves)
    assert all(x.shape[0] == 1 for x in jax.tree.leaves(state.comm_state))


FOUR_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jaxopt_lab.core.step import DATA_AXIS
from jaxopt_lab.techniques import compress

assert jax.device_count() == 4
mesh = Mesh(np.array(jax.devices()), (DATA_AXIS,))
key = lambda i: jax.random.key(i)
u = jax.random.normal(key(0), (24, 2))
grads = {"w": jnp.stack([u @ jax.random.normal(key(i + 1), (2, 16)) for i in range(4)]),
         "b": jax.random.normal(key(9), (4, 40))}

def run(reducer, grads, state, keys, devices):
    def body(g, s, k):
        one = lambda t: jax.tree.map(lambda x: x[0], t)
        out, s, stats = reducer.reduce(one(g), one(s), k[0], {})
        return jax.tree.map(lambda x: x[None], (out, s, stats))
    if devices:  # shard_map over the 4 devices: each device's outputs come back stacked
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(DATA_AXIS),
                                     out_specs=P(DATA_AXIS), check_vma=False))(grads, state, keys)
    return jax.jit(jax.vmap(lambda g, s, k: jax.tree.map(lambda x: x[0], body(
        *jax.tree.map(lambda x: x[None], (g, s, k)))), axis_name=DATA_AXIS))(grads, state, keys)

for method in ("none", "topk", "randomk", "powersgd", "signsgd", "qsgd", "int8"):
    reducer = compress.make_reducer(method, ratio=0.1, rank=2, start_step=1, min_size=0)
    init = reducer.init(jax.tree.map(lambda x: x[0], grads))
    results = {}
    for devices in (True, False):
        state = jax.tree.map(lambda x: jnp.stack([x] * 4), init)
        for step in range(2):
            keys = jax.random.split(key(100 + step), 4)
            out, state, stats = run(reducer, grads, state, keys, devices)
        results[devices] = out
        for leaf in jax.tree.leaves(out):  # replicated: every device the same mean
            for d in range(1, 4):
                np.testing.assert_array_equal(leaf[d], leaf[0], err_msg=method)
    for a, b in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=method)
    if method in ("none", "powersgd"):  # rank 2 >= the rank of the mean of four rank-2 terms
        np.testing.assert_allclose(out["w"][0], grads["w"].mean(0), rtol=1e-4, atol=1e-5)
    print(method, "ok")

out, _, _ = run(compress.topk(1.0, min_size=0), grads,
                compress.topk(1.0).init(jax.tree.map(lambda x: x[0], grads)),
                jax.random.split(key(3), 4), True)
for got, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got[0], g.mean(0), rtol=1e-6, atol=1e-6)
print("all ok")
"""


@pytest.mark.slow
def test_every_reducer_is_replicated_and_exact_where_it_should_be_on_four_devices():
    env = dict(os.environ, XLA_FLAGS=xla_flags(4))
    result = subprocess.run([sys.executable, "-c", FOUR_DEVICES], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and "all ok" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-3000:])
