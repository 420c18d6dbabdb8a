"""Inference latencies of several models compared fairly: compiled alike, timed in turn.

One model's latency drifts by tens of percent over a minute on a shared machine (other processes,
frequency scaling). Timing every model in each round, for several rounds, and keeping each one's
best round puts them all under the same conditions, so the ratios between them hold even where
the absolute numbers do not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm


def compare_latency(
    forms: dict[str, tuple[Callable[..., Any], Any]],
    sample_x: Any,
    *,
    batch_sizes: tuple[int, ...] = (1, 256),
    rounds: int = 10,
    calls: int = 20,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """{name: {"latency_ms_batch<b>": ms, "latency_ms_batch<b>_rounds": [ms, ...]}}: each form's
    best over `rounds` of its median call, and every round's median (a ratio between two forms is
    taken within each round, where both met the same machine, to give its range).

    `forms` maps a name to (apply, variables), called as `apply(variables, x)`; the variables are
    arguments, not constants folded into the program, as a deployed model holds them. `sample_x`
    is one input [1, ...]; each batch is zeros of that shape with b rows.
    """
    compiled = {}
    for b in batch_sizes:
        x = jnp.zeros((b, *sample_x.shape[1:]), sample_x.dtype)
        for name, (apply, variables) in forms.items():
            compiled[name, b] = (jax.jit(apply).lower(variables, x).compile(), variables, x)
    per_round = {key: [] for key in compiled}
    for _ in tqdm(range(rounds), desc="latency rounds", disable=not progress, leave=False):
        for key, (fn, variables, x) in compiled.items():
            jax.block_until_ready(fn(variables, x))  # warm caches after the previous model
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(fn(variables, x))
                times.append(time.perf_counter() - start)
            per_round[key].append(statistics.median(times) * 1e3)
    return {name: {**{f"latency_ms_batch{b}": min(per_round[name, b]) for b in batch_sizes},
                   **{f"latency_ms_batch{b}_rounds": per_round[name, b] for b in batch_sizes}}
            for name in forms}
