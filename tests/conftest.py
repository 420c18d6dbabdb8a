"""Shared fixtures: tiny configs that train in seconds on two CPU cores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session", autouse=True)
def _data_dir(tmp_path_factory):
    """One data dir for the whole session (builders lock it, so xdist workers can share)."""
    shared = os.environ.get("JAXOPT_LAB_TEST_DATA_DIR", str(ROOT / ".cache" / "test-data"))
    os.environ["JAXOPT_LAB_DATA_DIR"] = shared
    yield shared
