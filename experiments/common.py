"""What the experiment scripts share: the machine's name, mean ± std, and results files that
several scripts fill in part by part."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """The machine a table was measured on, as its header names it."""
    return (f"{platform.machine()} {platform.processor() or ''} ({jax.default_backend()}, "
            f"{jax.device_count()} device(s), jax {jax.__version__})").replace("  ", " ")


def stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values}


def update_summary(path: Path, fields: dict) -> None:
    """Sets `fields` in the JSON object at `path`, keeping the keys other scripts wrote."""
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(fields)
    path.write_text(json.dumps(summary, indent=2) + "\n")
