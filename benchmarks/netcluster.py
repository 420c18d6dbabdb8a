"""Worker network namespaces joined over links that `tc` limits: a real slow network on one machine.

Between processes on one machine the network is loopback, tens of Gbit/s, so what compressing the
gradients saves in sending never shows. `throttled_cluster(workers, rate_mbit)` builds (as root)
one network namespace per worker, each joined by a veth pair to a Linux bridge in a hub namespace,
and limits every worker's link both ways with a token bucket; a process started behind
`cluster.exec_prefix(i)` reaches the others at `cluster.addresses` over that link only. Without a
rate the topology is the same and nothing limits it, so runs with and without differ only in the
limit. Standard library only; it runs iproute2's `ip` and `tc`.

    python benchmarks/netcluster.py --check 2 50     # TCP throughput, worker 0 -> 1, at 50 Mbit/s
    python benchmarks/netcluster.py --check 2 none   # the same topology unlimited
    python benchmarks/netcluster.py --cleanup        # what invocations that died left behind

Each worker's host name resolves to its own address inside its namespace (`ip netns exec` mounts
/etc/netns/<namespace>/hosts over /etc/hosts), as on a real cluster: gloo, JAX's CPU collectives,
binds and announces the address the host name resolves to, here 127.0.0.1, which no other worker
could reach.

Nothing is left behind: leaving the context (normally or by an exception) kills what still runs in
its namespaces and deletes them, which removes their links and qdiscs; a watchdog process does the
same when the creator is killed (`kill -9` included), and `cleanup_stale()` removes what a dead
creator's watchdog could not.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

PREFIX = "jxnc"
# Each cluster is its own layer-2 segment reachable only from its namespaces, so concurrent
# clusters share this /24 without meeting each other or the machine's own networks.
SUBNET = "10.231.0"
NAME = re.compile(r"^([a-z][a-z0-9]{0,15})-(\d+)-(\d+)-(hub|w\d+)$")  # prefix-PID-seq-role
SCRIPT = os.path.abspath(__file__)
NETNS_ETC = "/etc/netns"  # `ip netns exec NAME` mounts NETNS_ETC/NAME/* over /etc/*
_SEQ = itertools.count()


class ClusterError(RuntimeError):
    """Why the cluster cannot be built or measured, in one line."""


@dataclass(frozen=True)
class Cluster:
    """A built cluster: worker i lives in namespaces[i] at addresses[i]."""

    hub: str
    namespaces: tuple[str, ...]
    addresses: tuple[str, ...]
    rate_mbit: float | None

    def exec_prefix(self, i: int) -> list[str]:
        """The argv prefix that runs a command inside worker i's namespace."""
        return ["ip", "netns", "exec", self.namespaces[i]]


def tbf(rate_mbit: float) -> list[str]:
    """The `tc qdisc add ... root` arguments of a token bucket at `rate_mbit`.

    burst: at least 64 KiB, veth's largest GSO packet, so the qdisc never splits one; at high
    rates 2 ms of the rate, so a timer that wakes late on a busy CPU does not cost throughput. What
    a transfer gets above the rate is one burst: at 50 Mbit/s 10 ms of it, nothing over megabytes.
    latency 20 ms: the longest a packet waits in the queue, which sets its length (rate x 20 ms +
    burst). Long enough for TCP to keep the link busy (5, 20 and 100 ms carried the same 96 % of
    10 to 3000 Mbit/s here), short enough that a small message queued behind a big one waits like
    at a busy switch port, not a bufferbloated modem: the collectives' small steps are
    latency-bound.
    """
    burst = max(64 * 1024, math.ceil(rate_mbit * 1e6 / 8 * 0.002))
    return ["tbf", "rate", f"{rate_mbit * 1e6:.0f}bit", "burst", str(burst), "latency", "20ms"]


def _run(*argv: str) -> str:
    """Runs `argv`; its stdout, or a ClusterError with the command and its first error line (tc
    follows its reason with a usage text)."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
        raise ClusterError(f"`{' '.join(argv)}` failed: {why}")
    return done.stdout


def _check_host(tools: tuple[str, ...]) -> None:
    if os.geteuid() != 0:
        raise ClusterError("network namespaces need root: run as root")
    for tool in tools:
        if shutil.which(tool) is None:
            raise ClusterError(f"`{tool}` not found: install iproute2")


def namespaces() -> list[str]:
    """The names of the machine's named network namespaces."""
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]


