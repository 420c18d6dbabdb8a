"""Feeding: the on-device shuffle is a permutation per epoch, indexed by the step alone; the
streamed feed prefetches onto the devices yet checkpoints the position it handed out."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.core.distributed import data_mesh
from jaxopt_lab.core.feed import StreamedFeed, device_sampler
from jaxopt_lab.data.pipeline import make_grain_loader
from jaxopt_lab.data.shuffle import permuted_indices


@pytest.mark.parametrize("n", [1, 2, 3, 17, 100, 1797, 4000, 4096, 4097])
def test_permuted_indices_is_a_bijection(n):
    indices = np.asarray(permuted_indices(jax.random.key(7), jnp.arange(n), n))
    assert sorted(indices.tolist()) == list(range(n))


def test_permutations_differ_by_key_and_look_shuffled():
    a = np.asarray(permuted_indices(jax.random.key(0), jnp.arange(4000), 4000))
    b = np.asarray(permuted_indices(jax.random.key(1), jnp.arange(4000), 4000))
    assert (a != b).mean() > 0.99
    assert abs(np.corrcoef(a, np.arange(4000))[0, 1]) < 0.05
    # Random access: any block of positions agrees with the whole permutation.
    block = np.asarray(permuted_indices(jax.random.key(0), jnp.arange(1200, 1300), 4000))
    np.testing.assert_array_equal(block, a[1200:1300])


@pytest.mark.parametrize("shuffle", [True, False])
def test_device_sampler_visits_every_example_once_per_epoch(shuffle):
    n, batch = 1000, 100
    data = {"x": jnp.arange(n, dtype=jnp.float32)[:, None], "label": jnp.arange(n)}
    sampler = jax.jit(device_sampler(n, batch, mesh=data_mesh(), shuffle=shuffle))
    data_rng = jax.random.key_data(jax.random.key(3))

    def sample(data, step):
        return sampler(data, step, data_rng)

    epoch0 = np.concatenate([np.asarray(sample(data, s)["label"]) for s in range(10)])
    epoch1 = np.concatenate([np.asarray(sample(data, s)["label"]) for s in range(10, 20)])
    assert sorted(epoch0.tolist()) == list(range(n)) == sorted(epoch1.tolist())
    if shuffle:
        assert not np.array_equal(epoch0, epoch1)  # reshuffled every epoch
        assert not np.array_equal(epoch0, np.arange(n))
    else:
        np.testing.assert_array_equal(epoch0, np.arange(n))  # stored order, as in the paper
    np.testing.assert_array_equal(sample(data, 13)["x"][:, 0], sample(data, 13)["label"])


@pytest.mark.parametrize("prefetch", [0, 3])
def test_streamed_feed_hands_out_in_order_and_checkpoints_what_it_handed_out(prefetch):
    """Calls of k=2, 2, then 1 (a run's tail) get consecutive batches; the state it reports is
    the position after them, however far the prefetch has read, and restores exactly there."""
    n = 64
    arrays = {"x": np.arange(n, dtype=np.float32)[:, None], "label": np.arange(n)}
    loader = make_grain_loader(arrays, batch_size=8, seed=0)
    expected = [b["label"] for b in itertools.islice(iter(loader), 8)]

    feed = StreamedFeed(loader, data_mesh(), prefetch=prefetch)
    calls = [feed.next(k) for k in (2, 2, 1)]
    assert all(isinstance(c["label"], jax.Array) for c in calls)
    assert [c["label"].shape for c in calls] == [(2, 8), (2, 8), (1, 8)]
    np.testing.assert_array_equal(np.concatenate([np.asarray(c["label"]) for c in calls]),
                                  np.stack(expected[:5]))
    state = feed.get_state()
    if prefetch:
        assert feed.iterator.get_state() != state  # grain underneath has read further

    resumed = StreamedFeed(loader, data_mesh(), prefetch=prefetch)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.asarray(resumed.next(3)["label"]), np.stack(expected[5:8]))
