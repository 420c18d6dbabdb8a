"""Feeding batches to the step, K steps per compiled call.

Two feeds share one shape, `train_fn(state, source) -> (state, metrics[K])`:
- on device: the data set lives on the devices and each step gathers its batch from a seeded
  per-epoch permutation, indexed by `state.step` — no host round trip, and the data position is
  part of the state, so a resumed run sees the same batches;
- streamed: `source` is K batches stacked on a leading axis, from the grain pipeline, put on the
  devices a few calls ahead (`StreamedFeed`).
K > 1 runs the steps in `lax.scan`; whether that is faster depends on backend and model, so
`pick_steps_per_call` measures it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_lab.core.step import DATA_AXIS
from jaxopt_lab.data.shuffle import permuted_indices


def _put_global(arrays: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    # Each process holds the same global arrays and supplies its devices' slices of them.
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in arrays.items()}


def replicate(arrays: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Puts host arrays (identical on every process) on every device of the mesh."""
    return _put_global(arrays, NamedSharding(mesh, P()))


def shard_batch(arrays: dict[str, np.ndarray], mesh: Mesh, leading_axes: int = 0) -> dict:
    """Splits a global host batch (identical on every process) over the mesh's data axis."""
    return _put_global(arrays, NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS)))


def device_sampler(num_examples: int, batch_size: int, seed: int, mesh: Mesh,
                   shuffle: bool = True) -> Callable:
    """`sample(data, step)`: step's batch of the epoch's seeded permutation, sharded over "data".

    Each epoch visits every example once (the last partial batch of an epoch is skipped);
    `shuffle=False` visits them in stored order.
    """
    steps_per_epoch = num_examples // batch_size
    sharding = NamedSharding(mesh, P(DATA_AXIS))

    def sample(data, step):
        epoch_key = jax.random.fold_in(jax.random.key(seed), step // steps_per_epoch)
        positions = (step % steps_per_epoch) * batch_size + jnp.arange(batch_size)
        idx = permuted_indices(epoch_key, positions, num_examples) if shuffle else positions
        batch = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
        return jax.lax.with_sharding_constraint(batch, sharding)

    return sample


def _k_steps(train_step: Callable, steps_per_call: int, sample: Callable | None):
    """(state, source) -> (state, metrics stacked over the K steps), not yet jitted."""

    def one(state, source):
        return train_step(state, sample(source, state.step) if sample else source)

    def single(state, source):
        batch_source = source if sample else jax.tree.map(lambda a: a[0], source)
        state, metrics = one(state, batch_source)
        return state, jax.tree.map(lambda m: m[None], metrics)

    def scanned(state, source):
        def body(carry, xs):
            return one(carry, source if sample else xs)

        return jax.lax.scan(body, state, None if sample else source, length=steps_per_call)

    return single if steps_per_call == 1 else scanned


def make_train_fn(train_step: Callable, steps_per_call: int, sample: Callable | None = None):
    """Jit-compiles K steps per call; metrics come back stacked, one entry per step."""
    return jax.jit(_k_steps(train_step, steps_per_call, sample), donate_argnums=0)


NO_STEP = np.iinfo(np.int32).max  # "no non-finite step seen"


def make_logged_train_fn(train_step: Callable, steps_per_call: int, sample: Callable | None = None):
    """Like `make_train_fn`, but metrics are summed into `totals` on the device.

    `fn(state, source, totals) -> (state, totals)`. The host then fetches one small pytree per log
    window instead of one array per step and metric (which cost ~20 % of an MLP step on a CPU),
    and `totals["first_nonfinite"]` still names the exact step whose loss or gradients went
    NaN/inf.
    """
    k_steps = _k_steps(train_step, steps_per_call, sample)

    def fn(state, source, totals):
        first_step = state.step
        state, metrics = k_steps(state, source)
        steps = first_step + 1 + jnp.arange(steps_per_call)
        # NaN/inf gradients are what turn parameters NaN/inf, so this names the first bad step.
        bad = ~(jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]))
        first_bad = jnp.min(jnp.where(bad, steps, NO_STEP))
        return state, {
            "sums": jax.tree.map(lambda t, m: t + jnp.sum(m), totals["sums"], metrics),
            "count": totals["count"] + steps_per_call,
            "first_nonfinite": jnp.minimum(totals["first_nonfinite"], first_bad),
        }

    return jax.jit(fn, donate_argnums=(0, 2))


