"""Checkpoints through orbax: save every N steps and at the end, keep K, resume the newest that loads.

A checkpoint holds the TrainState and, when the data come through grain, each process's data
iterator position (grain's own orbax handler, one file per process), so a resumed run sees exactly
the batches it would have seen.

Setting a checkpoint aside loses the progress it holds, so a failed read is classified first
(`failure_kind`): only a provably unreadable one is set aside; a transient error is retried, then
refused with nothing moved; anything else is raised as it is. Processes decide together
(`restore`), and only process 0 moves anything, once all have agreed.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxopt_lab.errors import UserError

RESTORE_TRIES = 3  # reads of one checkpoint on a transient error before refusing (moving nothing)
RESTORE_BACKOFF_S = 0.5  # the wait before the second read, doubled before each further one
# TrainState's field with one entry per data-parallel device (`core/state.py`)
PER_DEVICE = "comm_state"
# A test hook (tests/test_checkpoint_robust.py): the process whose index it names fails its first
# checkpoint read with an OSError, as a network mount's hiccup does. Nothing else reads it.
READ_FAULT_ENV = "JAXOPT_LAB_CHECKPOINT_READ_FAULT"

UNREADABLE, TRANSIENT, OTHER = "unreadable", "transient", "other"
_RESTORED, _UNREADABLE, _FAILED = 0, 1, 2  # one process's outcome for one step, as exchanged
# tensorstore (orbax's storage) raises ValueError("CODE: ...") with an absl status code (none for
# INVALID_ARGUMENT), and names the errno ("[OS error 5: ...]") where the file system failed.
_DAMAGE_CODES = {"NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION", "INVALID_ARGUMENT"}
_RETRY_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED", "UNKNOWN", "INTERNAL",
                "RESOURCE_EXHAUSTED", "PERMISSION_DENIED"}


class Unreadable(Exception):
    """A checkpoint our own checks find damaged: no tree metadata, non-finite values."""


def failure_kind(error: BaseException) -> str:
    """UNREADABLE, TRANSIENT or OTHER: what a failed checkpoint read says about the checkpoint.

    UNREADABLE (set aside): the bytes are missing or wrong, and reading again cannot help — a
    missing file (FileNotFoundError, tensorstore's NOT_FOUND or ENOENT), a file cut short
    (OUT_OF_RANGE), a checksum or decoding error (DATA_LOSS, FAILED_PRECONDITION, tensorstore's
    INVALID_ARGUMENT), metadata that does not parse (JSON or text decoding errors), `Unreadable`.
    TRANSIENT (retried, then refused, nothing moved): the storage did not answer — any other
    OSError (EIO, ESTALE, timeouts, refused connections, permissions) and tensorstore's
    UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, UNKNOWN, INTERNAL, RESOURCE_EXHAUSTED, ... codes or
    an errno other than ENOENT. OTHER (raised as it is): anything else — a ValueError that is not
    tensorstore's, an accelerator out of memory, a bug; none of them proves the checkpoint bad.
    """
    if isinstance(error, Unreadable | FileNotFoundError | json.JSONDecodeError |
                  UnicodeDecodeError):
        return UNREADABLE
    if isinstance(error, OSError):
        return TRANSIENT
    if not isinstance(error, ValueError):
        return OTHER
    text = str(error)
    code = re.match(r"([A-Z_]+): ", text)
    if code is None and not re.search(r"OCDBT|zarr|tensorstore", text):
        return OTHER
    os_error = re.search(r"\[OS error (\d+)", text)
    if os_error:
        return UNREADABLE if int(os_error.group(1)) == errno.ENOENT else TRANSIENT
    code = code.group(1) if code else "INVALID_ARGUMENT"
    return UNREADABLE if code in _DAMAGE_CODES else TRANSIENT if code in _RETRY_CODES else OTHER


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _gather(value: int) -> np.ndarray:
    """`value` from every process, in process order; every process must call it together."""
    if jax.process_count() == 1:
        return np.array([value])
    return np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)


def _check_finite(state) -> None:
    """Every saved checkpoint held finite values (the loop checks before saving), so NaN/inf
    after loading means the bytes were damaged."""
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.isfinite(leaf).all()):
            raise Unreadable("restored values are not finite")


def _leaf_signature(tree) -> collections.Counter:
    """The multiset of (shape, dtype) of a tree's arrays: what must match to restore into it."""
    return collections.Counter((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


def _without_per_device(tree):
    """A serialized tree or checkpoint metadata tree without its PER_DEVICE entries."""
    if hasattr(tree, "keys"):
        return {k: _without_per_device(tree[k]) for k in tree if k != PER_DEVICE}
    if isinstance(tree, list | tuple):
        return [_without_per_device(v) for v in tree]
    return tree


def _graft(tree, source, convert=lambda mine, theirs: theirs):
    """`tree` (serialized) with each PER_DEVICE entry replaced by `convert(its own, source's)`,
    the two walked together (`source` a serialized tree or a checkpoint's metadata tree)."""
    if isinstance(tree, dict) and hasattr(source, "keys"):
        keys = set(source.keys())
        return {k: (convert(v, source[k]) if k == PER_DEVICE else _graft(v, source[k], convert))
                if k in keys else v for k, v in tree.items()}
    if isinstance(tree, list) and isinstance(source, list | tuple) and len(tree) == len(source):
        return [_graft(v, s, convert) for v, s in zip(tree, source, strict=True)]
    return tree


def _device_counts(tree, saved) -> tuple[int, int] | None:
    """(data-parallel devices the checkpoint was written on, devices of `tree`) where its
    PER_DEVICE entries differ from `tree`'s (serialized) in the device axis alone; None where they
    fit. Raises NotImplementedError where they differ otherwise (another config: the caller
    refuses it)."""
    subtrees = []
    _graft(tree, saved, lambda mine, theirs: subtrees.append((mine, theirs)))
    changes = set()
    for mine, theirs in subtrees:
        ours, stored = jax.tree.leaves(mine), jax.tree.leaves(theirs)
        if len(ours) != len(stored):
            raise NotImplementedError(f"{len(stored)} {PER_DEVICE} arrays, not {len(ours)}")
        for new, old in zip(ours, stored, strict=True):
            # The axis split over the devices: its sharding says (0 for a TrainState, 1 for a
            # population's stacked one); an unsharded array has none.
            spec = getattr(getattr(new, "sharding", None), "spec", None) or ()
            axis = next((i for i, name in enumerate(spec) if name is not None), None)
            if (str(new.dtype), len(new.shape)) != (str(old.dtype), len(old.shape)) or any(
                    a != b for i, (a, b) in enumerate(zip(old.shape, new.shape)) if i != axis):
                raise NotImplementedError(f"{PER_DEVICE} {old.shape} {old.dtype}")
            if axis is not None and old.shape[axis] != new.shape[axis]:
                changes.add((old.shape[axis], new.shape[axis]))
    if len(changes) > 1:
        raise NotImplementedError(f"{PER_DEVICE} written on several device counts: {changes}")
    return changes.pop() if changes else None


def _as_saved(tree, saved):
    """`tree` (serialized: nested dicts and lists) without the entries that hold no arrays and
    that `saved`, a checkpoint's metadata tree, lacks: a state field added after the checkpoint
    was written and empty unless a feature uses it (`TrainState.loss_scale`), so that older
    checkpoints still restore."""
    if isinstance(tree, dict) and hasattr(saved, "keys"):
        keys = set(saved.keys())
        return {k: _as_saved(v, saved[k]) if k in keys else v for k, v in tree.items()
                if k in keys or jax.tree.leaves(v)}
    if isinstance(tree, list) and isinstance(saved, list | tuple) and len(tree) == len(saved):
        return [_as_saved(v, s) for v, s in zip(tree, saved, strict=True)]
    return tree


def _with_empty(restored, tree):
    """`restored` with the entries of `tree` it lacks put back: the empty ones `_as_saved` left
    out, and PER_DEVICE entries that were not read."""
    if isinstance(tree, dict) and isinstance(restored, dict):
        return {k: _with_empty(restored[k], v) if k in restored else v for k, v in tree.items()}
    if isinstance(tree, list) and isinstance(restored, list | tuple):
        return [_with_empty(r, v) for r, v in zip(restored, tree, strict=True)]
    return restored


def _zeros_where_abstract(tree):
    """`tree` with its abstract leaves (a restore target's) as zeros placed by their shardings."""
    if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree)):
        return tree
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
    return jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree),
                   out_shardings=shardings)()


