"""Block-interleaved timing: variants running at once in separate processes take turns, a block of steps each.

Whole runs one after another cannot resolve a few percent on a shared VM: its speed drifts by 10-30%
over seconds to minutes, so two identical runs a minute apart differ by that much. Here every variant
is started at once; when a variant's model reaches its timed part it connects to the parent's `Ring`
(a Unix socket) and waits. The parent then hands a baton round: variant after variant runs exactly
`block_steps` whole optimizer steps while the others wait (blocked in a socket read, using no CPU), so
a slow spell of the machine falls on every variant alike, and two identical variants land within a
few percent (the A/A check of `trainer_overhead.py`). The training thread of every variant is pinned
to the same CPU (the cores of a VM differ in speed and in their neighbours' load), and their helper
threads and processes (the log tee, tracker threads, WandB's service) to the other cores, as helpers
run on a GPU node's spare cores.

The child side (`BatonClient`) is driven from the timed model's forward (`bench_plugins`); the
protocol is one line per message: the child sends `ready NAME TORCH_THREADS`, then `done WALL_S CPU_S` after each
block; the parent answers `go` (run a block) or `stop` (untimed from here on).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ADDRESS_VAR, NAME_VAR, BLOCK_VAR, CPU_VAR = (
    "BENCH_BATON",
    "BENCH_BATON_NAME",
    "BENCH_BLOCK_STEPS",
    "BENCH_CPU",
)


class BatonClient:
    """The child's side: call `tick(ready, sync)` at the start of every training forward call."""

    def __init__(self, address: str, name: str, block_steps: int, cpu: int | None, threads: int) -> None:
        self.address, self.name, self.block_steps, self.cpu = address, name, block_steps, cpu
        self.threads = threads  # torch's compute threads in this variant: the parent checks they agree
        self.sock: socket.socket | None = None
        self.lines: Callable[[], str] | None = None
        self.stopped = False
        self.calls = 0
        self.started = self.cpu_started = 0.0

    @classmethod
    def from_env(cls, threads: int) -> BatonClient | None:
        """The client `$BENCH_BATON` asks for, or None (the model then times one window instead)."""
        address = os.environ.get(ADDRESS_VAR)
        if not address:
            return None
        cpu = os.environ.get(CPU_VAR)
        block_steps = int(os.environ[BLOCK_VAR])
        return cls(address, os.environ[NAME_VAR], block_steps, int(cpu) if cpu else None, threads)

    def tick(self, ready: Callable[[], bool], sync: Callable[[], None]) -> None:
        """One training forward call starts; `ready()`: warm-up is over; `sync()` waits for the device.

        Inside a block this costs a counter increment (`ready` is asked only before the first block).
        """
        if self.stopped:
            return
        if self.sock is None:
            if ready():
                self._connect()
                self._wait_for_turn()
            return
        self.calls += 1
        if self.calls == self.block_steps:
            sync()
            wall, cpu = time.perf_counter() - self.started, time.thread_time() - self.cpu_started
            self._send(f"done {wall!r} {cpu!r}")
            self._wait_for_turn()

    def _connect(self) -> None:
        if self.cpu is not None:
            pin_training_thread(self.cpu)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.address)
        self.lines = self.sock.makefile("r").readline
        self._send(f"ready {self.name} {self.threads}")

    def _send(self, line: str) -> None:
        assert self.sock is not None
        self.sock.sendall(f"{line}\n".encode())

    def _wait_for_turn(self) -> None:
        assert self.lines is not None and self.sock is not None
        message = self.lines().strip()
        if message != "go":  # "stop", or the parent is gone: finish the run untimed
            self.stopped = True
            self.sock.close()
            return
        self.calls = 0
        self.cpu_started = time.thread_time()
        self.started = time.perf_counter()


class Ring:
    """The parent's side: start the variants, wait until all are ready, then hand out turns."""

    def __init__(self, directory: Path) -> None:
        self.address = str(directory / "baton.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.address)
        self.server.listen()
        self.server.settimeout(1.0)
        self.peers: dict[str, tuple[socket.socket, Callable[[], str]]] = {}
        self.threads: dict[str, int] = {}  # torch's compute threads, per variant

    def env(self, name: str, block_steps: int, cpu: int | None) -> dict[str, str]:
        """What a variant's process needs in its environment to join."""
        env = {ADDRESS_VAR: self.address, NAME_VAR: name, BLOCK_VAR: str(block_steps)}
        if cpu is not None:
            env[CPU_VAR] = str(cpu)
        return env

    def gather(self, processes: Mapping[str, subprocess.Popen[bytes]], logs: Mapping[str, Path]) -> None:
        """Wait until every variant has connected; one that exits first is an error (its log's tail shown),
        and so are variants computing on different numbers of torch threads."""
        while len(self.peers) < len(processes):
            for name, process in processes.items():
                if name not in self.peers and process.poll() is not None:
                    tail = logs[name].read_text(errors="replace")[-4000:]
                    raise SystemExit(f"{name} exited ({process.returncode}) before its timed steps:\n{tail}")
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            lines = conn.makefile("r").readline
            greeting = lines().split()
            if len(greeting) != 3 or greeting[0] != "ready" or greeting[1] not in processes:
                raise SystemExit(f"unexpected greeting {greeting} on {self.address}")
            _, name, threads = greeting
            self.peers[name], self.threads[name] = (conn, lines), int(threads)
        if len(set(self.threads.values())) != 1:
            raise SystemExit(f"variants run with different torch thread counts: {self.threads}")

    def turn(self, name: str) -> tuple[float, float]:
        """Let `name` run one block; its (wall seconds, training-thread CPU seconds)."""
        conn, lines = self.peers[name]
        conn.sendall(b"go\n")
        reply = lines().split()
        if not reply or reply[0] != "done":
            raise SystemExit(f"{name} stopped answering mid-block (see its log)")
        return float(reply[1]), float(reply[2])

    def stop(self, names: Sequence[str]) -> None:
        """Release every variant: they finish their remaining steps untimed."""
        for name in names:
            conn, _ = self.peers.pop(name)
            conn.sendall(b"stop\n")
            conn.close()
        self.server.close()


def pin_training_thread(cpu: int) -> None:
    """This thread alone on `cpu`; every other thread of this process and of its descendants (the tee,
    tracker threads, WandB's service) off it, as helpers on a GPU node's spare cores never preempt the
    training thread. Threads started later inherit their creator's CPUs (helpers' from the helpers)."""
    others = set(os.sched_getaffinity(0)) - {cpu}
    me = threading.get_native_id()
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            tid = int(task.name)
            with contextlib.suppress(OSError):  # a thread that has just ended
                os.sched_setaffinity(tid, {cpu} if tid == me else others)


def _descendants(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(child) for child in (task / "children").read_text().split()]
    return [grandchild for child in children for grandchild in (child, *_descendants(child))]


def pinned_cpu(requested: int | None) -> int | None:
    """The CPU every variant's training thread runs on: `requested`, none (-1), or by default the last one."""
    allowed = sorted(os.sched_getaffinity(0))
    if requested == -1 or len(allowed) < 2:
        return None
    if requested is None:
        return allowed[-1]
    if requested not in allowed:
        raise SystemExit(f"--cpu {requested}: not among this process's CPUs {allowed}")
    return requested
