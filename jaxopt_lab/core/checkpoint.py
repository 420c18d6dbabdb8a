"""Checkpoints through orbax: save every N steps and at the end, keep K, resume the newest that loads.

A checkpoint holds the TrainState and, when the data come through grain, each process's data
iterator position (grain's own orbax handler, one file per process), so a resumed run sees exactly
the batches it would have seen.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
from typing import Any

import grain.python as grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxopt_lab.errors import UserError


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _check_finite(state) -> None:
    """Every saved checkpoint held finite values (the loop checks before saving), so NaN/inf
    after loading means the bytes were damaged."""
    for leaf in jax.tree.leaves(state):
        if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating) and not bool(
                jax.numpy.isfinite(leaf).all()):
            raise ValueError("restored values are not finite")


def _leaf_signature(tree) -> collections.Counter:
    """The multiset of (shape, dtype) of a tree's arrays: what must match to restore into it."""
    return collections.Counter((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


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
    """`restored` with the empty entries of `tree` that `_as_saved` left out put back."""
    if isinstance(tree, dict) and isinstance(restored, dict):
        return {k: _with_empty(restored[k], v) if k in restored else v for k, v in tree.items()}
    if isinstance(tree, list) and isinstance(restored, list | tuple):
        return [_with_empty(r, v) for r, v in zip(restored, tree, strict=True)]
    return restored


class Checkpointer:
    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.PyGrainCheckpointHandler()},
        )

    def save(self, step: int, state, data_iterator=None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, target_state, step: int | None = None,
                data_iterator=None) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint shaped like `target_state`, or exactly `step`.

        A newest checkpoint that fails to load (truncated by a crash, a full disk) is moved aside
        into `<dir>_corrupt/` with a warning and the one before it is tried. A checkpoint that
        loads but does not fit `target_state` (the model or optimizer changed) is an error, as is
        a requested `step` that fails to load. `data_iterator`, if given, is set to the saved
        position.
        """
        available = sorted(self._manager.all_steps(), reverse=True)
        if step is not None and step not in available:
            raise UserError(f"no checkpoint at step {step} in {self.directory}; "
                            f"available: {sorted(available)}")
        for candidate in available if step is None else [step]:
            try:
                metadata = self._manager.item_metadata(candidate)["state"]
                saved = _leaf_signature(metadata)
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a broken checkpoint
                if step is not None:
                    raise UserError(f"checkpoint at step {step} in {self.directory} is "
                                    f"unreadable: {_first_line(e)}") from None
                self._set_aside(candidate, e)
                continue
            if saved != _leaf_signature(target_state):
                raise UserError(f"checkpoint at step {candidate} in {self.directory} does not fit "
                                "this config (model or optimizer changed?); use a new --workdir")
            try:
                restored = self._restore_step(target_state, candidate, data_iterator)
                _check_finite(restored)
                return restored, candidate
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
                if step is not None:
                    raise UserError(f"checkpoint at step {step} in {self.directory} is "
                                    f"unreadable: {_first_line(e)}") from None
                self._set_aside(candidate, e)
        return None

    def _restore_step(self, target_state, step: int, data_iterator):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        target = _as_saved(ocp.tree.serialize_tree(abstract, keep_empty_nodes=True),
                           self._manager.item_metadata(step)["state"])
        state = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        state = ocp.tree.deserialize_tree(
            _with_empty(state, ocp.tree.serialize_tree(abstract, keep_empty_nodes=True)),
            abstract, keep_empty_nodes=True)
        if data_iterator is None:
            return state
        has_position = os.path.isdir(os.path.join(self.directory, str(step), "data"))
        if step == 0 and not has_position:
            return state  # a start written outside a run (a shrunk model): the data starts fresh
        if not has_position:
            raise UserError(f"checkpoint at step {step} holds no data-iterator position, but "
                            "data.on_device=False needs one; keep data.on_device as it was")
        try:  # the state loaded, so a failure here is a changed data config, not corruption
            self._manager.restore(
                step, args=ocp.args.Composite(data=grain.PyGrainCheckpointRestore(data_iterator)))
        except (ValueError, KeyError) as e:
            if isinstance(e, json.JSONDecodeError):
                raise  # a damaged file, not a changed config: the caller sets it aside
            raise UserError(f"the data-iterator position saved at step {step} does not fit this "
                            f"config ({_first_line(e)}); keep data.* as it was") from None
        return state

    def _set_aside(self, step: int, error: Exception) -> None:
        corrupt_dir = self.directory + "_corrupt"
        print(f"warning: checkpoint at step {step} is unreadable ({_first_line(error)}); "
              f"moved to {corrupt_dir}, trying the one before", file=sys.stderr)
        if jax.process_index() == 0:
            os.makedirs(corrupt_dir, exist_ok=True)
            target, copy = os.path.join(corrupt_dir, str(step)), 1
            while os.path.exists(target):  # the same step may go bad more than once
                target, copy = os.path.join(corrupt_dir, f"{step}.{copy}"), copy + 1
            shutil.move(os.path.join(self.directory, str(step)), target)
        multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
