"""`jaxopt-lab profile`: per-layer counts that add up to the model's, both feeds timed, MFU against
a cached matmul probe, a trace TensorBoard reads; bad input one line."""

from __future__ import annotations

import glob
import json
import time

import pytest
from helpers import run_cli

from jaxopt_lab import load_config
from jaxopt_lab.errors import UserError
from jaxopt_lab.profile.latency import time_interleaved
from jaxopt_lab.profile.peak import matmul_peak
from jaxopt_lab.profile.profile_run import profile_config


def test_profile_of_the_digits_cnn(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXOPT_LAB_CACHE", str(tmp_path / "cache"))
    config = load_config("configs/digits_cnn.py", ["--config.train.progress=False"])
    result = profile_config(config, str(tmp_path), steps=4, progress=False)

    assert json.loads((tmp_path / "profile" / "profile.json").read_text()) == result
    assert "| Conv_1 |" in (tmp_path / "profile" / "profile.md").read_text()
    layers = {layer["layer"]: layer for layer in result["layers"]}
    assert set(layers) == {"Conv_0", "Conv_1", "Dense_0"}
    # 3x3 convs of 1 -> 32 and 32 -> 64 channels, then 2*2*64 features -> 10 classes.
    assert [layers[n]["params"] for n in ("Conv_0", "Conv_1", "Dense_0")] == [
        9 * 32 + 32, 9 * 32 * 64 + 64, 256 * 10 + 10]
    assert layers["Conv_1"]["flops_per_example"] == 2 * 4 * 4 * 9 * 32 * 64  # on 4x4 maps
    assert result["num_params"] == 21386
    assert sum(layer["flops_per_example"] for layer in result["layers"]) == \
        result["flops_per_example"]
    # Forward and backward of a batch of 64: about three forward passes' worth of FLOPs.
    assert 2.5 < result["flops_per_step"] / (64 * result["flops_per_example"]) < 3.5
    for feed in ("on_device", "streamed"):
        timing = result["feeds"][feed]
        assert timing["compute_s"] > 0 and timing["data_wait_s"] >= 0, feed
    assert 0 < result["mfu"] < 1
    assert result["step_memory"]["peak_bytes"] > result["model_bytes"]
    assert result["latency_ms_batch256"] > 0
    assert glob.glob(str(tmp_path / "profile" / "trace" / "**" / "*.xplane.pb"), recursive=True)
    assert result["peak_probe"]["cached"] is False
    assert matmul_peak("float32")["cached"] is True  # measured once per device


def test_profile_refuses_what_it_cannot_time(tmp_path):
    config = load_config("configs/digits_cnn.py",
                         ["--config.population=(('seed', (0, 1)),)"])
    with pytest.raises(UserError, match="population"):
        profile_config(config, str(tmp_path), progress=False)
    result = run_cli("profile", "--config", "configs/digits_cnn.py", "--workdir",
                     str(tmp_path), "--steps", "1")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--steps 1" in result.stderr


def test_interleaved_timing_warms_each_callable_for_warm_s_then_times_calls():
    """Each turn: a pause, untimed calls for at least `warm_s` (at least one), then `calls`
    timed ones; a runtime whose threads slept in the pause is timed warm."""
    log = []

    def call(key):
        log.append((key, time.perf_counter()))
        time.sleep(0.001)

    per_round = time_interleaved({k: (lambda k=k: call(k)) for k in "ab"}, rounds=2, calls=5,
                                 progress=False, settle_s=0.01, warm_s=0.03)
    assert {k: len(v) for k, v in per_round.items()} == {"a": 2, "b": 2}
    assert all(1.0 <= ms < 50 for v in per_round.values() for ms in v)
    turns = _turns(log)
    assert [group[0][0] for group in turns] == ["a", "b", "a", "b"]
    for times in ([t for _, t in group] for group in turns):
        # the 5 timed calls start once warm_s has passed since the first warm one
        assert len(times) > 5 + 1 and times[-5] - times[0] >= 0.03
    one = time_interleaved({"a": lambda: call("c")}, rounds=1, calls=3, progress=False)
    assert len(one["a"]) == 1 and [k for k, _ in log].count("c") == 4  # one warm call


def _turns(log):
    """The log split into runs of one key."""
    groups, key = [], None
    for k, t in log:
        if k != key:
            groups.append([])
            key = k
        groups[-1].append((k, t))
    return groups
