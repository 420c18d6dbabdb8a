"""Run metrics: one JSON line per logged step in metrics.jsonl, mirrored to TensorBoard events."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter


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
    """Appends metrics; only the process that owns logging (process 0) writes anything."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard")) if enabled else None

    def truncate_after(self, step: int) -> None:
        """Drops records past `step`: a resumed run rewrites the steps it lost, so no duplicates."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(os.path.dirname(self.path)) if r["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
