"""The grain feed: host arrays streamed as shuffled, sharded batches whose position checkpoints.

A pipeline of per-example records spends its time in Python, so each grain record here is a whole
batch, gathered with one numpy fancy index from a seeded permutation of the epoch. Measured on a
busy 2-core CPU, MNIST-1D in batches of 100: ~60 batches/s per-example, ~5,700 batches/s here.
grain still owns what it is good at: the sampler's sharding and epochs, worker processes, and an
iterator state (`get_state`/`set_state`) from which a resumed run sees exactly the same batches.

Batch layout: epoch e shuffles all N examples with seed (seed, e); global step m of the epoch is
the slice [m*G, (m+1)*G) of that permutation, G = batch_size * shard_count, and process p takes
the p-th of its shard_count pieces. So the global batches, and hence the run, do not depend on how
many processes share them.
"""

from __future__ import annotations

import dataclasses
import sys

import grain.python as grain
import numpy as np

from jaxopt_lab.errors import UserError


class _EpochBatchSource:
    """grain data source whose record `epoch * records_per_epoch + slot` is one process's batch.

    Slot `p * steps_per_epoch + m` holds process p's part of global step m, matching the
    contiguous ranges grain's ShardOptions give each process. Its length counts every epoch's
    records (as many epochs as a Python length can hold), since grain wraps keys modulo it.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                 shard_count: int, drop_remainder: bool, shuffle: bool = True):
        self._arrays = arrays
        self._shuffle = shuffle
        self._num_examples = len(next(iter(arrays.values())))
        self._global_batch = batch_size * shard_count
        self._shard_count = shard_count
        self._seed = seed
        self._drop_remainder = drop_remainder
        self.steps_per_epoch = (self._num_examples // self._global_batch if drop_remainder
                                else -(-self._num_examples // self._global_batch))
        self.records_per_epoch = self.steps_per_epoch * shard_count
        self._cached = (-1, np.empty(0, np.int64))  # (epoch, its permutation), swapped whole

    def __len__(self) -> int:
        return sys.maxsize // self.records_per_epoch * self.records_per_epoch

    def __getitem__(self, key: int) -> dict[str, np.ndarray]:
        epoch, slot = divmod(key, self.records_per_epoch)
        shard, step = divmod(slot, self.steps_per_epoch)
        cached_epoch, order = self._cached
        if epoch != cached_epoch:
            order = (np.random.default_rng([self._seed, epoch]).permutation(self._num_examples)
                     if self._shuffle else np.arange(self._num_examples))
            self._cached = (epoch, order)
        step_rows = order[step * self._global_batch:(step + 1) * self._global_batch]
        # Equal pieces for full steps; a short last step (drop_remainder=False) splits evenly.
        rows = np.array_split(step_rows, self._shard_count)[shard]
        return {name: array[rows] for name, array in self._arrays.items()}

    def __repr__(self) -> str:
        # grain stores this in the iterator state and refuses to restore into a different source.
        shapes = {name: array.shape for name, array in self._arrays.items()}
        return (f"EpochBatchSource(shapes={shapes}, global_batch={self._global_batch}, "
                f"seed={self._seed}, shard_count={self._shard_count}, "
                f"drop_remainder={self._drop_remainder}, shuffle={self._shuffle})")


class _EpochKeySampler:
    """An IndexSampler whose record keys also carry the epoch, which grain's keys wrap away."""

    def __init__(self, sampler: grain.IndexSampler, records_per_epoch: int, shard_count: int):
        self._sampler = sampler
        self._records_per_epoch = records_per_epoch
        self._records_per_shard = records_per_epoch // shard_count
        self._shard_count = shard_count

    def __len__(self) -> int:
        return len(self._sampler)

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        metadata = self._sampler[index]
        # The sampler's global index interleaves the processes; this process's position in its
        # own stream is index // shard_count.
        epoch = index // self._shard_count // self._records_per_shard
        return dataclasses.replace(
            metadata, record_key=epoch * self._records_per_epoch + metadata.record_key)

    def __repr__(self) -> str:
        return f"EpochKeySampler({self._sampler!r})"


def make_grain_loader(arrays: dict[str, np.ndarray], *, batch_size: int, seed: int,
                      shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
                      worker_count: int = 0, drop_remainder: bool = True,
                      shuffle: bool = True) -> grain.DataLoader:
    """A grain DataLoader of this process's batches of `arrays`, reshuffled every epoch.

    Args:
      arrays: equal-length host arrays, e.g. {"x": [N, ...], "label": [N]}.
      batch_size: examples per batch on this process (the global batch is batch_size *
        shard_count).
      seed: fixes every epoch's permutation.
      shard_index, shard_count: this process and how many share the data (jax.process_index(),
        jax.process_count()); their batches are disjoint within an epoch.
      num_epochs: passes over the data; None repeats forever.
      worker_count: grain worker processes (0 = gather in this process, enough for in-memory data).
      drop_remainder: drop each epoch's last partial global batch; if False it is kept and split
        as evenly as possible over the processes.
      shuffle: False walks the data in stored order every epoch (the MNIST-1D paper's protocol).

    Returns:
      A DataLoader; `iter(loader)` yields dicts of numpy arrays and has `get_state()` (bytes) and
      `set_state(bytes)`.
    """
    if not arrays:
        raise UserError("make_grain_loader needs at least one array")
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise UserError(f"arrays must have equal lengths; got {lengths}")
    if batch_size < 1 or shard_count < 1 or not 0 <= shard_index < shard_count:
        raise UserError(f"need batch_size >= 1 and 0 <= shard_index < shard_count; got "
                        f"batch_size={batch_size}, shard_index={shard_index}, "
                        f"shard_count={shard_count}")
    if seed < 0:
        raise UserError(f"seed={seed} must be >= 0")
    if num_epochs is not None and num_epochs < 1:
        raise UserError(f"num_epochs={num_epochs} must be None (forever) or at least 1")
    source = _EpochBatchSource(arrays, batch_size, seed, shard_count, drop_remainder, shuffle)
    if source.steps_per_epoch == 0:
        raise UserError(f"a global batch of {batch_size} x {shard_count} processes exceeds the "
                        f"{next(iter(lengths.values()))} examples")
    shard_options = grain.ShardOptions(shard_index, shard_count, drop_remainder=True)
    # No shuffle here: the source already permutes examples per epoch, and the records are whole
    # batches, so grain's per-record shuffle would add nothing.
    sampler = grain.IndexSampler(source.records_per_epoch, shard_options=shard_options,
                                 shuffle=False, num_epochs=num_epochs)
    return grain.DataLoader(
        data_source=source,
        sampler=_EpochKeySampler(sampler, source.records_per_epoch, shard_count),
        worker_count=worker_count,
        shard_options=shard_options,
        # The data are in memory: grain's default 16 reader threads only contend for the GIL
        # (measured: ~900 batches/s with them, ~5,500 without) and its 500-record read buffer
        # would hold 500 batches in RAM.
        read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
    )
