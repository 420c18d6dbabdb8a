"""Compact storage of pruned weights: bitwise round trips, hand-counted bytes, the cheaper one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.core.measure import model_bytes
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques.prune.storage import ENCODINGS, decode, encode, encoded_bytes


def _sparse(shape, sparsity, seed=0, dtype=np.float32):
    """Random weights with exactly round(sparsity * size) zeros at random places."""
    rng = np.random.default_rng(seed)
    flat = rng.normal(size=int(np.prod(shape))).astype(dtype)
    flat[rng.permutation(flat.size)[:round(sparsity * flat.size)]] = 0
    return flat.reshape(shape)


def _kernel_at(shape, positions):
    flat = np.zeros(int(np.prod(shape)), np.float32)
    flat[list(positions)] = np.arange(1, len(positions) + 1)
    return flat.reshape(shape)


def _assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.shape, x.dtype) == (y.shape, y.dtype)
        assert x.tobytes() == y.tobytes()
    assert jax.tree.structure(a) == jax.tree.structure(b)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("index_bits", [4, 8])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_round_trip_is_bitwise(encoding, sparsity, index_bits, dtype):
    params = {"Conv_0": {"kernel": _sparse((3, 4, 40), sparsity, 0, dtype),
                         "bias": _sparse((40,), 0.0, 1, dtype)},
              "Dense_0": {"kernel": _sparse((40, 10), sparsity, 2, dtype)}}
    encoded = encode(params, encoding, index_bits=index_bits)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(encoded))
    assert encoded["['Conv_0']['kernel']"]["values"].dtype == np.dtype(dtype)
    _assert_bitwise(decode(encoded, params, index_bits), params)


@pytest.mark.parametrize(("index_bits", "entries"), [(4, 3 + 1 + 23), (8, 3 + 1)])
def test_gaps_longer_than_an_index_get_fillers(index_bits, entries):
    # Non-zeros at 0, 20, 399: skips of 0, 19 and 378 zeros. With 4 bits an entry skips at most
    # 15 zeros and covers 16 positions: 19 → 1 filler, 378 → 23; with 8 bits 378 → 1 filler.
    kernel = _kernel_at((4, 100), [0, 20, 399])
    params = {"Dense_0": {"kernel": kernel}}
    encoded = encode(params, "relative_index", index_bits=index_bits)
    assert encoded["['Dense_0']['kernel']"]["values"].size == entries
    _assert_bitwise(decode(encoded, params, index_bits), params)


def test_negative_zero_nan_and_inf_survive():
    kernel = np.array([[0.0, -0.0, np.nan], [np.inf, 0.0, -np.inf]], np.float32)
    for encoding in ENCODINGS:
        encoded = encode({"kernel": kernel}, encoding)
        _assert_bitwise(decode(encoded, {"kernel": kernel}), {"kernel": kernel})


def test_bytes_match_the_hand_count():
    # A 4×8 float32 kernel with 3 non-zeros at 0, 5, 31 (skips 0, 4, 25) and a dense 8-float bias.
    params = {"Dense_0": {"kernel": jnp.asarray(_kernel_at((4, 8), [0, 5, 31])),
                          "bias": jnp.ones(8)}}
    bias = 8 * 4
    assert encoded_bytes(params) == {
        "model_bytes_bitmask": 3 * 4 + 32 // 8 + bias,
        "model_bytes_relative_index": 3 * (4 + 1) + bias,  # 8-bit gaps, no filler
    }
    # 4-bit gaps: 25 > 15 needs one filler, so 4 entries and 4 half-byte indices.
    assert encoded_bytes(params, index_bits=4)["model_bytes_relative_index"] == 4 * 4 + 2 + bias


def test_dense_leaves_are_counted_unchanged():
    params = {"Conv_0": {"kernel": _sparse((5, 1, 8), 0.9)},
              "Dense_0": {"kernel": _sparse((16, 4), 0.9, 1), "bias": np.ones(4, np.float32)}}
    dense = model_bytes(params)
    only = ["['Dense_0']['kernel']"]
    bitmask = 16 * 4 // 8 + np.count_nonzero(params["Dense_0"]["kernel"]) * 4
    assert encoded_bytes(params, paths=only)["model_bytes_bitmask"] == (
        dense - 16 * 4 * 4 + bitmask)
    assert encoded_bytes(params, paths=[])["model_bytes_bitmask"] == dense
    encoded = encode(params, "bitmask", paths=only)
    assert isinstance(encoded["['Conv_0']['kernel']"], np.ndarray)


def test_which_encoding_wins():
    dense = model_bytes({"kernel": np.zeros((64, 64), np.float32)})
    at90 = encoded_bytes({"kernel": _sparse((64, 64), 0.9)})
    assert max(at90.values()) < dense
    at99 = {"kernel": _sparse((64, 64), 0.99)}
    assert (encoded_bytes(at99)["model_bytes_relative_index"]
            < encoded_bytes(at99)["model_bytes_bitmask"])
    # 4-bit gaps lose to the mask with float32 values: fillers each carry a whole value.
    assert (encoded_bytes(at99, index_bits=4)["model_bytes_relative_index"]
            > encoded_bytes(at99)["model_bytes_bitmask"])


@pytest.mark.parametrize(("call", "culprit"), [
    (lambda p: encode(p, "csr"), "'csr'"),
    (lambda p: encode(p, "bitmask", index_bits=3), "index_bits=3"),
    (lambda p: encode(p, "bitmask", paths=["['Dense_9']['kernel']"]), "['Dense_9']['kernel']"),
    (lambda p: decode(encode(p, "relative_index", index_bits=4), p, 8), "index_bits"),
])
def test_bad_input_is_one_line(call, culprit):
    params = {"Dense_0": {"kernel": _sparse((4, 8), 0.5)}}
    with pytest.raises(UserError) as error:
        call(params)
    assert culprit in str(error.value) and "\n" not in str(error.value)
