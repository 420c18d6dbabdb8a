"""Choosing K, the steps per compiled call, while the run trains.

Scanning K steps in one call removes per-call dispatch (a win on accelerators for small models),
but costs a second compilation, and on XLA:CPU a scanned conv step can run several times slower.
So K is measured, not assumed — on the run's own training steps, not on throw-away copies:

1. The first steps run at K=1. The first call's time is the compilation's; the next ones give the
   per-step time t1.
2. Where t1 is long enough that per-call dispatch (tens of microseconds) is noise, or where trying
   K could cost more than a few percent of the run's expected time (a second compilation, and
   some steps at a possibly slower K), K stays 1 and nothing else compiles.
3. Otherwise a few calls at K are timed, and the faster K trains the rest of the run.

Every decision is taken on process 0 and broadcast, at the same step on every process. What the
choice cost (the rejected candidate's compile and slower steps, or the steps run at K=1 before a
faster K was found) is reported as `steps_per_call_choice_s`.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

# A step this long leaves per-call dispatch in the noise: scanning cannot pay for its compile.
DISPATCH_NOISE_S = 2e-3
# What trying K may cost at worst, as a fraction of the run's expected wall time.
CHOICE_BUDGET = 0.03
# Worst cases assumed before trying K: its compile against K=1's, its step time against K=1's
# (a scanned conv step ran 2.6x slower than an unscanned one on XLA:CPU).
COMPILE_FACTOR = 2.0
SLOWDOWN_FACTOR = 3.0
MAX_K = 50  # the largest K tried: beyond it dispatch saves nothing more worth a longer compile
BASE_STEPS = 16  # timed K=1 steps (after the compiling call) before the first decision
TRIAL_CALLS = 2  # timed calls at K (after its compiling call)


def _broadcast(value: float) -> float:
    """Process 0's value on every process: timings differ, decisions must not."""
    if jax.process_count() == 1:
        return value
    return float(multihost_utils.broadcast_one_to_all(np.float64(value)))


class CallSizeChooser:
    """Tells the loop how many steps each call runs, and measures while it does.

    `next_k(step)` before a call, `after_call(step, carry)` after it (with the step count after
    the call). `fixed` > 0 skips the choosing (`train.steps_per_call`).
    """

    def __init__(self, candidate: int, start_step: int, total_steps: int, fixed: int = 0):
        self.candidate = candidate
        self.total = total_steps
        self.k = fixed or 1
        self.choice_s = 0.0
        self.tried = False
        self._phase = "done" if fixed or candidate <= 1 else "compile"
        self._start = start_step
        self._mark = (start_step, time.perf_counter())
        self._per_step = {}  # K -> seconds per step, measured
        self._trial_calls = 0

    @classmethod
    def for_config(cls, train, start_step: int, until: int | None = None) -> CallSizeChooser:
        """For `config.train` (a run stopping at `until`, default train.steps): the candidate is
        the largest K <= MAX_K dividing every log, eval and checkpoint interval, so boundaries
        fall on call ends."""
        interval = math.gcd(train.log_every, train.eval_every, train.checkpoint_every)
        candidate = max(k for k in range(1, MAX_K + 1) if interval % k == 0)
        return cls(candidate, start_step, until or train.steps, fixed=train.steps_per_call)

    @property
    def choosing(self) -> bool:
        return self._phase != "done"

    def next_k(self, step: int) -> int:
        """K for the call starting at `step`; 1 where fewer than K steps are left."""
        if self._phase == "trial" and step % self.candidate == 0:
            k = self.candidate
        else:
            k = self.k
        return k if self.total - step >= k else 1

    def after_call(self, step: int, carry) -> None:
        if self._phase == "done":
            return
        if self._phase == "compile":
            self._restart(step, carry, "base")
            self._compile_1 = _broadcast(self._elapsed)
        elif self._phase == "base" and step - self._mark[0] >= BASE_STEPS \
                and step % self.candidate == 0:
            self._restart(step, carry, "trial")
            self._per_step[1] = _broadcast(self._elapsed / self._steps)
            if not self._worth_trying(step):
                self._phase = "done"
        elif self._phase == "trial" and step % self.candidate == 0:
            self._trial_calls += 1
            if self._trial_calls == 1:  # the compiling call
                self.tried = True
                self._restart(step, carry, "trial")
                self._compile_k = self._elapsed
            elif self._trial_calls == TRIAL_CALLS + 1:
                self._restart(step, carry, "done")
                self._per_step[self.candidate] = _broadcast(self._elapsed / self._steps)
                self._decide()

    def _restart(self, step: int, carry, phase: str) -> None:
        jax.block_until_ready(carry)
        now = time.perf_counter()
        self._elapsed, self._steps = now - self._mark[1], step - self._mark[0]
        self._mark, self._phase = (step, now), phase

    def _worth_trying(self, step: int) -> bool:
        t1 = self._per_step[1]
        left = self.total - step
        if t1 >= DISPATCH_NOISE_S or left < (TRIAL_CALLS + 2) * self.candidate:
            return False
        worst = (COMPILE_FACTOR * self._compile_1
                 + (TRIAL_CALLS + 1) * self.candidate * (SLOWDOWN_FACTOR - 1) * t1)
        expected = self._compile_1 + (self.total - self._start) * t1
        return worst <= CHOICE_BUDGET * expected

    def _decide(self) -> None:
        t1, tk = self._per_step[1], self._per_step[self.candidate]
        trial_steps = TRIAL_CALLS * self.candidate
        if tk < t1:
            self.k = self.candidate
            # K=1's compile, and the steps before the trial at K=1's rate where K's would do.
            before = (self._mark[0] - self._start) - (TRIAL_CALLS + 1) * self.candidate
            self.choice_s = max(0.0, self._compile_1 - t1) + before * (t1 - tk)
        else:
            # K's compile (its first call less its steps at K=1's rate) and its slower steps.
            self.choice_s = (max(0.0, self._compile_k - self.candidate * t1)
                             + trial_steps * (tk - t1))

    def summary(self) -> dict:
        """What summary.json says about the choice."""
        out = {"steps_per_call": self.k, "steps_per_call_choice_s": self.choice_s}
        out.update({f"step_s_at_k{k}": s for k, s in sorted(self._per_step.items())})
        return out