class Checkpointer:
    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.PyGrainCheckpointHandler()},
        )
        self._fault_injected = False

    def save(self, step: int, state, data_iterator=None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, target_state, step: int | None = None, data_iterator=None, *,
                on_device_count_change: Callable[[int, int], None] | None = None
                ) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint shaped like `target_state`, or exactly `step`.

        Each step is read on every process (transient errors retried, `failure_kind`) and the
        outcomes exchanged, so all processes restore the same step or all raise: a step
        unreadable on any process is unreadable for the run, and the one before is tried. Once
        they agree, process 0 alone moves the unreadable ones into `<dir>_corrupt/` (a warning
        each) while the others wait. A requested `step` that is missing or unreadable, a
        checkpoint that does not fit `target_state` (the model or optimizer changed) and a
        transient error that outlasts RESTORE_TRIES are one-line UserErrors, nothing moved.

        A checkpoint whose PER_DEVICE entries (comm_state) were written on another number of
        data-parallel devices restores with `on_device_count_change` given: everything else is
        read, comm_state keeps `target_state`'s value (zeros where the target is abstract), and
        `on_device_count_change(saved, now)` is called once; without it such a checkpoint is
        refused. `data_iterator`, if given, is set to the saved position.
        """
        ceiling, unreadable = step, []
        while True:
            candidate = self._agreed_candidate(ceiling, exact=step is not None)
            if candidate is None:
                self._set_aside(unreadable)
                return None
            outcome, value = self._attempt(target_state, candidate, data_iterator,
                                           on_device_count_change is not None)
            outcomes = _gather(outcome)
            if (outcomes == _RESTORED).all():
                self._set_aside(unreadable)
                state, counts = value
                if counts is not None:
                    on_device_count_change(*counts)
                return state, candidate
            if step is not None or (outcomes == _FAILED).any():
                self._set_aside(unreadable)
                self._raise(candidate, outcome, value, outcomes, requested=step is not None)
            if outcome == _UNREADABLE:
                print(f"warning: checkpoint at step {candidate} is unreadable "
                      f"({_first_line(value)}); moved to {self.directory}_corrupt, trying the "
                      "one before", file=sys.stderr)
            unreadable.append(candidate)
            ceiling = candidate - 1

    def _agreed_candidate(self, ceiling: int | None, exact: bool) -> int | None:
        """The step every process tries next: the newest at or below `ceiling` that any process
        lists (a process whose listing lags tries it too), or exactly `ceiling`."""
        steps = self._manager.all_steps()
        if exact:
            if _gather(ceiling not in steps).any():
                raise UserError(f"no checkpoint at step {ceiling} in {self.directory}; "
                                f"available: {sorted(steps)}")
            return ceiling
        newest = max((s for s in steps if ceiling is None or s <= ceiling), default=-1)
        agreed = int(_gather(newest).max())
        return None if agreed < 0 else agreed

    def _attempt(self, target_state, step: int, data_iterator, other_devices_ok: bool):
        """(outcome, value) of reading `step` on this process: (_RESTORED, (state, device counts
        or None)), (_UNREADABLE, error) or (_FAILED, error). Catches everything, so that no
        process leaves before the outcomes are exchanged (one that did would hang the others)."""
        for attempt in range(1, RESTORE_TRIES + 1):
            try:
                return _RESTORED, self._read(target_state, step, data_iterator, other_devices_ok)
            except Exception as e:  # noqa: BLE001 - classified here, raised once all agree
                kind, error = failure_kind(e), e
            if kind != TRANSIENT:
                return (_UNREADABLE if kind == UNREADABLE else _FAILED), error
            delay = RESTORE_BACKOFF_S * 2 ** (attempt - 1)
            if attempt < RESTORE_TRIES:
                print(f"warning: reading checkpoint at step {step} failed ({_first_line(error)});"
                      f" try {attempt + 1} of {RESTORE_TRIES} in {delay:g} s", file=sys.stderr)
                time.sleep(delay)
        return _FAILED, UserError(
            f"checkpoint at step {step} in {self.directory} could not be read in {RESTORE_TRIES} "
            f"tries ({_first_line(error)}); it stays in place: rerun once the storage answers")

    def _raise(self, step: int, outcome: int, value, outcomes: np.ndarray,
               requested: bool) -> None:
        """Raises what every process raises when `step` was not restored everywhere: this
        process's own error, or a UserError naming the process that failed."""
        if outcome == _FAILED:
            raise value
        if requested and outcome == _UNREADABLE:
            raise UserError(f"checkpoint at step {step} in {self.directory} is unreadable: "
                            f"{_first_line(value)}") from None
        failed = int(np.argmax(outcomes))  # the first with the worst outcome
        raise UserError(f"checkpoint at step {step} in {self.directory} could not be restored on "
                        f"process {failed} (see its error)")

    def _read(self, target_state, step: int, data_iterator, other_devices_ok: bool):
        """(state, device counts or None) read from `step`; raises what the read raised."""
        if not self._fault_injected and os.environ.get(READ_FAULT_ENV) == str(jax.process_index()):
            self._fault_injected = True
            raise OSError(errno.EIO, f"injected by {READ_FAULT_ENV}")
        metadata = self._manager.item_metadata(step).get("state")
        if metadata is None:
            raise Unreadable("its tree metadata (state/_METADATA) is missing")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        serialized, counts = ocp.tree.serialize_tree(abstract, keep_empty_nodes=True), None
        try:
            fits = (_leaf_signature(_without_per_device(metadata))
                    == _leaf_signature(_without_per_device(serialized)))
            counts = _device_counts(serialized, metadata) if fits else None
        except NotImplementedError:
            fits = False
        if not fits or (counts is not None and not other_devices_ok):
            what = (f"was written on {counts[0]} devices, this run has {counts[1]}" if fits
                    else "does not fit this config (model or optimizer changed?)")
            raise UserError(f"checkpoint at step {step} in {self.directory} {what}; use a new "
                            "--workdir")
        state = self._restore_state(target_state, step, metadata, keep_per_device=bool(counts))
        _check_finite(state)
        self._restore_position(step, data_iterator)
        return state, counts

    def _restore_state(self, target_state, step: int, metadata, keep_per_device: bool):
        """The state at `step`; with `keep_per_device`, its PER_DEVICE entries are not read and
        keep `target_state`'s values. Read by orbax's handler, not its Checkpointer, which ends a
        read at a barrier that a process whose read failed would never reach."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        serialized = ocp.tree.serialize_tree(abstract, keep_empty_nodes=True)
        target, kept = _as_saved(serialized, metadata), serialized
        if keep_per_device:
            target = _without_per_device(target)
            kept = _graft(serialized, ocp.tree.serialize_tree(target_state, keep_empty_nodes=True),
                          lambda _, mine: _zeros_where_abstract(mine))
        handler = ocp.PyTreeCheckpointHandler()
        try:
            state = handler.restore(self._path(step, "state"), args=ocp.args.PyTreeRestore(
                target, ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=keep_per_device))
        finally:
            handler.close()
        return ocp.tree.deserialize_tree(_with_empty(state, kept), abstract, keep_empty_nodes=True)

    def _path(self, step: int, item: str) -> epath.Path:
        return epath.Path(self.directory) / str(step) / item

    def _restore_position(self, step: int, data_iterator) -> None:
        """Sets `data_iterator` (None: nothing to do) to the position saved at `step`."""
        if data_iterator is None:
            return
        has_position = self._path(step, "data").is_dir()
        if step == 0 and not has_position:
            return  # a start written outside a run (a shrunk model): the data starts fresh
        if not has_position:
            raise UserError(f"checkpoint at step {step} holds no data-iterator position, but "
                            "data.on_device=False needs one; keep data.on_device as it was")
        try:  # the state loaded, so a failure here is a changed data config, not corruption
            grain.PyGrainCheckpointHandler().restore(
                self._path(step, "data"), args=grain.PyGrainCheckpointRestore(data_iterator))
        except (ValueError, KeyError) as e:
            if isinstance(e, json.JSONDecodeError):
                raise  # a damaged file, not a changed config: set aside
            raise UserError(f"the data-iterator position saved at step {step} does not fit this "
                            f"config ({_first_line(e)}); keep data.* as it was") from None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves `steps`, which every process found unreadable or saw found so, into
        `<dir>_corrupt/`: process 0 alone moves (on a shared mount no host moves what another
        reads), the others wait for it, then all list the directory again."""
        if not steps:
            return
        if jax.process_index() == 0:
            corrupt_dir = self.directory + "_corrupt"
            for step in steps:
                target, copy = os.path.join(corrupt_dir, str(step)), 1
                while os.path.exists(target):  # the same step may go bad more than once
                    target, copy = os.path.join(corrupt_dir, f"{step}.{copy}"), copy + 1
                try:
                    os.makedirs(corrupt_dir, exist_ok=True)
                    shutil.move(os.path.join(self.directory, str(step)), target)
                except OSError as e:  # the others wait at the barrier: never leave before it
                    print(f"warning: could not move checkpoint at step {step} to {target} "
                          f"({_first_line(e)}); it stays and is read again next time",
                          file=sys.stderr)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("unreadable checkpoints set aside")
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
