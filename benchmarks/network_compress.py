"""Compressed gradients on a real slow network: wall-clock time to a validation accuracy.

For each worker count and link rate, `netcluster.throttled_cluster` builds worker namespaces whose
links `tc` limits, and `network_worker.py` runs in each: W processes joined by `jax.distributed`
(gloo over those links), training one config with the all-reduce and with each compressor, every
seed in turn, until the validation accuracy reaches the target. Each record keeps every step's
wall time, the compute-only step time (the worker's docstring), the bytes sent and the validation
curve. `network_report.py` turns them into the table in benchmarks/RESULTS.md and checks the cost
model (`techniques/compress/cost.py`) against the measured step times.

    python benchmarks/network_compress.py                 # 2 and 4 workers at 100, 1000, 10000 Mbit/s
    python benchmarks/network_compress.py --report-only   # the table again from the JSON

Needs root (network namespaces); everything it builds is gone after it ends, an exception or a
`kill -9` (netcluster's watchdog). Runs are measured one cluster at a time: nothing else should
run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import netcluster
import network_report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "network_worker.py"
COORDINATOR_PORT = 6200  # inside a fresh namespace every port is free
# One device and one compute thread a worker, as a worker with cores of its own would have: the
# machine's cores are shared between the workers instead of oversubscribed by each.
WORKER_XLA_FLAGS = ("--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false "
                    "intra_op_parallelism_threads=1")

# The methods of results/compress_accuracy.md's headline, at the settings it measured.
METHODS = (
    {"label": "allreduce", "compress": {}},
    {"label": "powersgd_r2", "compress": {"method": "powersgd", "rank": 2}},
    {"label": "powersgd_r4", "compress": {"method": "powersgd", "rank": 4}},
    {"label": "topk_1pct_ef", "compress": {"method": "topk", "ratio": 0.01}},
    {"label": "qsgd_6bit", "compress": {"method": "qsgd", "levels": 16}},
)
POWERSGD_START_STEP = 10  # CompressOptions' default: plain all-reduces before it

# A 2.2 M-parameter MLP on digits (64 inputs): 8.7 MB of float32 gradients a step, against a few
# ms of compute on a CPU core, so the network decides the step time at every rate measured.
SPEC = {"data": "digits", "hidden": [1024, 1024, 1024], "batch_size": 128, "lr": 1e-3,
        "validation_fraction": 0.2, "target": 0.95, "max_steps": 250, "eval_every": 5,
        "powersgd_start_step": POWERSGD_START_STEP}


class WorkerFailed(RuntimeError):
    """A training process exited with an error; its last line says why."""


def run_cluster(workers: int, rate_mbit: float | None, spec: dict, out: Path, *,
                prefix: str = netcluster.PREFIX, timeout_s: float = 3600) -> list[dict]:
    """Runs `spec` (network_worker's) on `workers` processes over links of `rate_mbit` (None:
    unlimited); returns the records process 0 wrote, which are also appended to `out`."""
    with netcluster.throttled_cluster(workers, rate_mbit, prefix=prefix) as cluster, \
            tempfile.TemporaryDirectory() as tmp:
        link = netcluster.measure_mbit(cluster, 0, 1, spec.get("link_probe_bytes", 4_000_000))
        spec = {**spec, "rate_mbit": rate_mbit, "workdir": os.path.join(tmp, "run")}
        spec_path, records_path = Path(tmp, "spec.json"), Path(tmp, "records.jsonl")
        spec_path.write_text(json.dumps(spec))
        coordinator = f"{cluster.addresses[0]}:{COORDINATOR_PORT}"
        processes, logs = [], []
        for rank in range(workers):
            env = {**os.environ, "JAXOPT_LAB_COORDINATOR": coordinator,
                   "JAXOPT_LAB_NUM_PROCESSES": str(workers), "JAXOPT_LAB_PROCESS_ID": str(rank),
                   "XLA_FLAGS": WORKER_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
            logs.append(Path(tmp, f"worker{rank}.log"))
            with open(logs[-1], "w") as log:  # a file, not a pipe: nothing blocks on a full one
                processes.append(subprocess.Popen(
                    [*cluster.exec_prefix(rank), sys.executable, str(WORKER), str(spec_path),
                     str(records_path)], env=env, cwd=ROOT,
                    stdout=None if rank == 0 else subprocess.DEVNULL, stderr=log))
        _wait_all(processes, logs, timeout_s)
        records = [json.loads(line) for line in records_path.read_text().splitlines()]
    for record in records:
        record["link_mbit_measured"] = link
    with open(out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def _wait_all(processes: list[subprocess.Popen], logs: list[Path], timeout_s: float) -> None:
    """Waits for every process; the first failure (or the timeout) stops the rest and raises."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in processes]
        failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is None and all(code == 0 for code in codes):
            return
        if failed is not None or time.monotonic() > deadline:
            for p in processes:
                p.kill()
            if failed is None:
                raise WorkerFailed(f"the workers ran past {timeout_s:.0f} s")
            raise WorkerFailed(f"worker {failed} exited with {codes[failed]}: "
                               f"{_reason(logs[failed].read_text())} (its log: rerun with "
                               "the same arguments and read stderr)")
        time.sleep(0.2)


