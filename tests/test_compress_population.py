"""Compression ratios and ranks as per-trial values of a population: each member compresses as it
would alone, and reports its own bytes.

The reducer's checks vmap it over a member axis (hparams per member) around a vmap over 2
devices, as a population's step does; the run checks train a population and its members alone.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from jaxopt_lab import train_and_evaluate, validate
from jaxopt_lab.core.population import MEMBER_AXIS
from jaxopt_lab.core.step import DATA_AXIS
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques import compress
from jaxopt_lab.techniques.compress.options import RANK, RATIO

DEVICES = 2


def normal(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape)


def _stack(tree, n):
    return jax.tree.map(lambda x: jnp.stack([x] * n), tree)


def _steps(reducer, grads, hparams=None, members=None, steps=3):
    """`steps` reductions of the same per-device `grads` on DEVICES devices; with `members`, as
    that many population members (hparams: one value per member). Each step's (mean, state,
    stats), every leaf [devices, ...], or [members, devices, ...]."""
    state = _stack(reducer.init(jax.tree.map(lambda g: g[0], grads)), DEVICES)
    run = jax.vmap(reducer.reduce, in_axes=(0, 0, 0, None), axis_name=DATA_AXIS)
    if members:
        state = _stack(state, members)
        run = jax.vmap(run, in_axes=(None, 0, None, 0), axis_name=MEMBER_AXIS)
    run, out = jax.jit(run), []
    for step in range(steps):
        keys = jax.random.split(jax.random.key(step), DEVICES)
        mean, state, stats = run(grads, state, keys, hparams or {})
        out.append((mean, state, stats))
    return out


# Coarse values: many ties in magnitude, which top_k breaks by index alike at every k.
SPARSE = {"a": jnp.round(normal(1, DEVICES, 1000) * 4) / 4, "b": normal(2, DEVICES, 30, 10),
          "c": normal(3, DEVICES, 7)}


@pytest.mark.parametrize("method", ["topk", "randomk"])
def test_members_of_a_ratio_population_send_and_owe_exactly_what_they_would_alone(method):
    ratios = (0.01, 0.1)
    population = _steps(compress.make_reducer(method, ratio=ratios, min_size=10), SPARSE,
                        {RATIO: jnp.asarray(ratios)}, members=2)
    for i, ratio in enumerate(ratios):
        alone = _steps(compress.make_reducer(method, ratio=ratio, min_size=10), SPARSE)
        for (mean, state, stats), (want, want_state, want_stats) in zip(population, alone):
            for got, expected in zip(jax.tree.leaves((mean, state)),
                                     jax.tree.leaves((want, want_state)), strict=True):
                np.testing.assert_array_equal(got[i], expected)
            # its own k of "a" and "b" (int32 index + float32 value each) + "c" as it is
            own = 8 * {0.01: 10 + 3, 0.1: 100 + 30}[ratio] + 4 * 7
            assert stats["comm_bytes"][i].tolist() == want_stats["comm_bytes"].tolist() == [
                own] * DEVICES
    # The members did differ: 10 against 100 entries of "a" per device.
    mean = population[0][0]["a"]
    assert 0 < np.count_nonzero(mean[0, 0]) <= 2 * 10 < np.count_nonzero(mean[1, 0])


def test_members_of_a_rank_population_compute_their_own_rank_powersgd():
    """Rank 1 and 2 in one program of width 2. "thin" [4, 3] is compressed at rank 1 but not at
    rank 2 ((4 + 3) 2 >= 12), so the rank-2 member all-reduces it, as it would alone."""
    grads = {"w": normal(4, DEVICES, 24, 16), "conv": normal(5, DEVICES, 3, 6, 8),
             "thin": normal(6, DEVICES, 4, 3), "b": normal(7, DEVICES, 16)}
    options = {"start_step": 1, "min_size": 0}  # step 0 plain, then compressed
    population = _steps(compress.powersgd((1, 2), **options), grads,
                        {RANK: jnp.asarray([1.0, 2.0])}, members=2)
    for i, rank in enumerate((1, 2)):
        alone = _steps(compress.powersgd(rank, **options), grads)
        for (mean, state, stats), (want, want_state, want_stats) in zip(population, alone):
            assert stats["comm_bytes"][i].tolist() == want_stats["comm_bytes"].tolist()
            np.testing.assert_array_equal(state.step[i], want_state.step)
            # Float tolerance: the [m, 2] products and QR may sum in another order than [m, r].
            for got, expected in zip(jax.tree.leaves((mean, state.residual)),
                                     jax.tree.leaves((want, want_state.residual)), strict=True):
                np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)
            shared = [q for q in state.q if q.shape[-2] != 3] if rank == 2 else state.q
            for got, expected in zip(shared, want_state.q, strict=True):  # its own columns
                np.testing.assert_allclose(got[i][..., :rank], expected, rtol=1e-5, atol=1e-6)
    final = population[-1][2]["comm_bytes"][:, 0].tolist()  # conv, thin, w; b sent as it is
    assert final == [4 * ((18 + 8) + (4 + 3) + (24 + 16) + 16),
                     4 * ((18 + 8) * 2 + 12 + (24 + 16) * 2 + 16)]
    assert np.all(population[-1][1].q[0][0, :, :, 1] == 0)  # rank 1: its second column unused


def _config(method: str, **compress_options):
    config = tiny_config("mlp", steps=8, log_every=4, measure=False)
    config.techniques.compress.method = method
    config.techniques.compress.min_size = 64
    for key, value in compress_options.items():
        config.techniques.compress[key] = value
    validate(config)
    return config


@pytest.mark.parametrize("method,key,values", [("topk", "ratio", (0.01, 0.1)),
                                               ("powersgd", "rank", (1, 2))])
def test_a_population_run_gives_each_member_its_alone_runs_loss_and_bytes(tmp_path, method, key,
                                                                          values):
    options = {"start_step": 2} if method == "powersgd" else {}
    config = _config(method, **options)
    config.population = ((f"techniques.compress.{key}", values),)
    together = train_and_evaluate(config, str(tmp_path / "population"))
    assert tuple(together["techniques"]["compress"][key]) == values
    sent = []
    for i, value in enumerate(values):
        alone = train_and_evaluate(_config(method, **{key: value}, **options),
                                   str(tmp_path / f"alone{i}"))
        member = together["members"][i]
        assert member["values"] == {f"techniques.compress.{key}": value}
        assert member["comm_bytes_per_step"] == alone["comm_bytes_per_step"]
        assert member["comm_ratio"] == alone["comm_ratio"]
        # float tolerance: the vmapped program's matmuls may sum in another order (the members'
        # losses differ by ~1e-2 relative)
        assert member["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-5)
        sent.append(alone["comm_bytes_per_step"])
    assert sent[0] < sent[1]  # a fraction or rank larger: more bytes
    assert together["comm_bytes_per_step"] == sent[0]  # the top level keeps the first member's


@pytest.mark.parametrize("method,population,message", [
    ("topk", (("techniques.compress.rank", (1, 2)),),
     "population varies techniques.compress.rank, which techniques.compress.method='topk'"),
    ("powersgd", (("techniques.compress.ratio", (0.1, 0.2)),),
     "population varies techniques.compress.ratio, which techniques.compress.method='powersgd'"),
    ("qsgd", (("techniques.compress.levels", (4, 16)),),
     "population varies techniques.compress.levels, which is one value for every member"),
    ("topk", (("techniques.compress.ratio", (0.1, 1.5)),),
     "techniques.compress.ratio=1.5 must be a number in (0, 1]"),
    ("powersgd", (("techniques.compress.rank", (1, 2.5)),),
     "techniques.compress.rank=2.5 must be an integer >= 1"),
])
def test_a_per_trial_value_the_compressor_cannot_vary_is_one_line(method, population, message):
    config = _config(method)
    config.population = population
    with pytest.raises(UserError, match="^" + re.escape(message)) as error:
        validate(config)
    assert "\n" not in str(error.value)


def test_uncompressed_a_population_ratio_is_no_per_trial_value(tmp_path):
    config = _config("none")
    config.population = (("techniques.compress.ratio", (0.01, 0.1)),)
    with pytest.raises(UserError, match="'techniques.compress.ratio' is not a per-trial value"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_a_reducer_for_several_ratios_needs_each_members_own():
    reducer = compress.topk((0.01, 0.1), min_size=0)
    with pytest.raises(UserError, match=r"needs each member's own in hparams\['techniques"):
        _steps(reducer, SPARSE, steps=1)
