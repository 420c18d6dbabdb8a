"""The automatic steps-per-call choice: measured on training steps, bounded by the run's time."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from helpers import tiny_config

from jaxopt_lab import default_config, model_config, train_and_evaluate, validate
from jaxopt_lab.core import callsize
from jaxopt_lab.core.callsize import CHOICE_BUDGET, CallSizeChooser


class FakeClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(monkeypatch, total, compile_s, step_s, candidate=50, start=0):
    """Drives a chooser as the loop does, on a clock advanced by the given costs: the first call
    at each K costs `compile_s[k]` more. Returns the chooser, the run's time and the calls."""
    clock = FakeClock()
    monkeypatch.setattr(callsize.time, "perf_counter", clock)
    chooser = CallSizeChooser(candidate, start, total)
    compiled, calls, step = set(), [], start
    carry = jnp.zeros(())
    while step < total:
        k = chooser.next_k(step)
        clock.now += k * step_s[k] + (0.0 if k in compiled else compile_s[k])
        compiled.add(k)
        calls.append((step, k))
        step += k
        chooser.after_call(step, carry)
    return chooser, clock.now, calls


def test_slow_steps_never_compile_a_scan(monkeypatch):
    # A ResNet-like step: dispatch is noise, so trying K cannot pay for its compile.
    chooser, _, calls = simulate(monkeypatch, 5000, {1: 20.0, 50: 40.0}, {1: 0.45, 50: 0.40})
    assert {k for _, k in calls} == {1} and not chooser.tried
    assert chooser.summary()["steps_per_call"] == 1
    assert chooser.summary()["steps_per_call_choice_s"] == 0.0


def test_short_fast_run_does_not_pay_for_a_second_compile(monkeypatch):
    # 3000 MLP steps of 0.5 ms are 1.5 s: a 0.5 s compile is not worth risking for them.
    chooser, _, calls = simulate(monkeypatch, 3000, {1: 0.5, 50: 0.6}, {1: 5e-4, 50: 2.5e-4})
    assert {k for _, k in calls} == {1} and not chooser.tried


def test_long_fast_run_tries_k_keeps_its_steps_and_picks_the_faster(monkeypatch):
    chooser, run_s, calls = simulate(monkeypatch, 300_000, {1: 0.5, 50: 0.6},
                                     {1: 5e-4, 50: 2.5e-4})
    assert chooser.tried and chooser.k == 50
    assert sum(k for _, k in calls) == 300_000  # every measured step was a training step
    assert all(step % 50 == 0 for step, k in calls if k == 50)  # boundaries stay on call ends
    assert 0 < chooser.choice_s <= 0.05 * run_s


def test_a_slower_scan_is_tried_then_dropped_within_budget(monkeypatch):
    # XLA:CPU's scanned conv step ran ~2.6x slower than one call per step.
    chooser, run_s, calls = simulate(monkeypatch, 300_000, {1: 1.0, 50: 2.0},
                                     {1: 1.2e-3, 50: 3.1e-3})
    assert chooser.tried and chooser.k == 1
    assert calls[-1][1] == 1
    assert 0 < chooser.choice_s <= CHOICE_BUDGET * run_s


def test_a_resumed_run_chooses_over_its_remaining_steps(monkeypatch):
    chooser, _, calls = simulate(monkeypatch, 300_100, {1: 0.5, 50: 0.6},
                                 {1: 5e-4, 50: 2.5e-4}, start=137)
    assert chooser.k == 50 and calls[0] == (137, 1)
    assert all(step % 50 == 0 for step, k in calls if k == 50)


def test_fixed_steps_per_call_is_used_as_given(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(callsize.time, "perf_counter", clock)
    chooser = CallSizeChooser(50, 0, 100, fixed=10)
    assert not chooser.choosing and chooser.next_k(0) == 10 and chooser.next_k(95) == 1


@pytest.mark.parametrize("model", ["mlp", "resnet"])
def test_the_choice_costs_at_most_five_percent_of_a_short_run(tmp_path, model):
    """A fast model (the MLP) and a slow one (a ResNet on 32x32 images), chosen automatically:
    what the choosing cost, as the run measured it, is within 5 % of its training time."""
    if model == "mlp":
        config = tiny_config("mlp", steps=400, steps_per_call=0, log_every=50, eval_every=400)
    else:
        config = default_config()
        config.data.name = "synthetic"
        config.data.synthetic_shape = (32, 32, 3)
        config.data.batch_size = 32
        config.model = model_config("resnet", depth=8, width=8)
        config.train.update(steps=40, eval_every=40, log_every=20, checkpoint_every=40,
                            steps_per_call=0, progress=False, measure=False)
        validate(config)
    summary = train_and_evaluate(config, str(tmp_path))
    assert summary["steps"] == config.train.steps
    assert summary["steps_per_call"] in (1, 50 if model == "mlp" else 20)  # or log/eval gcd
    assert summary["steps_per_call_choice_s"] <= 0.05 * summary["train_wall_s"]
    if model == "resnet":  # milliseconds per step: dispatch is noise, no scan is compiled
        assert summary["step_s_at_k1"] >= callsize.DISPATCH_NOISE_S
        assert summary["steps_per_call"] == 1
