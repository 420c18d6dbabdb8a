"""Compressed gradients through whole runs: compressors on 4 simulated devices equal them on
2 processes x 2 devices, resumes exactly after kill -9 (residuals, PowerSGD's Q and step count
are in comm_state), counts its bytes into summary.json, and a user's own Reducer plugs in from
Python."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import QUIET, ROOT, SHORT, SMALL_CNN, run_cli, summary_of, tiny_config, xla_flags
from test_reliability import LONG, _assert_same_run, _killed_after_a_checkpoint, _Run, _train

from jaxopt_lab import load_run, train_and_evaluate
from jaxopt_lab.core.step import Reducer, data_mean

pytestmark = pytest.mark.slow  # whole runs and subprocesses

C = "--config.techniques.compress"
# Small thresholds so the 8-channel CNN's kernels are compressed; PowerSGD compresses from step 5.
METHODS = {
    "topk": [f"{C}.ratio=0.1"],
    "randomk": [f"{C}.ratio=0.1"],
    "powersgd": [f"{C}.rank=2", f"{C}.start_step=5"],
    "signsgd": [],
    "qsgd": [f"{C}.levels=16"],
    "int8": [],
}


def _args(method: str) -> list[str]:
    # Momentum SGD, not Adam: Adam divides a near-zero gradient by its own scale, so the
    # all-reduce's summation order (gloo's vs in-process) would become a whole step of a weight.
    return ["train", *SMALL_CNN, *SHORT, "--config.optim.name=momentum", "--config.optim.lr=0.05",
            f"{C}.method={method}", f"{C}.min_size=64", *METHODS[method]]


# Across processes: the stateful one (PowerSGD's Q), and one that draws random numbers per
# device (qsgd's rounding), which must agree however devices are split. The others go through
# the same exchange (every method resumes below); the whole suite's time on two cores is what
# keeps this to two.
ACROSS_PROCESSES = ("powersgd", "qsgd")


def test_compressors_on_four_devices_equal_two_processes_of_two(tmp_path, env):
    for method in ACROSS_PROCESSES:
        four = run_cli(*_args(method), "--workdir", str(tmp_path / method / "four"), devices=4,
                       env=env)
        assert four.returncode == 0, four.stderr[-3000:]
        two = run_cli("launch", "-n", "2", "--devices-per-process", "2", "--", *_args(method),
                      "--workdir", str(tmp_path / method / "two"), env=env)
        assert two.returncode == 0, two.stderr[-3000:]
        a, b = (summary_of(tmp_path / method / n) for n in ("four", "two"))
        assert a["devices"] == b["devices"] == 4 and b["processes"] == 2
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4), method
        assert b["comm_bytes_per_step"] == a["comm_bytes_per_step"], method
        assert a["comm_ratio"] > 1.5, method  # the kernels went compressed
    # comm_state has one entry per device: the checkpoints load where there are 4 devices.
    compare = subprocess.run([sys.executable, "-c", COMPARE, str(tmp_path), *ACROSS_PROCESSES],
                             cwd=ROOT,
                             env={**os.environ, **env, "XLA_FLAGS": FOUR}, capture_output=True,
                             text=True, timeout=300, check=False)
    assert compare.returncode == 0, compare.stderr[-3000:]


FOUR = xla_flags(4)
COMPARE = """
import sys, jax, numpy as np
from jaxopt_lab import load_run
root, methods = sys.argv[1], sys.argv[2:]
for method in methods:
    want, got = (load_run(f"{root}/{method}/{n}").state for n in ("four", "two"))
    # PowerSGD's per-device residuals follow its basis, which the summation order can turn
    # within its span (their mean, hence the parameters, does not move): compare parameters.
    parts = (lambda s: s.params) if method == "powersgd" else (lambda s: (s.params, s.comm_state))
    for x, y in zip(jax.tree.leaves(parts(got)), jax.tree.leaves(parts(want)), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6, err_msg=method)
"""


def _resumable(method: str) -> list[str]:
    """LONG (600 steps, checkpoints every 150) with error feedback on, so every method has
    residuals to restore; PowerSGD's Q and step count come with it."""
    return [*LONG, f"{C}.method={method}", f"{C}.min_size=64", f"{C}.error_feedback=True",
            f"{C}.start_step=50", *METHODS[method]]


@pytest.mark.parametrize("method", list(METHODS))
def test_a_compressed_run_killed_and_rerun_resumes_exactly(tmp_path, env, method):
    reference = _Run(env, tmp_path / "reference", *_resumable(method))
    workdir = _killed_after_a_checkpoint(env, tmp_path / "run", *_resumable(method))
    result = _train(env, workdir, *_resumable(method))
    assert result.returncode == 0, result.stderr
    summary = summary_of(workdir)
    assert summary["resumed_from"] is not None
    assert summary["techniques"]["compress"]["method"] == method
    assert summary["comm_ratio"] > 1.5  # the kernels went compressed
    _assert_same_run(workdir, reference.finish())
    state = load_run(str(workdir)).state
    assert jax.tree.leaves(state.comm_state), "no residuals were restored"


def test_a_users_own_reducer_plugs_in_from_python(tmp_path):
    """A mean that also counts its calls in comm_state and reports half the bytes."""

    def init(params):
        del params
        return {"calls": jnp.zeros((), jnp.int32)}

    def reduce(grads, comm_state, rng, hparams):
        del rng, hparams
        size = sum(g.size * 4 for g in jax.tree.leaves(grads))
        stats = {"comm_bytes": jnp.float32(size / 2), "comm_bytes_uncompressed": jnp.float32(size)}
        return data_mean(grads), {"calls": comm_state["calls"] + 1}, stats

    summary = train_and_evaluate(tiny_config("mlp", steps=12, measure=False),
                                 str(tmp_path / "own"), reducer=Reducer(init, reduce))
    state = load_run(str(tmp_path / "own"), reducer=Reducer(init, reduce)).state
    assert int(state.comm_state["calls"][0]) == 12
    assert summary["comm_ratio"] == pytest.approx(2.0)
    assert summary["test_loss"] < 2.3  # it trained (chance is ln 10 = 2.30)


def test_the_exact_all_reduce_reports_a_ratio_of_one_and_bad_options_are_one_line(tmp_path):
    summary = train_and_evaluate(tiny_config("mlp", steps=10, measure=False), str(tmp_path / "a"))
    assert summary["comm_ratio"] == 1.0 and summary["comm_bytes_per_step"] > 0
    result = run_cli("train", *SMALL_CNN, *QUIET, "--workdir", str(tmp_path / "b"),
                     f"{C}.method=topk", f"{C}.ratio=1.5")
    assert result.returncode != 0
    assert "techniques.compress.ratio=1.5 must be a number in (0, 1]" in result.stderr
    assert "Traceback" not in result.stderr
