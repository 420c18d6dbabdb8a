"""Feeding batches to the step, K steps per compiled call.

Two feeds share one shape, `train_fn(state, source) -> (state, metrics[K])`:
- on device: the data set lives on the devices and each step gathers its batch from a seeded
  per-epoch permutation, indexed by `state.step` — no host round trip, and the data position is
  part of the state, so a resumed run sees the same batches;
- streamed: `source` is K batches stacked on a leading axis, from the grain pipeline, put on the
  devices a few calls ahead (`StreamedFeed`).
K > 1 runs the steps in `lax.scan`; whether that is faster depends on backend and model, so
`core/callsize.py` measures it while the run trains.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_lab.core.precision import diverged
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


def device_sampler(num_examples: int, batch_size: int, mesh: Mesh,
                   shuffle: bool = True) -> Callable:
    """`sample(data, step, data_rng)`: step's batch of the epoch's permutation, sharded over "data".

    `data_rng` (`TrainState.data_rng`, raw key data) seeds every epoch's permutation, so the data
    order is part of the state: each member of a population can have its own. Each epoch visits
    every example once (the last partial batch of an epoch is skipped); `shuffle=False` visits
    them in stored order.
    """
    steps_per_epoch = num_examples // batch_size
    sharding = NamedSharding(mesh, P(DATA_AXIS))

    def sample(data, step, data_rng):
        epoch_key = jax.random.fold_in(jax.random.wrap_key_data(data_rng), step // steps_per_epoch)
        positions = (step % steps_per_epoch) * batch_size + jnp.arange(batch_size)
        idx = permuted_indices(epoch_key, positions, num_examples) if shuffle else positions
        batch = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
        return jax.lax.with_sharding_constraint(batch, sharding)

    return sample


def sampled_step(train_step: Callable, sample: Callable | None) -> Callable:
    """`(state, source) -> (state, metrics)`: gathers the step's batch from on-device data first
    when `sample` is given; otherwise `source` is the batch."""
    if sample is None:
        return train_step
    return lambda state, data: train_step(state, sample(data, state.step, state.data_rng))


def _k_steps(step_fn: Callable, steps_per_call: int, streamed: bool):
    """(carry, source) -> (carry, metrics stacked over the K steps), not yet jitted.

    A streamed source holds K batches on a leading axis, one per step; on-device data are passed
    to every step whole.
    """

    def single(carry, source):
        carry, metrics = step_fn(carry, jax.tree.map(lambda a: a[0], source) if streamed
                                 else source)
        return carry, jax.tree.map(lambda m: m[None], metrics)

    def scanned(carry, source):
        def body(carry, xs):
            return step_fn(carry, xs if streamed else source)

        return jax.lax.scan(body, carry, source if streamed else None, length=steps_per_call)

    return single if steps_per_call == 1 else scanned


def compile_k_steps(step_fn: Callable, steps_per_call: int, streamed: bool):
    """Jit-compiles K steps of `step_fn(carry, source)` per call, donating the carry; metrics
    come back stacked, one entry per step."""
    return jax.jit(_k_steps(step_fn, steps_per_call, streamed), donate_argnums=0)


def make_train_fn(train_step: Callable, steps_per_call: int, sample: Callable | None = None):
    """K steps of `train_step` per call, on a batch `sample` gathers from on-device data or, with
    no `sample`, on streamed batches stacked K deep."""
    return compile_k_steps(sampled_step(train_step, sample), steps_per_call, sample is None)


NO_STEP = np.iinfo(np.int32).max  # "no non-finite step seen"


def make_logged_train_fn(step_fn: Callable, steps_per_call: int, streamed: bool):
    """K steps of `step_fn(carry, source)` per call, with metrics summed into `totals` on device.

    `fn(carry, source, totals) -> (carry, totals)`. The host then fetches one small pytree per log
    window instead of one array per step and metric (which cost ~20 % of an MLP step on a CPU),
    and `totals["first_nonfinite"]` still names the exact step whose loss or gradients went
    NaN/inf. For a population (`core/population.py`) every total is per member: a step's metrics
    count only for the members still active after it, and a member's first non-finite step is
    the one that stopped it.
    """
    k_steps = _k_steps(step_fn, steps_per_call, streamed)

    def fn(carry, source, totals):
        first_step = carry.step
        carry, metrics = k_steps(carry, source)
        steps = first_step + 1 + jnp.arange(steps_per_call)
        # NaN/inf gradients are what turn parameters NaN/inf, so this names the first bad step
        # (a float16 overflow the loss scale skipped is not one).
        bad = diverged(metrics)
        active = metrics.pop("active", None)
        if active is None:
            sums = jax.tree.map(lambda t, m: t + jnp.sum(m, axis=0), totals["sums"], metrics)
            count = totals["count"] + steps_per_call
        else:  # [K, members]: a stopped member's metrics (its frozen state's) are not counted
            bad = bad & metrics.pop("was_active")
            sums = jax.tree.map(lambda t, m: t + jnp.sum(jnp.where(active, m, 0), axis=0),
                                totals["sums"], metrics)
            count = totals["count"] + jnp.sum(active, axis=0, dtype=jnp.int32)
        steps = steps.reshape(steps.shape + (1,) * (bad.ndim - 1))
        first_bad = jnp.min(jnp.where(bad, steps, NO_STEP), axis=0)
        return carry, {"sums": sums, "count": count,
                       "first_nonfinite": jnp.minimum(totals["first_nonfinite"], first_bad)}

    return jax.jit(fn, donate_argnums=(0, 2))


def zero_totals(step_fn: Callable, carry, source, streamed: bool) -> dict:
    """Empty `totals` for `make_logged_train_fn`, shaped by the step's metrics (`source` as for
    one call with K=1)."""
    metrics = dict(jax.eval_shape(_k_steps(step_fn, 1, streamed), carry, source)[1])
    per = metrics.pop("active", None)
    metrics.pop("was_active", None)
    shape = per.shape[1:] if per is not None else ()
    return {"sums": jax.tree.map(lambda m: jnp.zeros(shape, m.dtype), metrics),
            "count": jnp.zeros(shape, jnp.int32),
            "first_nonfinite": jnp.full(shape, NO_STEP, jnp.int32)}


def one_call_in_flight() -> bool:
    """Whether to wait for each compiled call before the next. XLA:CPU runs a process's devices
    on one thread pool: with calls queued ahead, devices that entered the next step's all-reduce
    held the threads the last device needed to finish this one, a deadlock (4 simulated devices
    on 2 cores, the 128-channel CNN). Accelerators queue as usual."""
    return jax.default_backend() == "cpu" and jax.local_device_count() > 1


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
