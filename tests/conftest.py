"""Shared fixtures: tiny configs that train in seconds on two CPU cores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# One persistent XLA compilation cache for the whole suite, in-process and in the subprocesses the
# tests start (they inherit the environment): most tests compile the same tiny steps, and on two
# CPU cores compiling, not training, is what the suite spends its time on.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# LLVM at -O0 for the tests' programs: compiling takes about half as long and the tiny programs
# run about as fast. Every comparison a test makes is between programs compiled alike; subprocesses
# keep these flags (tests set the device count with helpers.xla_flags, which keeps the rest).
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = " ".join(
    [*os.environ.get("XLA_FLAGS", "").split(),
     *(f for f in FAST_COMPILE if f.split("=")[0] not in os.environ.get("XLA_FLAGS", ""))])

# OpenVINO's usage telemetry (on unless opted out, docs/deploy.md) forks a process at
# `import openvino`, beside JAX's threads; it stays off where CI=true.
os.environ.setdefault("CI", "true")


@pytest.fixture(scope="session", autouse=True)
def _data_dir(tmp_path_factory):
    """One data dir for the whole session (builders lock it, so xdist workers can share)."""
    shared = os.environ.get("JAXOPT_LAB_TEST_DATA_DIR", str(ROOT / ".cache" / "test-data"))
    os.environ["JAXOPT_LAB_DATA_DIR"] = shared
    yield shared


@pytest.fixture(scope="module")
def env() -> dict:
    """What a module's subprocess runs add to the environment: nothing, so that they share the
    suite's compilation cache (above) with every other module's runs of the same programs."""
    return {}
