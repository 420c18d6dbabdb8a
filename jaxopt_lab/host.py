"""The machine a measurement ran on, named so that a reader can tell machine drift from code
drift (`platform.processor()` is empty on most Linux hosts)."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name where Linux says it (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
