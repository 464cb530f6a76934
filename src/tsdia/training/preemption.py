"""Stopping on a signal without saving inside the handler: flag -> agreed step -> collective save.

The handler only records the signal. The trainer asks `should_stop()` after every optimizer step; every
`check_interval` steps the ranks all-reduce their flags, so all of them stop after the same step (a
single process checks every step for free). After the collective save, `decide_requeue` says whether
the Slurm job goes back in the queue, bounded by `slurm.max_requeues` and by progress: a job that keeps
being stopped without getting past its last checkpoint is not requeued forever.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from tsdia.cluster import ClusterEnvironment
from tsdia.config.schema import SlurmConfig
from tsdia.experiment.attempts import AttemptRecord, record_attempt
from tsdia.slurm_commands import time_left_s

logger = logging.getLogger(__name__)

NO_PROGRESS_LIMIT = 3  # stop requeueing after this many attempts in a row that saved no new step


_early_signal: int | None = None  # a stop signal that arrived before the trainer was ready


def catch_stop_signals_early(signals: Sequence[str]) -> None:
    """Flag stop signals from process start on (the heavy imports take seconds); the trainer picks it up."""

    def remember(signum: int, frame: FrameType | None) -> None:
        global _early_signal
        _early_signal = _early_signal or signum

    for name in signals:
        signal.signal(signal.Signals[name], remember)


def ignore_stop_signals(signals: Sequence[str]) -> None:
    """After the work is saved: a late signal must not turn a finished run into a killed one."""
    for name in signals:
        signal.signal(signal.Signals[name], signal.SIG_IGN)


class PreemptionWatcher:
    """Installs flag-only signal handlers; `should_stop()` makes every rank agree on when to stop."""

    def __init__(
        self, signals: Sequence[str], check_interval: int, distributed: bool, device: Any = "cpu"
    ) -> None:
        self.signal_numbers = [signal.Signals[name] for name in signals]
        self.check_interval = check_interval
        self.distributed = distributed
        self.device = device
        self.received: int | None = _early_signal  # signal number, set by the handler
        self.received_at: float | None = None
        self.stop_signal: str | None = None  # the agreed stop's signal name, once decided
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for number in self.signal_numbers:
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Nothing else here: saving inside a handler can deadlock (locks held by the interrupted code).
        if self.received is None:
            self.received, self.received_at = signum, time.time()

    def should_stop(self, step: int) -> bool:
        """True on every rank at the same step once any rank has received a signal."""
        if self.stop_signal is not None:
            return True
        if not self.distributed:
            local = self.received
        elif step % self.check_interval == 0:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([self.received or 0], dtype=torch.int64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item()) or None
        else:
            return False
        if local:
            self.stop_signal = signal.Signals(local).name
            logger.warning(
                "Received %s: saving a checkpoint at step %d and stopping.", self.stop_signal, step
            )
            return True
        return False


def decide_requeue(
    history: list[AttemptRecord],
    restart_count: int,
    max_requeues: int,
    crashed: bool,
    requeue_on_crash: bool,
    hung: bool = False,
    requeue_on_hang: bool = True,
) -> tuple[bool, str]:
    """Whether to requeue, and why (or why not), in words for the log.

    A hang is requeued when `requeue_on_hang` is set; otherwise it counts as a crash.
    """
    if hung and requeue_on_hang:
        crashed = False
    elif hung and not requeue_on_crash:
        return False, "a hang is not requeued (slurm.requeue_on_hang and slurm.requeue_on_crash are false)"
    if crashed and not requeue_on_crash:
        return False, "a crash is not requeued (set slurm.requeue_on_crash: true to change that)"
    if restart_count >= max_requeues:
        return False, f"slurm.max_requeues={max_requeues} reached ({restart_count} requeues so far)"
    recent = history[-NO_PROGRESS_LIMIT:]
    if len(recent) == NO_PROGRESS_LIMIT and all(a.stop_step <= a.start_step for a in recent):
        return False, (
            f"the last {NO_PROGRESS_LIMIT} attempts saved no new step (stopped before their first checkpoint?): "
            "lower checkpoint.interval or raise slurm.signal_lead_s"
        )
    return True, f"requeue {restart_count + 1} of at most {max_requeues}"


def plan_after_stop(
    *,
    save_dir: Path,
    cluster: ClusterEnvironment,
    slurm: SlurmConfig,
    resume_index: int,
    start_step: int,
    stop_step: int,
    signal_name: str | None,
) -> bool:
    """Record this attempt, print why it stopped and what happens next, and return whether to requeue.

    `signal_name` None means a crash. Rank 0 only; it runs while the log tee is still open.
    """
    reason = classify_stop(signal_name, cluster.job_id, slurm.signal_lead_s)
    attempt = AttemptRecord(
        resume_index=resume_index,
        job_id=cluster.job_id,
        restart_count=cluster.restart_count,
        start_step=start_step,
        stop_step=stop_step,
        reason=reason,
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    history = record_attempt(save_dir, attempt)
    if cluster.job_id is None:
        print(
            f"Stopped: {reason} at step {stop_step}. Resume with training.checkpoint.resume=latest.",
            flush=True,
        )
        return False
    crashed = signal_name is None
    requeue, why = decide_requeue(
        history, cluster.restart_count, slurm.max_requeues, crashed, slurm.requeue_on_crash
    )
    print(f"Stopped: {reason} at step {stop_step}; {'' if requeue else 'not '}requeueing: {why}.", flush=True)
    return requeue


def classify_stop(signal_name: str | None, job_id: str | None, lead_s: int) -> str:
    """preemption, time limit, or a plain stop request, from the signal and the job's time left."""
    if signal_name is None:
        return "crash"
    if job_id is None:
        return f"stop requested ({signal_name})"
    left = time_left_s(job_id)
    if left is not None and left <= lead_s + 90:
        return f"time limit ({signal_name}, {left} s left)"
    return f"preemption ({signal_name})"