def _reason(log: str) -> str:
    """The error line of a worker's log: the last that names an exception, else the last."""
    lines = [line.strip() for line in log.splitlines() if line.strip()] or ["no error output"]
    return next((line for line in reversed(lines) if "Error" in line.split(":")[0]), lines[-1])


def parse_rate(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"rate {text!r}: a positive number of Mbit/s or 'none'")
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rates", type=parse_rate, nargs="+", default=[100.0, 1000.0, 10000.0],
                        help="link rates in Mbit/s ('none': unlimited)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=[m["label"] for m in METHODS],
                        choices=[m["label"] for m in METHODS])
    parser.add_argument("--target", type=float, default=SPEC["target"],
                        help="validation accuracy to reach")
    parser.add_argument("--max-steps", type=int, default=SPEC["max_steps"])
    parser.add_argument("--hidden", type=int, nargs="+", default=SPEC["hidden"])
    parser.add_argument("--json", type=Path, default=HERE / "network_compress.json")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "compress.md",
                        help="the page whose table is rewritten")
    parser.add_argument("--prefix", default=netcluster.PREFIX, help=argparse.SUPPRESS)
    parser.add_argument("--params-out", type=Path, help=argparse.SUPPRESS)  # final params (tests)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the table from --json without measuring")
    args = parser.parse_args(argv)
    try:
        if not args.report_only:
            measure(args)
        print(network_report.write(args.json, args.results, args.docs))
    except (netcluster.ClusterError, WorkerFailed, ValueError, OSError) as e:
        print(f"network_compress: {e}", file=sys.stderr)
        return 1
    return 0


def measure(args) -> None:
    if min(args.workers) < 2:
        raise ValueError(f"--workers {args.workers}: a network needs 2 or more")
    if not 0 < args.target <= 1:
        raise ValueError(f"--target {args.target}: a validation accuracy in (0, 1]")
    if args.max_steps < 1 or min(args.hidden) < 1:
        raise ValueError("--max-steps and --hidden widths must be positive")
    spec = {**SPEC, "hidden": args.hidden, "target": args.target, "max_steps": args.max_steps,
            "seeds": args.seeds,  # the all-reduce always: every ratio is to it
            "methods": [m for m in METHODS if m["label"] in {"allreduce", *args.methods}],
            "params_out": str(args.params_out) if args.params_out else None}
    partial = args.json.with_suffix(".jsonl")
    partial.unlink(missing_ok=True)
    for workers in args.workers:
        for rate in args.rates:
            print(f"{workers} workers, links at {rate or 'unlimited'} Mbit/s:", flush=True)
            run_cluster(workers, rate, spec, partial, prefix=args.prefix)
    records = [json.loads(line) for line in partial.read_text().splitlines()]
    args.json.write_text(json.dumps({"machine": network_report.machine(), "spec": spec,
                                     "records": records}, indent=1) + "\n")
    partial.unlink()


if __name__ == "__main__":
    sys.exit(main())
