"""`jaxopt-lab launch -n N -- train ...`: N local processes joined into one JAX run on loopback.

Each child learns its rank through the JAXOPT_LAB_* variables read by `initialize_distributed`.
If one child fails, the rest are stopped, and the launcher exits with the first failure's code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from jaxopt_lab.core.distributed import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, count: int) -> str:
    """`xla_flags` with its simulated CPU device count set to `count`, its other flags kept."""
    kept = [f for f in xla_flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={count}"])


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128 + N


def launch(num_processes: int, argv: list[str], devices_per_process: int = 1) -> int:
    """Runs `jaxopt-lab <argv>` in `num_processes` processes; returns the exit code.

    The first child to fail (in time) decides the exit code; the others are stopped, with
    SIGKILL for any that ignore SIGTERM for `grace_s` (a process blocked in a collective can).
    """
    coordinator = f"127.0.0.1:{free_port()}"
    children = []
    for rank in range(num_processes):
        env = dict(os.environ, **{COORDINATOR_ENV: coordinator,
                                  NUM_PROCESSES_ENV: str(num_processes),
                                  PROCESS_ID_ENV: str(rank)})
        env["XLA_FLAGS"] = with_device_count(env.get("XLA_FLAGS", ""), devices_per_process)
        # Each child in its own process group: a Ctrl-C in the terminal reaches the launcher
        # alone, which passes it on once (a child seeing it twice would stop without saving).
        children.append(subprocess.Popen([sys.executable, "-m", "jaxopt_lab.cli", *argv], env=env,
                                         process_group=0))

    def stop_all(signum=signal.SIGTERM, grace_s: float = 10.0):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)
        deadline = time.monotonic() + grace_s
        for child in children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def forward(signum, _frame):  # the children save at their next log boundary and exit
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: stop_all(signum, 60.0))
    previous_int = signal.signal(signal.SIGINT, forward)
    try:
        while True:
            codes = [child.poll() for child in children]
            failed = next((c for c in codes if c not in (None, 0)), None)
            if failed is not None:
                stop_all()
                return _exit_code(failed)
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
