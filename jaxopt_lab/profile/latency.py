"""Inference latencies of several models compared fairly: compiled alike, timed in turn.

One model's latency drifts by tens of percent over a minute on a shared machine (other processes,
frequency scaling). Timing every model in each round, for several rounds, and keeping each one's
best round puts them all under the same conditions, so the ratios between them hold even where
the absolute numbers do not.
"""

from __future__ import annotations

import functools
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
            fn = jax.jit(apply).lower(variables, x).compile()
            compiled[name, b] = functools.partial(_blocking, fn, variables, x)
    per_round = time_interleaved(compiled, rounds=rounds, calls=calls, progress=progress)
    return {name: {**{f"latency_ms_batch{b}": min(per_round[name, b]) for b in batch_sizes},
                   **{f"latency_ms_batch{b}_rounds": per_round[name, b] for b in batch_sizes}}
            for name in forms}


def time_interleaved(calls_of: dict[Any, Callable[[], Any]], *, rounds: int = 10,
                     calls: int = 20, progress: bool = True,
                     settle_s: float = 0.0, warm_s: float = 0.0) -> dict[Any, list[float]]:
    """{key: [each round's median call in ms]}: every callable timed once per round, in turn,
    after untimed calls (warming caches after the previous one): one, and more until `warm_s`
    has passed. The callable must return only when its result is ready (an XLA call blocked on,
    a runtime's synchronous run). `settle_s`: a pause before each callable's turn, for runtimes
    whose worker threads keep spinning after a call and would take the cores from the next
    one's; after such a pause a runtime's thread pool needs more than one call to be warm."""
    per_round = {key: [] for key in calls_of}
    for _ in tqdm(range(rounds), desc="latency rounds", disable=not progress, leave=False):
        for key, call in calls_of.items():
            time.sleep(settle_s)
            warm_until = time.perf_counter() + warm_s
            call()
            while time.perf_counter() < warm_until:
                call()
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            per_round[key].append(statistics.median(times) * 1e3)
    return per_round


def _blocking(fn, variables, x):
    return jax.block_until_ready(fn(variables, x))
