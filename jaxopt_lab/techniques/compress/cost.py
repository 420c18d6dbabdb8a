"""A cost model toward scale: a run's measured step costs projected onto W workers and a link.

A compressor pays for itself only where the bytes it saves take longer to send than its own
compute takes, and that depends on the cluster: W, the link bandwidth B and its latency alpha.
This module turns what one run measures (compute time per step, the compressor's overhead per
step, `comm_bytes`) into a projected step time, so a user sees where compression pays before
renting the cluster. Pure Python; the experiment scripts write its tables and plots.

Step time = compute_s + overhead_s + the collectives' time, with ring algorithms:
  ring all-reduce of S bytes:                2 (W-1)/W * S / B + 2 (W-1) * alpha per call
      (a reduce-scatter then an all-gather, W-1 steps each, S/W bytes per step);
  ring all-gather, each worker giving S:     (W-1) * S / B     + (W-1) * alpha per call
      (each worker receives the other W-1 payloads, so the bandwidth term grows linearly in W
      where the all-reduce's saturates at 2 S / B: gathered sparse payloads scale worse).
Bandwidth terms add up by bytes over calls; latency terms count calls. W = 1 costs nothing.

Assumptions:
- no overlap of communication with compute (nor between collectives): an upper bound on time;
- homogeneous links, each worker with bandwidth B full duplex; Gb/s means 1e9 bits per second;
- weak scaling: the per-worker batch, hence compute_s per worker, stays fixed as W grows;
- every worker contributes the same bytes to an all-gather (true here: k and shapes are fixed);
- the compressor's overhead is measured on this machine at the measured device count and held
  fixed; the all-gather methods decode W payloads, so at large W it is an underestimate;
- latency alpha is per message (per ring step). DEFAULT_LATENCY_S = 5 us is of the order of an
  RDMA (InfiniBand / RoCE) hop including the collective library's own per-step overhead; TCP over
  commodity Ethernet is more like tens of microseconds: pass latency_s for such a link.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

DEFAULT_LATENCY_S = 5e-6
DEFAULT_WORKERS = (8, 16, 32, 64, 128, 256, 512, 1024)
DEFAULT_BANDWIDTHS_GBPS = (1.0, 10.0, 100.0)

# All-gathers per step of the element-wise methods: one per payload name (exchange.py buckets
# every tensor's payload under its name): (index, value), (bits, scale), (q, scale).
GATHER_CALLS = {"topk": 2, "randomk": 2, "signsgd": 2, "qsgd": 2, "int8": 2}
POWERSGD_CALLS = 2  # one all-reduce for all the P factors, one for all the Q factors


@dataclasses.dataclass(frozen=True)
class Collectives:
    """What one worker hands to collectives in one step."""

    allreduce_bytes: float = 0.0  # summed over the all-reduce calls
    allreduce_calls: int = 0
    allgather_bytes: float = 0.0  # this worker's contribution, summed over the all-gather calls
    allgather_calls: int = 0

    def __post_init__(self):
        if min(self.allreduce_bytes, self.allreduce_calls, self.allgather_bytes,
               self.allgather_calls) < 0:
            raise ValueError(f"negative bytes or calls in {self}")


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """One method's measured per-worker step: compute, compression overhead, collectives."""

    compute_s: float  # forward + backward at the per-worker batch
    overhead_s: float  # the compressor's own compute (encode, decode, error feedback)
    collectives: Collectives


def collectives(method: str, comm_bytes: float, *, plain_bytes: float = 0.0) -> Collectives:
    """The collectives of one step of `method` that reports `comm_bytes` (its stat).

    plain_bytes: the bytes of the tensors sent uncompressed (under `min_size`; for PowerSGD also
    vectors and matrices its factors would not shrink), which the stats do not separate.
      none:      comm_bytes in one all-reduce (plain_bytes is ignored);
      powersgd:  all of comm_bytes in all-reduces: P and Q (2 calls) + 1 for the plain tensors;
      the rest:  comm_bytes - plain_bytes in GATHER_CALLS all-gathers + plain_bytes in 1 all-reduce.
    With plain_bytes = 0 (the default) an all-gather method's small tensors count as gathered:
    more bandwidth than the truth for W > 2, one all-reduce's latency less.
    """
    if not 0 <= plain_bytes <= comm_bytes:
        raise ValueError(f"plain_bytes={plain_bytes} must lie in [0, comm_bytes={comm_bytes}]")
    plain_calls = int(plain_bytes > 0)
    compressed = comm_bytes - plain_bytes
    if method == "none":
        return Collectives(comm_bytes, 1 if comm_bytes > 0 else 0)
    if method == "powersgd":
        return Collectives(comm_bytes, (POWERSGD_CALLS if compressed > 0 else 0) + plain_calls)
    if method in GATHER_CALLS:
        return Collectives(plain_bytes, plain_calls, compressed,
                           GATHER_CALLS[method] if compressed > 0 else 0)
    raise ValueError(f"unknown method {method!r}; known: none, powersgd, {', '.join(GATHER_CALLS)}")


def step_costs(method: str, compute_s: float, comm_bytes: float, *, overhead_s: float = 0.0,
               plain_bytes: float = 0.0) -> StepCosts:
    """StepCosts from a run's measurements (see `collectives` for plain_bytes)."""
    return StepCosts(compute_s, overhead_s, collectives(method, comm_bytes,
                                                        plain_bytes=plain_bytes))


