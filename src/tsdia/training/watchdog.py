"""Hang watchdog: a thread per rank that notices when training stops making progress, and ends the attempt.

A dead peer, a stuck collective or a deadlocked DataLoader leaves every rank blocked in C code, where no
signal handler and no Python timeout can act. The trainer marks its progress (`step_done`, `phase`,
`watching`); a daemon thread compares it with a deadline. On a hang, every rank (the first to notice
raises a flag file that the others see at their next beat):

1. prints why and dumps the Python stacks of all its threads into its log (`faulthandler`, to fd 2,
   which the console tee copies into the rank's log file);
2. rank 0 waits (bounded) for the others to dump, reads every rank's heartbeat to tell which ranks were
   furthest behind (the others waited for them in a collective), records the attempt as `hang` in
   `checkpoints/attempts.json` and requeues the Slurm job when allowed;
3. the process exits with `EXIT_HANG` through `os._exit`: a blocked collective cannot hold it.

Nothing is saved (a hung rank cannot take part in a collective save): the next attempt resumes from the
newest complete checkpoint. Heartbeats are small JSON files in `checkpoints/watchdog/<attempt>/`,
written by the thread itself (never by the training loop), so a rank whose heartbeat goes stale is
frozen or gone.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsdia.cluster import ClusterEnvironment
from tsdia.config.schema import Config, SlurmConfig
from tsdia.errors import EXIT_HANG
from tsdia.experiment.attempts import read_attempts, record_attempt
from tsdia.experiment.layout import STORE_DIR
from tsdia.fileio import atomic_write_text
from tsdia.slurm_commands import requeue_job
from tsdia.training.after_stop import (
    apply_node_exclusion,
    attempt_record,
    decide_requeue,
    plan_node_exclusion,
)

logger = logging.getLogger(__name__)

WATCHDOG_DIR = "watchdog"  # in checkpoints/: one folder per attempt
HANG_FLAG = "hang"
RECORDED_FLAG = "recorded"
STEP_FACTOR = 10  # derived timeout: this many times the slowest recent step (or phase)
RECENT_STEPS = 100
# Where a rank is inside a step, in execution order: with the step number it orders the ranks, so the
# ones furthest behind (the cause) are told from those that wait for them in a collective.
STEP_PHASES = ("after step", "data", "forward", "backward", "optimizer")


@dataclass
class HangReport:
    """What rank 0 knows when it records a hang."""

    step: int  # the last optimizer step this rank completed
    idle_s: float  # seconds since then (or since the phase began)
    limit_s: float
    phase: str
    stuck_ranks: list[int]
    ranks: dict[str, dict[str, Any]] = field(default_factory=dict)  # rank -> heartbeat

    def as_record(self) -> dict[str, Any]:
        return {"timeout_s": round(self.limit_s, 1), "ranks": self.ranks}


class HangWatchdog:
    """Watches one rank's progress from a daemon thread (see the module docstring)."""

    def __init__(
        self,
        *,
        directory: Path,
        rank: int,
        world_size: int,
        timeout_s: float | None,
        min_timeout_s: float,
        on_hang: Callable[[HangReport], bool] | None,
        before_exit: Callable[[], None],
        exit_process: Callable[[int], None] = os._exit,
    ) -> None:
        self.directory = directory
        self.rank = rank
        self.world_size = world_size
        self.fixed_timeout_s = timeout_s
        self.min_timeout_s = min_timeout_s
        self.on_hang = on_hang  # rank 0: records the attempt; returns whether to requeue (done by it)
        self.before_exit = before_exit  # drains this rank's log
        self.exit_process = exit_process  # a seam for tests of the thread alone
        self.beat_s = min(5.0, (timeout_s or min_timeout_s) / 5)
        self.step = 0
        self.phase = "start-up"
        self._lock = threading.Lock()
        self._mark = time.monotonic()  # last progress: a completed step, or the end of a watched phase
        self._armed = False  # after the attempt's first completed step
        self._steps: deque[float] = deque(maxlen=RECENT_STEPS)
        self._phase_kind: str | None = None  # validation / checkpoint, while one runs
        self._phase_started = 0.0
        self._slowest: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._host = socket.gethostname()

    # -- the training loop's side: cheap attribute updates, no I/O ---------------------------------------

    def step_done(self, step: int) -> None:
        """An optimizer step completed."""
        now = time.monotonic()
        with self._lock:
            if self._armed:
                self._steps.append(now - self._mark)
            self._armed = True  # the first step (start-up, compile, warm-up) is never a sample
            self._mark, self.step, self.phase = now, step, "after step"

    @contextlib.contextmanager
    def watching(self, kind: str) -> Iterator[None]:
        """A validation or a checkpoint save: limited by the timeout and its own slowest earlier run."""
        with self._lock:
            self._phase_kind, self._phase_started, self.phase = kind, time.monotonic(), kind
        try:
            yield
        finally:
            now = time.monotonic()
            with self._lock:
                took = now - self._phase_started
                self._slowest[kind] = max(self._slowest.get(kind, 0.0), took)
                self._phase_kind, self._mark, self.phase = None, now, "after " + kind

    def timeout_s(self) -> float:
        """The current limit for one optimizer step."""
        if self.fixed_timeout_s is not None:
            return self.fixed_timeout_s
        slowest = max(self._steps, default=0.0)
        return max(self.min_timeout_s, STEP_FACTOR * slowest)

    def _limit(self, now: float) -> tuple[float | None, float]:
        """(limit, seconds idle), or (None, ...) while nothing is watched."""
        with self._lock:
            kind = self._phase_kind
            if kind is not None:
                if kind not in self._slowest:  # its first run this attempt: no measure of it yet
                    return None, now - self._phase_started
                limit = max(self.timeout_s(), STEP_FACTOR * self._slowest[kind])
                return limit, now - self._phase_started
            if not self._armed:
                return None, now - self._mark
            return self.timeout_s(), now - self._mark

    # -- the thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._beat("running", 0.0)
        self._thread = threading.Thread(target=self._run, name="tsdia-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        flag = self.directory / HANG_FLAG
        while not self._stop.wait(self.beat_s):
            now = time.monotonic()
            limit, idle = self._limit(now)
            if limit is not None and idle > limit:
                self._hang(f"no progress for {idle:.0f} s (limit {limit:.0f} s)", idle, limit)
                return
            if flag.exists():
                who = "?"
                with contextlib.suppress(OSError):
                    who = flag.read_text().strip() or who
                self._hang(f"rank {who} reported a hang", idle, limit or 0.0)
                return
            self._beat("running", idle)

    def _hang(self, why: str, idle: float, limit: float) -> None:
        with contextlib.suppress(OSError), open(self.directory / HANG_FLAG, "x") as out:
            out.write(str(self.rank))  # the first rank to notice tells the others (their next beat)
        print(
            f"HANG on rank {self.rank} ({self._host}, pid {os.getpid()}): {why}, after step {self.step} "
            f"in phase '{self.phase}'. Python stacks of all threads follow.",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        self._beat("dumped", idle)
        if self.rank == 0:
            self._record(idle, limit)
        else:
            self._wait_for(lambda: (self.directory / RECORDED_FLAG).exists(), self._gather_s() + 10)
        self._exit()

    def _record(self, idle: float, limit: float) -> None:
        """Rank 0: wait for the other ranks' stacks, tell who was stuck, record the attempt, requeue."""
        self._wait_for(self._all_dumped_or_gone, self._gather_s())
        beats = self.read_heartbeats()
        report = HangReport(
            step=self.step,
            idle_s=idle,
            limit_s=limit,
            phase=self.phase,
            stuck_ranks=stuck_ranks(beats, self.world_size, time.time(), self._stale_s()),
            ranks={str(r): b for r, b in sorted(beats.items())},
        )
        try:
            if self.on_hang is not None:
                self.on_hang(report)
        except Exception:  # the exit must happen whatever the record does
            logger.exception("Recording the hang failed")
        finally:
            with contextlib.suppress(OSError):
                (self.directory / RECORDED_FLAG).touch()

    def _exit(self) -> None:
        with contextlib.suppress(Exception):
            self.before_exit()
        self.exit_process(EXIT_HANG)

    def _gather_s(self) -> float:
        return 3 * self.beat_s + 5

    def _stale_s(self) -> float:
        return 3 * self.beat_s + 5

    def _all_dumped_or_gone(self) -> bool:
        beats = self.read_heartbeats()
        now = time.time()
        return all(
            (b := beats.get(r)) is not None
            and (b["state"] == "dumped" or now - b["written_at"] > self._stale_s())
            for r in range(self.world_size)
        )

    def _wait_for(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            time.sleep(0.2)

    def _beat(self, state: str, idle: float) -> None:
        beat = {
            "rank": self.rank,
            "host": self._host,
            "pid": os.getpid(),
            "step": self.step,
            "phase": self.phase,
            "idle_s": round(idle, 1),
            "state": state,
            "written_at": time.time(),
        }
        with contextlib.suppress(OSError):
            atomic_write_text(self.directory / f"rank{self.rank}.json", json.dumps(beat))

    def read_heartbeats(self) -> dict[int, dict[str, Any]]:
        beats: dict[int, dict[str, Any]] = {}
        for rank in range(self.world_size):
            with contextlib.suppress(OSError, ValueError):
                beats[rank] = json.loads((self.directory / f"rank{rank}.json").read_text())
        return beats


def stuck_ranks(beats: dict[int, dict[str, Any]], world_size: int, now: float, stale_s: float) -> list[int]:
    """The ranks that caused a hang: those without a fresh heartbeat (frozen or gone) if any, else the ones
    furthest behind in (step, phase); the others were waiting for them."""
    silent = [
        r
        for r in range(world_size)
        if r not in beats or (beats[r]["state"] == "running" and now - beats[r]["written_at"] > stale_s)
    ]
    if silent:
        return silent
    position = {r: (b["step"], _phase_index(b["phase"])) for r, b in beats.items()}
    lowest = min(position.values())
    return sorted(r for r, p in position.items() if p == lowest)


def _phase_index(phase: str) -> int:
    return STEP_PHASES.index(phase) if phase in STEP_PHASES else len(STEP_PHASES)


def attempt_directory(save_dir: Path, resume_index: int) -> Path:
    """`checkpoints/watchdog/<attempt>/`: this attempt's heartbeats and flags."""
    return save_dir / STORE_DIR / WATCHDOG_DIR / str(resume_index)


def clear_old_attempts(save_dir: Path, resume_index: int) -> None:
    """Rank 0, before the ranks start their watchdogs: earlier attempts' heartbeats only mislead."""
    root = save_dir / STORE_DIR / WATCHDOG_DIR
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name != str(resume_index):
                shutil.rmtree(entry, ignore_errors=True)


def watch_attempt(
    config: Config,
    cluster: ClusterEnvironment,
    save_dir: Path,
    resume_index: int,
    start_step: int,
    drain_log: Callable[[], None],
) -> HangWatchdog:
    """This rank's watchdog for one attempt, started when `training.watchdog.enabled`."""
    settings = config.training.watchdog

    def on_hang(report: HangReport) -> bool:  # rank 0, in the watchdog thread
        requeue = record_hang(
            report,
            save_dir=save_dir,
            cluster=cluster,
            slurm=config.slurm,
            resume_index=resume_index,
            start_step=start_step,
        )
        if requeue and cluster.job_id and cluster.talks_to_slurm:
            _, exclude = plan_node_exclusion(cluster.job_id, read_attempts(save_dir))
            requeue_job(cluster.job_id)  # before the exit: Slurm then ends every task of this attempt
            apply_node_exclusion(cluster.job_id, exclude)  # a node in two failed attempts in a row
        return requeue

    watchdog = HangWatchdog(
        directory=attempt_directory(save_dir, resume_index),
        rank=cluster.rank,
        world_size=cluster.world_size,
        timeout_s=settings.timeout_s,
        min_timeout_s=settings.min_timeout_s,
        on_hang=on_hang if cluster.is_main else None,
        before_exit=drain_log,
    )
    if settings.enabled:
        watchdog.start()
    return watchdog


def record_hang(
    report: HangReport,
    *,
    save_dir: Path,
    cluster: ClusterEnvironment,
    slurm: SlurmConfig,
    resume_index: int,
    start_step: int,
) -> bool:
    """Rank 0: append the `hang` attempt to attempts.json, say what happens next; True to requeue."""
    record = attempt_record(
        cluster,
        resume_index,
        start_step,
        report.step,
        "hang",
        "hang",
        ranks=report.stuck_ranks,  # the ranks furthest behind (the others waited for them)
        hang=report.as_record(),
    )
    history = record_attempt(save_dir, record)
    where = ", ".join(f"rank {r}: step {b['step']} {b['phase']}" for r, b in report.ranks.items())
    head = (
        f"Stopped: hang after step {report.step} (no optimizer step for {report.idle_s:.0f} s, limit "
        f"{report.limit_s:.0f} s); stuck rank(s) {report.stuck_ranks} ({where}); nothing saved since the "
        "newest checkpoint"
    )
    if cluster.job_id is None:
        print(f"{head}. Resume with training.checkpoint.resume=latest.", file=sys.stderr, flush=True)
        return False
    requeue, why = decide_requeue(
        history,
        cluster.restart_count,
        slurm.max_requeues,
        crashed=True,
        requeue_on_crash=slurm.requeue_on_crash,
        hung=True,
        requeue_on_hang=slurm.requeue_on_hang,
    )
    print(f"{head}; {'' if requeue else 'not '}requeueing: {why}.", file=sys.stderr, flush=True)
    return requeue
