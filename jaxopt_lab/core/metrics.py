"""Run metrics: one JSON line per logged step in metrics.jsonl, mirrored to TensorBoard events."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np


def _import_summary_writer():
    """tensorboardX imports torch, when installed (Optuna's GP sampler wants it), only to accept
    torch tensors: 2-3 s of every process's start. We write numbers, so it is kept from seeing
    torch unless something imported torch already."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # an import of it raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


SummaryWriter = _import_summary_writer()


def _plain(value: Any) -> Any:
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None  # a line cut short by a crash or a full disk


def read_metrics(workdir: str) -> list[dict]:
    """All complete records of a run's metrics.jsonl, in order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(_parse, f) if r is not None]


class MetricsWriter:
    """Appends metrics; only the process that owns logging (process 0) writes anything.

    A population's records carry a "member" index, and each member gets its own TensorBoard
    run (tensorboard/member_<i>), so TensorBoard overlays their curves.
    """

    def __init__(self, workdir: str, enabled: bool = True, members: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        directory = os.path.join(workdir, "tensorboard")
        if not enabled:
            self._tb = []
        elif members is None:
            self._tb = [SummaryWriter(directory)]
        else:
            self._tb = [SummaryWriter(os.path.join(directory, f"member_{i}"))
                        for i in range(members)]

    def truncate_after(self, step: int) -> None:
        """Drops records past `step`: a resumed run rewrites the steps it lost, so no duplicates."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(os.path.dirname(self.path)) if r["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, step: int, metrics: dict[str, Any], member: int | None = None) -> None:
        if not self.enabled:
            return
        tag = {} if member is None else {"member": member}
        record = {"step": int(step), **tag, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        board = self._tb[member or 0]
        for key, value in metrics.items():
            value = _plain(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                board.add_scalar(key, value, step)

    def close(self) -> None:
        for board in self._tb:
            board.close()
