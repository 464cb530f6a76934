"""After a stop: rank 0 records the attempt, decides the requeue and sets node exclusions.

`decide_requeue` bounds requeues by `slurm.max_requeues` and by progress: a job that keeps being
stopped without getting past its last checkpoint is not requeued forever. `StopInspector` asks Slurm
why the job is being stopped the moment the signal arrives; `StopFlow` is the trainer's side of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsdia.cluster import ClusterEnvironment
from tsdia.config.schema import SlurmConfig
from tsdia.experiment.attempts import AttemptRecord, nodes_to_exclude, read_attempts, record_attempt
from tsdia.slurm_commands import SlurmStop, classify_slurm_stop, exclude_nodes, job_snapshot, requeue_job

logger = logging.getLogger(__name__)

NO_PROGRESS_LIMIT = 3  # stop requeueing after this many attempts in a row that saved no new step


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


@dataclass
class StopPlan:
    """What happens after a stop, decided by rank 0 and broadcast to every rank."""

    end: str  # attempts.json's `end` (see tsdia.experiment.attempts.ENDS)
    requeue: bool  # the job goes back in the queue (by us, or by Slurm itself)
    requeue_now: bool = False  # rank 0 must still call `scontrol requeue` (not done early, not Slurm's)
    exclude: list[str] = field(default_factory=list)  # ExcNodeList to set once requeued (pending jobs only)


PRE_SAVE_WAIT_S = 15  # how long the stop waits for Slurm's answer before it saves anyway


class StopInspector:
    """Rank 0 of a Slurm job: reads Slurm's view of the stop in a thread started from the signal handler.

    At once, because what scontrol says changes within seconds, and because at the time limit the requeue
    must not wait for the current step to end (SIGKILL may come first).
    """

    def __init__(self, save_dir: Path, cluster: ClusterEnvironment, slurm: SlurmConfig) -> None:
        self.save_dir, self.cluster, self.slurm = save_dir, cluster, slurm
        self.slurm_stop: SlurmStop | None = None
        self.requeued_early = False
        self._thread: threading.Thread | None = None

    def start(self, signal_name: str) -> None:
        """Ask (again: a SIGTERM after the lead signal may be the time limit itself; the newest answer wins)."""
        previous = self._thread
        self._thread = threading.Thread(
            target=self._inspect, args=(signal_name, previous), name="tsdia-stop-inspector", daemon=True
        )
        self._thread.start()

    def wait(self, timeout_s: float = 60) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _inspect(self, signal_name: str, previous: threading.Thread | None) -> None:
        if previous is not None:
            previous.join(timeout=60)  # one answer at a time, in order
        self.slurm_stop = slurm_stop_now(self.cluster, signal_name, self.slurm.signal_lead_s)
        if not self.requeued_early:
            self.requeued_early = requeue_before_saving(
                self.save_dir, self.cluster, self.slurm, self.slurm_stop
            )


def slurm_stop_now(cluster: ClusterEnvironment, signal_name: str, lead_s: int) -> SlurmStop | None:
    """How Slurm is stopping this job, asked the moment the ranks agreed to stop (rank 0; None off Slurm)."""
    if cluster.job_id is None or not cluster.talks_to_slurm or signal_name == "SIGINT":
        return None
    return classify_slurm_stop(job_snapshot(cluster.job_id), signal_name, cluster.restart_count, lead_s)


def attempt_record(
    cluster: ClusterEnvironment,
    resume_index: int,
    start_step: int,
    stop_step: int,
    reason: str,
    end: str,
    **details: Any,
) -> AttemptRecord:
    """This attempt's record, stamped now with its job, restart count and nodes; `details` are the
    end-specific fields (ranks, slurm_state, hang)."""
    return AttemptRecord(
        resume_index=resume_index,
        job_id=cluster.job_id,
        restart_count=cluster.restart_count,
        start_step=start_step,
        stop_step=stop_step,
        reason=reason,
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
        end=end,
        nodes=list(cluster.nodes),
        **details,
    )


def plan_after_stop(
    *,
    save_dir: Path,
    cluster: ClusterEnvironment,
    slurm: SlurmConfig,
    resume_index: int,
    start_step: int,
    stop_step: int,
    signal_name: str | None,
    slurm_stop: SlurmStop | None = None,
    requeued_early: bool = False,
    failure: str | None = None,
    ranks: Sequence[int] = (),
) -> StopPlan:
    """Record this attempt, print why it stopped and what happens next, and return the plan.

    A signal stop passes `signal_name` (and `slurm_stop`, read when the stop was agreed); a failure
    passes `failure` ("crash", "hang") and no signal. Rank 0 only; it runs while the log tee is open.
    """
    end, reason = describe_stop(signal_name, failure, slurm_stop, cluster.job_id)
    attempt = attempt_record(
        cluster,
        resume_index,
        start_step,
        stop_step,
        reason,
        end,
        ranks=list(ranks),
        slurm_state=slurm_stop.state if slurm_stop else None,
    )
    history = [*read_attempts(save_dir), attempt]
    if cluster.job_id is None or end in ("interrupted", "cancelled", "aborted"):
        record_attempt(save_dir, attempt)
        hint = "" if cluster.job_id else " Resume with training.checkpoint.resume=latest."
        print(f"Stopped: {reason} at step {stop_step}; not requeueing.{hint}", flush=True)
        return StopPlan(end, requeue=False)
    if slurm_stop is not None and slurm_stop.requeued_by_slurm:
        record_attempt(save_dir, attempt)
        print(f"Stopped: {reason} at step {stop_step}; Slurm requeues the job itself.", flush=True)
        return StopPlan(end, requeue=True)
    requeue, why = decide_requeue(
        history, cluster.restart_count, slurm.max_requeues, failure is not None, slurm.requeue_on_crash
    )
    if requeued_early:
        requeue, why = True, "requeued before saving: Slurm's SIGKILL was due before the save could finish"
    exclude: list[str] = []
    if requeue and failure is not None:
        attempt.excluded_nodes, exclude = plan_node_exclusion(cluster.job_id, history)
    record_attempt(save_dir, attempt)
    if requeue and not cluster.talks_to_slurm:
        why += "; the job script requeues the job (tsdia cannot reach Slurm from inside the container)"
    print(f"Stopped: {reason} at step {stop_step}; {'' if requeue else 'not '}requeueing: {why}.", flush=True)
    return StopPlan(end, requeue=requeue, requeue_now=requeue and not requeued_early, exclude=exclude)


def requeue_before_saving(
    save_dir: Path, cluster: ClusterEnvironment, slurm: SlurmConfig, slurm_stop: SlurmStop | None
) -> bool:
    """At the time limit itself SIGKILL follows within KillWait, maybe before the save ends: requeue first.

    A TIMEOUT job is never requeued by Slurm, and a process killed mid-save cannot requeue afterwards;
    requeued now, the next attempt resumes from the stop checkpoint if it completes, else from the newest
    complete one. Bounded like any requeue (rank 0).
    """
    if (
        cluster.job_id is None
        or not cluster.talks_to_slurm
        or slurm_stop is None
        or slurm_stop.end != "time_limit"
        or not slurm_stop.kill_is_near
    ):
        return False
    requeue, why = decide_requeue(
        read_attempts(save_dir), cluster.restart_count, slurm.max_requeues, False, False
    )
    if not requeue:
        return False
    requeued = requeue_job(cluster.job_id)
    if requeued:
        print(f"Time limit reached: requeued job {cluster.job_id} before saving ({why}).", flush=True)
    return requeued


def record_completed(
    save_dir: Path,
    cluster: ClusterEnvironment,
    resume_index: int,
    start_step: int,
    stop_step: int,
    reason: str = "completed",
) -> None:
    """The attempt that finished training: its record closes the history (rank 0). `reason` says why it
    ended before the planned end when it did (early stopping); `end` is "completed" either way."""
    record_attempt(
        save_dir, attempt_record(cluster, resume_index, start_step, stop_step, reason, "completed")
    )


def plan_node_exclusion(job_id: str, history: list[AttemptRecord]) -> tuple[list[str], list[str]]:
    """(suspects, the whole ExcNodeList to set) for nodes in the last two failed attempts; says so in the log.

    Slurm changes ExcNodeList only while a job is pending, so `apply_node_exclusion` runs after the requeue.
    """
    suspects = nodes_to_exclude(history)
    if not suspects:
        return [], []
    snapshot = job_snapshot(job_id)
    wanted = sorted(set(snapshot.excluded_nodes if snapshot else ()) | set(suspects))
    failures = ", ".join(a.end or a.reason for a in history[-2:])
    print(
        f"Excluding node(s) {', '.join(suspects)} from the requeued job: part of the last two failed attempts "
        f"({failures}). ExcNodeList={','.join(wanted)}",
        flush=True,
    )
    return suspects, wanted


EXCLUDE_TRIES, EXCLUDE_PAUSE_S = 10, 0.5


def apply_node_exclusion(job_id: str, nodes: list[str]) -> None:
    """Set the requeued job's ExcNodeList; a failure is a warning, never an error.

    Slurm takes the change only once it has processed the requeue (it refuses it while the job still
    counts as running), which can take a moment after `scontrol requeue` returns: try for a few seconds,
    well inside KillWait.
    """
    if not nodes:
        return
    for _ in range(EXCLUDE_TRIES):
        if exclude_nodes(job_id, nodes):
            return
        time.sleep(EXCLUDE_PAUSE_S)
    logger.warning(
        "Could not set ExcNodeList=%s on job %s (scontrol update refused it for %.0f s).",
        ",".join(nodes),
        job_id,
        EXCLUDE_TRIES * EXCLUDE_PAUSE_S,
    )


def describe_stop(
    signal_name: str | None, failure: str | None, slurm_stop: SlurmStop | None, job_id: str | None
) -> tuple[str, str]:
    """(end, reason in words) of an attempt that did not complete."""
    if failure == "aborted":
        return "aborted", "aborted (second SIGINT; no stop checkpoint)"
    if failure is not None or signal_name is None:
        return (failure or "crash"), (failure or "crash")
    if signal_name == "SIGINT":
        return "interrupted", "interrupted (SIGINT)"
    if slurm_stop is not None:
        return slurm_stop.end, slurm_stop.words
    if job_id is None:
        return "signalled", f"stop requested ({signal_name})"
    return "signalled", f"stop requested ({signal_name}; Slurm could not be asked why)"


class StopFlow:
    """The trainer's side of a stop: ask Slurm why (from the signal), record the attempt, requeue.

    Rank 0 does the asking and recording; every rank calls `finish` so that a requeue waits until all
    of them have saved and closed their files.
    """

    def __init__(self, save_dir: Path, cluster: ClusterEnvironment, slurm: SlurmConfig, resume_index: int):
        self.save_dir, self.cluster, self.slurm, self.resume_index = save_dir, cluster, slurm, resume_index
        self.inspector: StopInspector | None = None  # rank 0 of a Slurm job, once a stop signal came

    @property
    def asks_slurm(self) -> bool:
        return self.cluster.is_main and self.cluster.talks_to_slurm

    def on_signal(self, signal_name: str) -> None:
        """From the signal handler: ask Slurm now (off the main thread) why the job is being stopped."""
        if self.inspector is None:
            self.inspector = StopInspector(self.save_dir, self.cluster, self.slurm)
        self.inspector.start(signal_name)

    def on_agreed_stop(self, signal_name: str | None) -> None:
        """Once the ranks agreed to stop: wait for Slurm's answer (ask now if only a peer had the signal)."""
        if not self.asks_slurm:
            return
        if self.inspector is None:
            self.on_signal(signal_name or "")
        assert self.inspector is not None
        # Bounded: a slow or unreachable controller must not eat the grace time the save needs (Slurm's
        # KillWait is 30 s by default); the answer can still arrive while saving, plan() waits for it.
        self.inspector.wait(PRE_SAVE_WAIT_S)

    def plan(
        self, start_step: int, stop_step: int, signal_name: str | None, failure: str | None = None
    ) -> StopPlan:
        """Rank 0 records the attempt and says (in the log) whether the job will be requeued."""
        if not self.cluster.is_main:
            return StopPlan(end="", requeue=False)
        inspector = self.inspector
        if inspector is not None:
            inspector.wait()
        return plan_after_stop(
            save_dir=self.save_dir,
            cluster=self.cluster,
            slurm=self.slurm,
            resume_index=self.resume_index,
            start_step=start_step,
            stop_step=stop_step,
            signal_name=None if failure else signal_name,
            slurm_stop=inspector.slurm_stop if inspector else None,
            requeued_early=bool(inspector and inspector.requeued_early),
            failure=failure,
        )

    def record_completed(self, start_step: int, stop_step: int, reason: str = "completed") -> None:
        if self.cluster.is_main:
            record_completed(self.save_dir, self.cluster, self.resume_index, start_step, stop_step, reason)

    def requeue(self, plan: StopPlan) -> None:
        """Rank 0 puts the job back in the queue when the plan says so (and excludes suspect nodes)."""
        job_id = self.cluster.job_id if self.cluster.is_main and self.cluster.talks_to_slurm else None
        if job_id and plan.requeue_now and requeue_job(job_id):
            apply_node_exclusion(job_id, plan.exclude)