def zero_totals(train_step: Callable, state, source, sample: Callable | None = None) -> dict:
    """Empty `totals` for `make_logged_train_fn`, shaped by the step's metrics (`source` as for
    one step of `make_train_fn`)."""
    metrics = jax.eval_shape(_k_steps(train_step, 1, sample), state, source)[1]
    return {"sums": jax.tree.map(lambda m: jnp.zeros((), m.dtype), metrics),
            "count": jnp.zeros((), jnp.int32), "first_nonfinite": jnp.int32(NO_STEP)}


def pick_steps_per_call(build: Callable[[int], Callable], state, source_for: Callable[[int], object],
                        candidates: tuple[int, ...] = (1, 32), budget_steps: int = 128) -> int:
    """Times each K on a copy of the state and returns the fastest (the same on every process).

    Scanning removes per-step dispatch, which wins on accelerators; on XLA:CPU a scanned conv step
    can run several times slower. Measured here, not assumed.
    """
    rates = []
    for k in candidates:
        fn = build(k)
        trial = jax.tree.map(jnp.copy, state)
        source = source_for(k)
        trial, _ = fn(trial, source)  # compile
        jax.block_until_ready(trial)
        calls = max(1, budget_steps // k)
        start = time.perf_counter()
        for _ in range(calls):
            trial, _ = fn(trial, source)
        jax.block_until_ready(trial)
        rates.append(calls * k / (time.perf_counter() - start))
    best = int(np.argmax(rates))
    best = int(multihost_utils.broadcast_one_to_all(np.int32(best)))
    return candidates[best]


class StreamedFeed:
    """K host batches per call from a grain iterator, stacked into one global array and put on the
    devices `prefetch` calls ahead, so the copies overlap the steps that run meanwhile.

    `get_state()` is the grain position after the last call handed out, not after the last one
    prefetched: what a checkpoint must hold for a resumed run to see exactly the batches this one
    had not used. With `get_state`/`set_state`/`start_prefetch` the feed is what grain's orbax
    handler saves and restores.
    """

    def __init__(self, loader, mesh: Mesh, prefetch: int = 2):
        self.iterator = iter(loader)
        self._sharding = NamedSharding(mesh, P(None, DATA_AXIS))
        self._prefetch = prefetch
        self._queue: collections.deque = collections.deque()  # (k, device batch, state after)
        self._state = self.iterator.get_state()

    def next(self, k: int) -> dict[str, jax.Array]:
        if self._queue and self._queue[0][0] != k:  # the call size changed (a run's last steps)
            self.set_state(self._state)
        while len(self._queue) <= self._prefetch:
            self._queue.append((k, self._pull(k), self.iterator.get_state()))
        _, batch, self._state = self._queue.popleft()
        return batch

    def _pull(self, k: int) -> dict[str, jax.Array]:
        local = [next(self.iterator) for _ in range(k)]
        stacked = {key: np.stack([b[key] for b in local]) for key in local[0]}
        # Asynchronous: returns once the copy is queued.
        return {key: jax.make_array_from_process_local_data(self._sharding, value)
                for key, value in stacked.items()}

    def get_state(self) -> bytes:
        return self._state

    def set_state(self, state: bytes) -> None:
        self._queue.clear()
        self.iterator.set_state(state)
        self._state = state

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore."""
        self.iterator.start_prefetch()
