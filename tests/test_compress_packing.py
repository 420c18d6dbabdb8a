"""QSGD's values packed below a byte: ceil(log2(2s + 1)) bits each, what the all-gather carries,
decoded bit for bit to what the sender's unpacked integers give, and counted as sent."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from jaxopt_lab import load_run, train_and_evaluate, validate
from jaxopt_lab.core.step import DATA_AXIS
from jaxopt_lab.techniques import compress
from jaxopt_lab.techniques.compress.options import MAX_LEVELS
from jaxopt_lab.techniques.compress.quantized import _qsgd_codec, pack, unpack, value_bits

# levels s -> bits of one value, sign x level being one of 2s + 1 symbols: each side of every
# power-of-two boundary (two per byte only up to s = 7; s = 16's 33 symbols take 6 bits).
BITS = {1: 2, 2: 3, 3: 3, 4: 4, 7: 4, 8: 5, 15: 5, 16: 6, 31: 6, 32: 7, 63: 7, 64: 8, 127: 8,
        128: 9, 1000: 11, MAX_LEVELS: 16}


@pytest.mark.parametrize("levels", list(BITS))
def test_every_symbol_round_trips_exactly_at_its_bit_width(levels):
    bits = value_bits(levels)
    assert bits == BITS[levels] and 2 ** (bits - 1) < 2 * levels + 1 <= 2**bits
    symbols = np.arange(2 * levels + 1, dtype=np.uint32)
    rng = np.random.default_rng(levels)
    # every symbol, then lengths that end mid-byte, at a byte, and one value alone
    for values in (symbols, rng.permutation(symbols)[:13], rng.choice(symbols, 8), symbols[-1:]):
        packed = pack(jnp.asarray(values), bits)
        assert packed.dtype == jnp.uint8 and packed.shape == (math.ceil(len(values) * bits / 8),)
        np.testing.assert_array_equal(unpack(packed, len(values), bits), values)


def _four_devices(reducer, grads):
    """`reduce` on 4 devices (vmap over DATA_AXIS, as in test_compress); the outputs and the
    arrays one device hands to all_gather (from its jaxpr on a 4-device axis)."""
    keys = jax.random.split(jax.random.key(0), 4)
    run = jax.vmap(reducer.reduce, in_axes=(0, None, 0, None), axis_name=DATA_AXIS)
    one = jax.tree.map(lambda g: g[0], grads)
    jaxpr = jax.make_jaxpr(reducer.reduce, axis_env=[(DATA_AXIS, 4)])(one, (), keys[0], {})
    gathered = [v.aval for e in jaxpr.eqns if e.primitive.name == "all_gather" for v in e.invars]
    return jax.jit(run)(grads, (), keys, {}), gathered, keys


LEVELS = [1, 7, 8, 16, 127, 128, MAX_LEVELS]


@pytest.mark.parametrize("levels", LEVELS)
def test_what_a_receiver_unpacks_is_bit_for_bit_what_the_sender_quantized(levels):
    codec = _qsgd_codec(levels)

    @jax.jit
    def exchange(x, key):
        payload, sent = codec.encode(x, key)  # sent: from the unpacked integers
        return payload, sent, codec.add_decoded(jnp.zeros_like(x), payload)

    # two entries near the norm reach the high symbols of both signs, the rest the low ones
    x = jax.random.normal(jax.random.key(levels), (1001,)).at[:2].set(jnp.array([30.0, -30.0]))
    payload, sent, received = exchange(x, jax.random.key(7))
    assert payload["q"].dtype == jnp.uint8
    assert payload["q"].shape == (math.ceil(1001 * value_bits(levels) / 8),)
    np.testing.assert_array_equal(received, sent)
    steps = np.asarray(sent) / payload["scale"][0]  # integers in -s .. s: QSGD's grid
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-5 * levels)
    steps = np.round(steps)
    assert steps.min() <= -(levels // 2) and levels // 2 <= steps.max() <= levels


@pytest.mark.parametrize("levels", LEVELS)
def test_the_all_gather_carries_the_packed_bytes_and_they_are_counted(levels):
    grads = {"a": jax.random.normal(jax.random.key(1), (4, 301)),
             "b": jax.random.normal(jax.random.key(2), (4, 12, 8)) * 3}
    reducer = compress.qsgd(levels, min_size=0)
    (mean, _, stats), gathered, keys = _four_devices(reducer, grads)
    bits = value_bits(levels)
    packed = math.ceil(301 * bits / 8) + math.ceil(96 * bits / 8)
    # One uint8 all-gather of both tensors' packed values, one of their float32 scales.
    assert sorted((a.dtype.name, a.shape) for a in gathered) == [("float32", (2,)),
                                                                 ("uint8", (packed,))]
    assert stats["comm_bytes"][0] == packed + 2 * 4
    assert stats["comm_bytes_uncompressed"][0] == 4 * (301 + 96)
    # Every device ends with the mean of what the four quantized (summed in device order).
    for i, (name, g) in enumerate(sorted(grads.items())):
        sent = jax.jit(jax.vmap(lambda x, k, i=i: _qsgd_codec(levels).encode(
            x.ravel(), jax.random.fold_in(k, i))[1]))(g, keys)
        want = ((((0 + sent[0]) + sent[1]) + sent[2]) + sent[3]) / 4
        for device in range(4):
            np.testing.assert_allclose(mean[name][device].ravel(), want, rtol=1e-6, atol=1e-7)


def test_a_qsgd_runs_reported_bytes_are_the_hand_count_of_its_packed_values(tmp_path):
    config = tiny_config("mlp", steps=4, measure=False)
    config.techniques.compress.method = "qsgd"
    config.techniques.compress.levels = 7  # 15 symbols: 4 bits, two values a byte
    config.techniques.compress.min_size = 64
    validate(config)
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    sizes = [p.size for p in jax.tree.leaves(load_run(str(tmp_path / "run")).state.params)]
    sent = sum(math.ceil(d / 2) + 4 if d >= 64 else 4 * d for d in sizes)
    assert summary["techniques"]["compress"]["levels"] == 7
    assert summary["comm_bytes_per_step"] == sent
    assert summary["comm_ratio"] == pytest.approx(4 * sum(sizes) / sent, rel=1e-6)