def _bytes_per_s(bandwidth_gbps: float) -> float:
    if not bandwidth_gbps > 0:
        raise ValueError(f"bandwidth_gbps must be > 0, got {bandwidth_gbps}")
    return bandwidth_gbps * 1e9 / 8


def _check_workers(workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")


def allreduce_s(payload_bytes: float, workers: int, bandwidth_gbps: float,
                latency_s: float = DEFAULT_LATENCY_S, calls: int = 1) -> float:
    """Ring all-reduce time of `payload_bytes` (in total over `calls` calls) on `workers`."""
    _check_workers(workers)
    w = workers
    return 2 * (w - 1) / w * payload_bytes / _bytes_per_s(bandwidth_gbps) \
        + calls * 2 * (w - 1) * latency_s


def allgather_s(payload_bytes: float, workers: int, bandwidth_gbps: float,
                latency_s: float = DEFAULT_LATENCY_S, calls: int = 1) -> float:
    """Ring all-gather time where each worker contributes `payload_bytes` over `calls` calls."""
    _check_workers(workers)
    return (workers - 1) * (payload_bytes / _bytes_per_s(bandwidth_gbps) + calls * latency_s)


def comm_s(c: Collectives, workers: int, bandwidth_gbps: float,
           latency_s: float = DEFAULT_LATENCY_S) -> float:
    """Time of one step's collectives, one after another."""
    return (allreduce_s(c.allreduce_bytes, workers, bandwidth_gbps, latency_s, c.allreduce_calls)
            + allgather_s(c.allgather_bytes, workers, bandwidth_gbps, latency_s,
                          c.allgather_calls))


def projected_step_s(costs: StepCosts, workers: int, bandwidth_gbps: float,
                     latency_s: float = DEFAULT_LATENCY_S) -> float:
    """Projected time of one step on `workers` at `bandwidth_gbps` and `latency_s`."""
    return costs.compute_s + costs.overhead_s + comm_s(costs.collectives, workers,
                                                       bandwidth_gbps, latency_s)


def _fixed_and_volume(costs: StepCosts, workers: int, latency_s: float) -> tuple[float, float]:
    """(F seconds, V Gb) such that step time = F + V / bandwidth_gbps: linear in 1 / B."""
    c, w = costs.collectives, workers
    fixed = (costs.compute_s + costs.overhead_s
             + (w - 1) * latency_s * (2 * c.allreduce_calls + c.allgather_calls))
    volume_bytes = 2 * (w - 1) / w * c.allreduce_bytes + (w - 1) * c.allgather_bytes
    return fixed, volume_bytes * 8 / 1e9


def break_even_gbps(method_costs: StepCosts, baseline_costs: StepCosts, workers: int,
                    latency_s: float = DEFAULT_LATENCY_S) -> float:
    """The bandwidth (Gb/s) below which the method's step is faster than the baseline's.

    Both step times are F + V / B, so they cross once at most, at B = dV / dF (dV: volume the
    method saves, dF: fixed time it adds). Returns math.inf when the method is faster at every
    bandwidth, and 0.0 when it is not faster at any low bandwidth: never faster, or (it sends
    more but adds less fixed time) faster only above B = dV / dF, which projected_step_s shows.
    """
    _check_workers(workers)
    f_m, v_m = _fixed_and_volume(method_costs, workers, latency_s)
    f_b, v_b = _fixed_and_volume(baseline_costs, workers, latency_s)
    saved, added = v_b - v_m, f_m - f_b
    if saved > 0:
        return math.inf if added <= 0 else saved / added
    return math.inf if saved == 0 and added < 0 else 0.0


def projection_table(methods: Mapping[str, StepCosts],
                     workers: Iterable[int] = DEFAULT_WORKERS,
                     bandwidths_gbps: Iterable[float] = DEFAULT_BANDWIDTHS_GBPS,
                     latency_s: float = DEFAULT_LATENCY_S,
                     baseline: str | None = "none") -> list[dict]:
    """One row per (method, workers, bandwidth), in that nesting order, for a Markdown table or
    a plot. With `baseline` (a key of `methods`) each row also has `speedup` (baseline step /
    this step) and `break_even_gbps`; with baseline=None both are None."""
    if baseline is not None and baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not among the methods {sorted(methods)}")
    workers, bandwidths_gbps = tuple(workers), tuple(bandwidths_gbps)
    rows = []
    for name, costs in methods.items():
        for w in workers:
            even = None if baseline is None else break_even_gbps(costs, methods[baseline], w,
                                                                 latency_s)
            for b in bandwidths_gbps:
                step = projected_step_s(costs, w, b, latency_s)
                base = None if baseline is None else projected_step_s(methods[baseline], w, b,
                                                                      latency_s)
                rows.append({"method": name, "workers": w, "bandwidth_gbps": b,
                             "latency_s": latency_s, "compute_s": costs.compute_s,
                             "overhead_s": costs.overhead_s,
                             "comm_s": comm_s(costs.collectives, w, b, latency_s),
                             "step_s": step, "speedup": None if base is None else base / step,
                             "break_even_gbps": even})
    return rows
