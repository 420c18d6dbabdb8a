"""Checkpoints through orbax: save every N steps and at the end, keep K, resume the newest that loads.

A checkpoint holds the TrainState and, when the data come through grain, the data iterator's
position, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


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

    def restore(self, target_state) -> tuple[Any, dict | None, int] | None:
        """Restores the newest readable checkpoint shaped like `target_state`.

        A checkpoint that fails to load (e.g. truncated by a crash or a full disk) is moved aside
        into `<dir>_corrupt/` with a warning and the one before it is tried.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                items = {"state": ocp.args.StandardRestore(abstract)}
                if os.path.isdir(os.path.join(self.directory, str(step), "data")):
                    items["data"] = ocp.args.JsonRestore()
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
                self._set_aside(step, e)
                continue
            return restored["state"], restored.get("data"), step
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        corrupt_dir = self.directory + "_corrupt"
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        log.warning("checkpoint at step %d is unreadable (%s); moved to %s, trying the one before",
                    step, reason, corrupt_dir)
        print(f"warning: checkpoint at step {step} is unreadable ({reason}); "
              f"moved to {corrupt_dir}, resuming from the one before")
        if jax.process_index() == 0:
            os.makedirs(corrupt_dir, exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)),
                        os.path.join(corrupt_dir, str(step)))
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