def teardown(names: list[str]) -> None:
    """Kills what still runs in the namespaces `names` and deletes them (their veths, bridge and
    qdiscs go with them) and their /etc files. Names already gone are skipped, so a second call
    does nothing."""
    for name in names:
        shutil.rmtree(os.path.join(NETNS_ETC, name), ignore_errors=True)
    for name in set(names) & set(namespaces()):
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                              check=False)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Deletes the namespaces of `prefix` whose creating process is gone; returns their names.
    (A PID reused since by another process keeps its namespaces until that one ends.)"""
    _check_host(("ip",))
    etc = os.listdir(NETNS_ETC) if os.path.isdir(NETNS_ETC) else []
    stale = sorted({n for n in [*namespaces(), *etc]
                    if (m := NAME.match(n)) and m[1] == prefix and not _alive(int(m[2]))})
    teardown(stale)
    return stale


def _check_args(workers: int, rate_mbit: float | None, prefix: str) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 253:
        raise ValueError(f"workers must be an integer from 1 to 253 (one /24), not {workers!r}")
    if rate_mbit is not None and not (math.isfinite(rate_mbit) and rate_mbit > 0):
        raise ValueError(f"rate_mbit must be a positive number of Mbit/s or None, not {rate_mbit!r}")
    if not NAME.match(f"{prefix}-0-0-hub"):
        raise ValueError(f"prefix must be 1-16 lowercase letters and digits, not {prefix!r}")


@contextlib.contextmanager
def throttled_cluster(workers: int, rate_mbit: float | None, *, prefix: str = PREFIX):
    """Yields a `Cluster` of `workers` namespaces whose links carry `rate_mbit` Mbit/s each way
    (None: unlimited), and removes all of it on the way out, killed or not (module docstring)."""
    _check_args(workers, rate_mbit, prefix)
    _check_host(("ip",) if rate_mbit is None else ("ip", "tc"))
    base = f"{prefix}-{os.getpid()}-{next(_SEQ)}"  # `ip netns add` refuses a name that exists
    cluster = Cluster(f"{base}-hub", tuple(f"{base}-w{i}" for i in range(workers)),
                      tuple(f"{SUBNET}.{i + 1}" for i in range(workers)), rate_mbit)
    names = [cluster.hub, *cluster.namespaces]
    # The watchdog, started before anything exists, reads a pipe whose write end only this process
    # holds (os.pipe is close-on-exec): EOF without "done" means this process died, so it deletes
    # the namespaces. In a session of its own, so the signal that kills our group spares it.
    read, write = os.pipe()
    watchdog = subprocess.Popen([sys.executable, "-I", SCRIPT, "--watchdog", *names], stdin=read,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    os.close(read)
    try:
        _build(cluster)
        yield cluster
    finally:
        try:
            teardown(names)
            os.write(write, b"done")  # left unsaid if teardown failed: the watchdog tries again
        finally:
            os.close(write)
            watchdog.wait()


def _build(cluster: Cluster) -> None:
    hub = cluster.hub
    _run("ip", "netns", "add", hub)
    _run("ip", "-n", hub, "link", "add", "br0", "type", "bridge")  # STP off: forwards at once
    _run("ip", "-n", hub, "link", "set", "br0", "up")
    for i, (ns, address) in enumerate(zip(cluster.namespaces, cluster.addresses)):
        port = f"w{i}"
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
             "netns", ns)
        _run("ip", "-n", hub, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        os.makedirs(os.path.join(NETNS_ETC, ns))
        with open(os.path.join(NETNS_ETC, ns, "hosts"), "w") as f:
            f.write(f"127.0.0.1 localhost\n{address} {socket.gethostname()}\n")
        if cluster.rate_mbit is not None:
            # the worker's end limits what it sends, the hub's end what it receives
            for where, dev in ((ns, "eth0"), (hub, port)):
                _run("tc", "-n", where, "qdisc", "add", "dev", dev, "root", *tbf(cluster.rate_mbit))


def transfers(cluster: Cluster, pairs: list[tuple[int, int]],
              nbytes: int) -> list[tuple[float, float]]:
    """TCP transfers of `nbytes` from worker src to worker dst, one per (src, dst) of `pairs`, all
    at once (every receiver listens before any sender starts). Each is timed by its receiver, from
    accepting the connection to the last byte (the sender's clock would stop when the bytes are
    queued, not delivered), on the monotonic clock all namespaces share, so they compare."""
    me = [sys.executable, "-I", SCRIPT]
    servers, senders = [], []
    try:
        for _, dst in pairs:
            servers.append(subprocess.Popen([*cluster.exec_prefix(dst), *me, "--serve"],
                                            stdout=subprocess.PIPE, text=True))
        ports = [server.stdout.readline().strip() for server in servers]
        if not all(ports):
            raise ClusterError("a receiver did not start")
        for (src, dst), port in zip(pairs, ports):
            senders.append(subprocess.Popen(
                [*cluster.exec_prefix(src), *me, "--send", cluster.addresses[dst], port,
                 str(nbytes)], stderr=subprocess.PIPE, text=True))
        for sender in senders:
            if err := sender.communicate()[1].strip():
                raise ClusterError(f"a sender failed: {err.splitlines()[-1]}")
        # the senders are done: what they queued arrives, or the connection fails
        results = [server.communicate()[0].split() for server in servers]
    finally:
        for process in servers + senders:
            process.kill()
            process.wait()
    if any(r[:1] != [str(nbytes)] for r in results):
        raise ClusterError(f"sent {nbytes} bytes to each receiver, they reported {results}")
    return [(float(r[1]), float(r[2])) for r in results]


def measure_mbit(cluster: Cluster, src: int, dst: int, nbytes: int) -> float:
    """Mbit/s of one transfer (TCP payload: about 4 % under the link's rate, which counts the
    Ethernet, IP and TCP headers)."""
    [(start, end)] = transfers(cluster, [(src, dst)], nbytes)
    return nbytes * 8 / (end - start) / 1e6


def _serve() -> None:
    with socket.create_server(("0.0.0.0", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        conn, _ = listener.accept()
        with conn:
            start, received, buffer = time.monotonic(), 0, bytearray(1 << 20)
            while n := conn.recv_into(buffer):
                received += n
            print(received, start, time.monotonic(), flush=True)


def _send(host: str, port: str, nbytes: str) -> None:
    block, left = memoryview(bytes(1 << 20)), int(nbytes)
    with socket.create_connection((host, int(port))) as conn:
        while left:
            conn.sendall(block[:min(left, len(block))])
            left -= min(left, len(block))


def _check(workers: str, rate: str, megabytes: float, prefix: str) -> None:
    """--check: one transfer from worker 0 to worker 1 of a fresh cluster, printed."""
    try:
        n = int(workers)
        rate_mbit = None if rate.lower() == "none" else float(rate)
    except ValueError:
        raise ValueError(f"--check takes WORKERS RATE_MBIT (an integer, a number or 'none'), "
                         f"not {workers!r} {rate!r}") from None
    if n < 2:
        raise ValueError(f"--check measures worker 0 -> worker 1, so it needs 2 workers, not {n}")
    nbytes = int(megabytes * 1e6)
    with throttled_cluster(n, rate_mbit, prefix=prefix) as cluster:
        start = time.perf_counter()
        mbit = measure_mbit(cluster, 0, 1, nbytes)
        limit = "unlimited" if rate_mbit is None else f"limited to {rate_mbit:g} Mbit/s"
        print(f"{n} workers, links {limit}: worker 0 -> 1 carried {mbit:.1f} Mbit/s "
              f"({nbytes / 1e6:g} MB in {time.perf_counter() - start:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", nargs=2, metavar=("WORKERS", "RATE_MBIT"),
                      help="build a cluster, measure TCP from worker 0 to 1, tear it down "
                           "(RATE_MBIT 'none': unlimited)")
    mode.add_argument("--cleanup", action="store_true",
                      help="delete the namespaces of invocations whose process is gone")
    mode.add_argument("--watchdog", nargs="+", help=argparse.SUPPRESS)
    mode.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    mode.add_argument("--send", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--mb", type=float, default=32, help="megabytes --check sends (32)")
    parser.add_argument("--prefix", default=PREFIX, help=f"namespace name prefix ({PREFIX})")
    args = parser.parse_args(argv)
    try:
        if args.watchdog:
            if not sys.stdin.buffer.read():  # EOF before "done": the creator died
                teardown(args.watchdog)
        elif args.serve:
            _serve()
        elif args.send:
            _send(*args.send)
        elif args.cleanup:
            removed = cleanup_stale(args.prefix)
            print(f"removed {len(removed)} stale namespaces" + "".join(f"\n  {n}" for n in removed))
        else:
            _check(*args.check, args.mb, args.prefix)
    except (ClusterError, ValueError, OSError) as e:
        print(f"netcluster: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
