"""The compression cost model (`jaxopt_lab.techniques.compress.cost`): pure arithmetic, fast."""

from __future__ import annotations

import itertools
import math

import pytest

from jaxopt_lab.techniques.compress import METHODS, cost
from jaxopt_lab.techniques.compress.cost import Collectives, StepCosts

# 8 Gb/s = 1e9 bytes/s, so S = 1e6 bytes takes S / B = 1 ms.
S, GBPS, ALPHA = 1e6, 8.0, 1e-5


def test_ring_formulas_match_hand_computed_values():
    # all-reduce: 2 (W-1)/W S/B + 2 (W-1) alpha per call
    assert cost.allreduce_s(S, 2, GBPS, ALPHA) == pytest.approx(1e-3 + 2e-5, rel=1e-12)
    assert cost.allreduce_s(S, 4, GBPS, ALPHA) == pytest.approx(1.5e-3 + 6e-5, rel=1e-12)
    assert cost.allreduce_s(S, 4, GBPS, ALPHA, calls=3) == pytest.approx(1.5e-3 + 18e-5,
                                                                          rel=1e-12)
    # all-gather: (W-1) S/B + (W-1) alpha per call
    assert cost.allgather_s(S, 2, GBPS, ALPHA) == pytest.approx(1e-3 + 1e-5, rel=1e-12)
    assert cost.allgather_s(S, 4, GBPS, ALPHA) == pytest.approx(3e-3 + 3e-5, rel=1e-12)
    assert cost.allgather_s(S, 4, GBPS, ALPHA, calls=2) == pytest.approx(3e-3 + 6e-5, rel=1e-12)


def test_one_worker_communicates_for_free():
    assert cost.allreduce_s(S, 1, GBPS, ALPHA, calls=5) == 0.0
    assert cost.allgather_s(S, 1, GBPS, ALPHA, calls=5) == 0.0
    c = Collectives(S, 3, S, 2)
    assert cost.projected_step_s(StepCosts(0.01, 0.002, c), 1, GBPS, ALPHA) == 0.012


def test_allgather_grows_linearly_while_allreduce_saturates():
    bound = 2 * S / (GBPS * 1e9 / 8)  # the all-reduce's bandwidth term tends to 2 S / B
    two = cost.allgather_s(S, 2, GBPS, latency_s=0.0)
    for w in (2, 8, 64, 1024):
        reduce_s = cost.allreduce_s(S, w, GBPS, latency_s=0.0)
        assert reduce_s <= bound
        assert cost.allgather_s(S, w, GBPS, latency_s=0.0) == pytest.approx((w - 1) * two)
    assert cost.allreduce_s(S, 1024, GBPS, latency_s=0.0) > 0.99 * bound
    ratio = [cost.allgather_s(S, w, GBPS, 0.0) / cost.allreduce_s(S, w, GBPS, 0.0)
             for w in (8, 1024)]
    assert ratio == pytest.approx([4.0, 512.0])  # W / 2


def test_bandwidth_and_workers_are_checked():
    with pytest.raises(ValueError, match="bandwidth"):
        cost.allreduce_s(S, 4, 0.0)
    with pytest.raises(ValueError, match="workers"):
        cost.allgather_s(S, 0, GBPS)
    with pytest.raises(ValueError, match="workers"):
        cost.allreduce_s(S, 2.0, GBPS)


def test_collectives_split_by_method():
    assert cost.collectives("none", 4e6) == Collectives(4e6, 1, 0.0, 0)
    assert cost.collectives("powersgd", 1e5) == Collectives(1e5, 2, 0.0, 0)
    assert cost.collectives("powersgd", 1e5, plain_bytes=2e4) == Collectives(1e5, 3, 0.0, 0)
    assert cost.collectives("powersgd", 2e4, plain_bytes=2e4) == Collectives(2e4, 1, 0.0, 0)
    for method in ("topk", "randomk", "signsgd", "qsgd", "int8"):
        assert cost.collectives(method, 1e5) == Collectives(0.0, 0, 1e5, 2)
        assert cost.collectives(method, 1e5, plain_bytes=3e4) == Collectives(3e4, 1, 7e4, 2)
    with pytest.raises(ValueError, match="plain_bytes"):
        cost.collectives("topk", 1e5, plain_bytes=2e5)
    with pytest.raises(ValueError, match="unknown method"):
        cost.collectives("dgc", 1e5)
    with pytest.raises(ValueError, match="negative"):
        Collectives(-1.0, 1)


def test_every_configurable_method_has_a_split():
    assert set(cost.GATHER_CALLS) | {"none", "powersgd"} == set(METHODS)
    for method in METHODS:
        cost.collectives(method, 1e5)


def test_projected_step_adds_compute_overhead_and_collectives():
    costs = cost.step_costs("topk", 0.01, 1e6, overhead_s=0.002, plain_bytes=2e5)
    # all-reduce of 2e5 (1 call): 1.5 * 2e-4 + 6e-5; all-gather of 8e5 (2 calls): 3 * 8e-4 + 6e-5
    expected = 0.01 + 0.002 + (3e-4 + 6e-5) + (2.4e-3 + 6e-5)
    assert cost.projected_step_s(costs, 4, GBPS, ALPHA) == pytest.approx(expected, rel=1e-12)


