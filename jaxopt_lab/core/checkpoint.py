"""Checkpoints through orbax: save every N steps and at the end, keep K, resume the newest that loads.

A checkpoint holds the TrainState and, when the data come through grain, the data iterator's
position, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxopt_lab.errors import UserError

def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


class Checkpointer:
    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def save(self, step: int, state, data_state: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, target_state, step: int | None = None) -> tuple[Any, dict | None, int] | None:
        """Restores the newest readable checkpoint shaped like `target_state`, or exactly `step`.

        A newest checkpoint that fails to load (truncated by a crash, a full disk) is moved aside
        into `<dir>_corrupt/` with a warning and the one before it is tried. A requested `step`
        that fails to load is an error instead.
        """
        available = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            if step not in available:
                raise UserError(f"no checkpoint at step {step} in {self.directory}; "
                                f"available: {sorted(available)}")
            try:
                return self._restore_step(target_state, step)
            except Exception as e:  # noqa: BLE001 - reported to the user in one line
                raise UserError(f"checkpoint at step {step} in {self.directory} is unreadable: "
                                f"{_first_line(e)}") from None
        for candidate in available:
            try:
                return self._restore_step(target_state, candidate)
            except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
                self._set_aside(candidate, e)
        return None

    def _restore_step(self, target_state, step: int) -> tuple[Any, dict | None, int]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if os.path.isdir(os.path.join(self.directory, str(step), "data")):
            items["data"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored.get("data"), step

    def _set_aside(self, step: int, error: Exception) -> None:
        corrupt_dir = self.directory + "_corrupt"
        reason = _first_line(error)
        print(f"warning: checkpoint at step {step} is unreadable ({reason}); "
              f"moved to {corrupt_dir}, trying the one before", file=sys.stderr)
        if jax.process_index() == 0:
            os.makedirs(corrupt_dir, exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)),
                        os.path.join(corrupt_dir, str(step)))
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
