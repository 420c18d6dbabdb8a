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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes: int, argv: list[str], devices_per_process: int = 1) -> int:
    """Runs `jaxopt-lab <argv>` in `num_processes` processes; returns the exit code."""
    coordinator = f"127.0.0.1:{free_port()}"
    children = []
    for rank in range(num_processes):
        env = dict(os.environ, **{COORDINATOR_ENV: coordinator,
                                  NUM_PROCESSES_ENV: str(num_processes),
                                  PROCESS_ID_ENV: str(rank)})
        if devices_per_process > 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                f" --xla_force_host_platform_device_count={devices_per_process}")
        children.append(subprocess.Popen([sys.executable, "-m", "jaxopt_lab.cli", *argv], env=env))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            codes = [child.poll() for child in children]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                forward(signal.SIGTERM, None)
                for child in children:
                    child.wait()
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, previous)