def test_break_even_matches_hand_value_and_solves_the_equality():
    base = cost.step_costs("none", 0.01, 4e6)
    psgd = cost.step_costs("powersgd", 0.01, 1e5, overhead_s=1e-3)
    # saved volume 1.5 * 3.9e6 * 8 / 1e9 Gb; added fixed 1e-3 + 2 * 3 * alpha s
    expected = 1.5 * 3.9e6 * 8 / 1e9 / (1e-3 + 6e-5)
    assert cost.break_even_gbps(psgd, base, 4, ALPHA) == pytest.approx(expected, rel=1e-12)
    topk = cost.step_costs("topk", 0.01, 3e4, overhead_s=4e-3, plain_bytes=1e4)
    cases = [(psgd, w) for w in (2, 16, 1024)] + [(topk, w) for w in (2, 16, 64)]
    for method, w in cases:
        b = cost.break_even_gbps(method, base, w, ALPHA)
        assert 0 < b < math.inf
        at_b = [cost.projected_step_s(c, w, b, ALPHA) for c in (method, base)]
        assert at_b[0] == pytest.approx(at_b[1], rel=1e-9)
        assert cost.projected_step_s(method, w, b / 2, ALPHA) < cost.projected_step_s(
            base, w, b / 2, ALPHA)
        assert cost.projected_step_s(method, w, b * 2, ALPHA) > cost.projected_step_s(
            base, w, b * 2, ALPHA)
    # the gathered payload grows with W: at 1024 workers top-k's 2e4 bytes exceed all-reduce's
    assert cost.break_even_gbps(topk, base, 1024, ALPHA) == 0.0


def test_fewer_bytes_or_less_latency_wins_at_every_bandwidth():
    base = StepCosts(0.01, 0.0, Collectives(4e6, 2))
    small = StepCosts(0.01, 0.0, Collectives(1e5, 2))
    assert cost.break_even_gbps(small, base, 64, ALPHA) == math.inf
    fewer_calls = StepCosts(0.01, 0.0, Collectives(4e6, 1))  # same bytes, less latency
    assert cost.break_even_gbps(fewer_calls, base, 64, ALPHA) == math.inf
    for b in (1e-3, 1.0, 100.0, 1e6):
        assert cost.projected_step_s(fewer_calls, 64, b, ALPHA) < cost.projected_step_s(
            base, 64, b, ALPHA)
        assert cost.projected_step_s(small, 64, b, ALPHA) < cost.projected_step_s(base, 64, b,
                                                                                   ALPHA)


def test_never_faster_gives_zero():
    base = cost.step_costs("none", 0.01, 4e6)
    same_bytes_more_work = cost.step_costs("powersgd", 0.01, 4e6, overhead_s=1e-3)
    assert cost.break_even_gbps(same_bytes_more_work, base, 8, ALPHA) == 0.0
    assert cost.break_even_gbps(base, base, 8, ALPHA) == 0.0  # a tie is not faster
    # more bytes but fewer latency terms: slower at low bandwidth, faster only at high -> 0.0
    gather = StepCosts(0.01, 0.0, Collectives(allgather_bytes=1e6, allgather_calls=1))
    reduce = StepCosts(0.01, 0.0, Collectives(1e6, 1))
    assert cost.break_even_gbps(gather, reduce, 8, ALPHA) == 0.0
    assert cost.projected_step_s(gather, 8, 1e6, ALPHA) < cost.projected_step_s(reduce, 8, 1e6,
                                                                                ALPHA)


def test_table_has_one_row_per_method_workers_and_bandwidth():
    methods = {"none": cost.step_costs("none", 0.01, 4e6),
               "powersgd": cost.step_costs("powersgd", 0.01, 1e5, overhead_s=1e-3),
               "topk": cost.step_costs("topk", 0.01, 8e4, overhead_s=2e-3)}
    rows = cost.projection_table(methods, latency_s=ALPHA)
    keys = [(r["method"], r["workers"], r["bandwidth_gbps"]) for r in rows]
    assert keys == list(itertools.product(methods, cost.DEFAULT_WORKERS,
                                          cost.DEFAULT_BANDWIDTHS_GBPS))
    assert cost.DEFAULT_WORKERS[0] == 8 and cost.DEFAULT_WORKERS[-1] == 1024
    for r in rows:
        c = methods[r["method"]]
        step = cost.projected_step_s(c, r["workers"], r["bandwidth_gbps"], ALPHA)
        base = cost.projected_step_s(methods["none"], r["workers"], r["bandwidth_gbps"], ALPHA)
        assert r["step_s"] == step
        assert r["step_s"] == pytest.approx(r["compute_s"] + r["overhead_s"] + r["comm_s"])
        assert r["speedup"] == pytest.approx(base / step)
        assert r["break_even_gbps"] == cost.break_even_gbps(c, methods["none"], r["workers"],
                                                             ALPHA)
    plain = cost.projection_table(methods, workers=(2,), bandwidths_gbps=(1,), baseline=None)
    assert len(plain) == 3 and all(r["speedup"] is None for r in plain)
    with pytest.raises(ValueError, match="baseline"):
        cost.projection_table(methods, baseline="allreduce")
