"""The device's usable matmul throughput, measured once and cached: the denominator of
model-FLOPs utilisation (MFU).

Vendor peaks are not what a program reaches (clocks, memory, the compiler), so the peak is a
short probe: a large square matmul in the dtype the model computes in, best of a few timed
calls. The result is cached per backend, device kind, dtype and size in
~/.cache/jaxopt_lab/matmul_peak.json (JAXOPT_LAB_CACHE overrides the directory), so a profile
pays for it once per machine.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp


def _cache_path() -> str:
    root = os.environ.get("JAXOPT_LAB_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxopt_lab")
    return os.path.join(root, "matmul_peak.json")


def matmul_peak(dtype: str = "float32", n: int | None = None, calls: int = 5) -> dict:
    """{"tflops", "n", "dtype", "device", "cached"}: the best n×n×n matmul rate of this device.

    `n` defaults to 1024 on CPUs (a probe of a second or two) and 8192 on accelerators.
    """
    device = jax.devices()[0]
    n = n or (1024 if device.platform == "cpu" else 8192)
    key = f"{device.platform}:{device.device_kind}:{dtype}:{n}"
    path = _cache_path()
    cache = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}  # an unreadable cache is measured again and rewritten
    if key in cache:
        return {**cache[key], "cached": True}
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    entry = {"tflops": 2 * n**3 / best / 1e12, "n": n, "dtype": dtype,
             "device": f"{device.platform} {device.device_kind}"}
    cache[key] = entry
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(cache, f, indent=2)
    os.replace(path + ".tmp", path)
    return {**entry, "cached": False}
