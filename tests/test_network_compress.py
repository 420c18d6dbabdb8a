"""benchmarks/network_compress.py trains over a throttled cluster: the throttle changes the time,
never the numbers; the report's tables come out of what ran; and nothing of the cluster outlives
the benchmark, whether it ends or is killed with SIGKILL. Root and network namespaces only (the
tests skip elsewhere, as test_netcluster's do)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT
from test_netcluster import BENCH, netns

sys.path.insert(0, str(BENCH))
import netcluster
import network_compress
import network_report

PREFIX = "jxncbench"  # these tests' own, apart from test_netcluster's and from real runs
TINY = ["--workers", "2", "--seeds", "0", "--hidden", "32", "--prefix", PREFIX]


def _left(prefix: str) -> list[str]:
    etc = os.listdir(netcluster.NETNS_ETC) if os.path.isdir(netcluster.NETNS_ETC) else []
    return [n for n in [*netcluster.namespaces(), *etc] if n.startswith(prefix)]


@pytest.mark.slow  # multi-process training runs
@netns
def test_a_throttle_changes_time_not_numbers_and_the_report_reads_the_runs(tmp_path):
    """30 steps of each method on unlimited links and on 20 Mbit/s ones: the same parameters
    and validation curve, slower steps. Target 100 %: nothing stops early."""
    params = tmp_path / "params"
    params.mkdir()
    out, results = tmp_path / "net.json", tmp_path / "RESULTS.md"
    methods = ["allreduce", "powersgd_r2", "topk_1pct_ef"]
    code = network_compress.main([*TINY, "--rates", "none", "20", "--methods", *methods,
                                  "--max-steps", "30", "--target", "1.0", "--json", str(out),
                                  "--results", str(results), "--docs", str(tmp_path / "page.md"),
                                  "--params-out", str(params)])
    assert code == 0
    assert _left(PREFIX) == []
    records = {(r["method"], r["rate_mbit"]): r for r in json.loads(out.read_text())["records"]}
    assert set(records) == {(m, rate) for m in methods for rate in (None, 20.0)}
    for method in methods:
        free, slow = records[(method, None)], records[(method, 20.0)]
        assert len(free["step_s"]) == len(slow["step_s"]) == 30
        assert free["validation_curve"] == slow["validation_curve"]
        with np.load(params / f"{method}_s0_None.npz") as a, \
                np.load(params / f"{method}_s0_20.0.npz") as b:
            for name in a.files:
                np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=0)
        assert slow["link_mbit_measured"] < 25 < free["link_mbit_measured"]
    compressed = records[("powersgd_r2", 20.0)]["comm_bytes"]
    assert compressed[-1] < compressed[0]  # plain all-reduces before start_step, factors after
    section = results.read_text()
    assert "Time to 100% validation accuracy" in section and "none reached it" in section
    assert section.count("| 2 | 20 Mbit/s") == 2 * len(methods)  # both tables, every method
    assert (tmp_path / "net.png").stat().st_size > 0
    page = (tmp_path / "page.md").read_text()
    assert page.count("| 2 | 20 Mbit/s") == len(methods) and "none reached it" in page


@pytest.mark.slow
@netns
def test_nothing_is_left_after_a_kill_9_of_the_benchmark(tmp_path):
    bench = subprocess.Popen(
        [sys.executable, str(BENCH / "network_compress.py"), *TINY, "--rates", "20",
         "--methods", "allreduce", "--max-steps", "100000", "--target", "1.0",
         "--json", str(tmp_path / "net.json"), "--results", str(tmp_path / "R.md"),
         "--docs", str(tmp_path / "page.md")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        mine = f"{PREFIX}-{bench.pid}-"
        deadline, workers = time.monotonic() + 120, []
        while time.monotonic() < deadline and len(workers) < 2:  # both workers are training
            workers = [pid for ns in _left(mine) if ns.endswith(("w0", "w1"))
                       for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, check=False,
                                                 text=True).stdout.split()]
            time.sleep(0.5)
        assert len(workers) >= 2, "the workers never started"
        time.sleep(3)  # into training
    finally:
        bench.send_signal(signal.SIGKILL)
    assert bench.wait() == -signal.SIGKILL
    killed = time.monotonic()
    while (_left(mine) or any(netcluster._alive(int(p)) for p in workers)) \
            and time.monotonic() < killed + 10:
        time.sleep(0.1)
    assert _left(mine) == []  # namespaces (with their veths and qdiscs) and /etc/netns files
    assert not any(netcluster._alive(int(p)) for p in workers)


@pytest.mark.parametrize(("argv", "message"), [
    (["--workers", "1"], "--workers [1]: a network needs 2 or more"),
    (["--target", "95"], "--target 95.0: a validation accuracy in (0, 1]"),
    (["--max-steps", "0"], "--max-steps and --hidden widths must be positive"),
])
def test_bad_arguments_get_one_line_before_anything_is_built(argv, message, tmp_path, capsys):
    assert network_compress.main([*argv, "--json", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err
    assert err == f"network_compress: {message}\n"


COMMITTED = BENCH / "network_compress.json"


@pytest.mark.skipif(not COMMITTED.exists(), reason="the benchmark has not been run here")
def test_the_committed_tables_are_what_the_report_makes_of_the_committed_runs(tmp_path):
    """benchmarks/RESULTS.md's section and docs/compress.md's table, rewritten from the JSON
    (in a copy: the repository's files stay as they are), come out the same."""
    (tmp_path / COMMITTED.name).write_text(COMMITTED.read_text())
    for name, committed in (("RESULTS.md", BENCH / "RESULTS.md"),
                            ("compress.md", ROOT / "docs" / "compress.md")):
        (tmp_path / name).write_text(committed.read_text())
    network_report.write(tmp_path / COMMITTED.name, tmp_path / "RESULTS.md",
                         tmp_path / "compress.md")
    for name, committed in (("RESULTS.md", BENCH / "RESULTS.md"),
                            ("compress.md", ROOT / "docs" / "compress.md")):
        assert (tmp_path / name).read_text() == committed.read_text(), name
