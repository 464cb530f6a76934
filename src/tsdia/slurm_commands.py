"""The one place that talks to Slurm's command-line tools (`squeue`, `scontrol`, `sacct`), torch-free.

Job states for `tsdia-submit --wait` and resume submits, the time a job has left, requeueing from inside a
job, and the one parser of Slurm durations. `--wait` follows a job until it ends for good: a requeued job
(preemption, time limit, `scontrol requeue`) goes back to PENDING under the same id, so only the final
states below end the wait.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# States after which the job will not run again by itself.
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "NODE_FAIL",
        "PREEMPTED",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)
# Final-looking states that a requeue may still follow: believed only after they last this long.
MAYBE_REQUEUED = frozenset({"NODE_FAIL", "PREEMPTED"})
_SETTLE_S = 15.0
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "CONFIGURING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
    }
)
_STATE = re.compile(r"\bJobState=(\S+)")
_EXIT = re.compile(r"\bExitCode=(\S+)")

Runner = Callable[[list[str]], str | None]


def _run(cmd: list[str]) -> str | None:
    """stdout of a Slurm command, or None when it fails (unknown job, no accounting, no Slurm)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def job_state(job_id: str, run: Runner = _run) -> tuple[str, str]:
    """(state, exit code) of a job; ("UNKNOWN", "") when neither scontrol nor sacct knows it."""
    out = run(["scontrol", "show", "job", "-o", job_id])
    if out:
        state_match, exit_match = _STATE.search(out), _EXIT.search(out)
        if state_match:
            return state_match.group(1), exit_match.group(1) if exit_match else ""
    out = run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"])
    if out and out.strip():
        state_text, _, exit_code = out.strip().splitlines()[-1].partition("|")
        # sacct writes "CANCELLED by 0"
        return (state_text.split()[0] if state_text.split() else "UNKNOWN"), exit_code
    return "UNKNOWN", ""


def is_job_active(job_id: str, run: Runner = _run) -> bool:
    """True while the job is queued, running or waiting to be requeued."""
    return job_state(job_id, run)[0] in ACTIVE_STATES


def wait_for_job(
    job_id: str,
    on_change: Callable[[str], None] = lambda state: None,
    poll_s: float = 2.0,
    run: Runner = _run,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[str, str]:
    """Block until the job ends for good (requeues included); returns its final (state, exit code)."""
    last = ""
    since = clock()  # when the job entered its current state
    unknown_polls = 0
    while True:
        state, exit_code = job_state(job_id, run)
        if state != last:
            on_change(state)
            last = state
            since = clock()
        if state in FINAL_STATES and (state not in MAYBE_REQUEUED or clock() - since >= _SETTLE_S):
            return state, exit_code
        unknown_polls = unknown_polls + 1 if state == "UNKNOWN" else 0
        if unknown_polls * poll_s > 120:
            return "UNKNOWN", exit_code
        sleep(poll_s)


# Slurm's documented time formats (sbatch --time, squeue %L): MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS,
# DAYS-HOURS, DAYS-HOURS:MINUTES, DAYS-HOURS:MINUTES:SECONDS.
_DURATION = (
    re.compile(r"(?P<m>\d+)"),
    re.compile(r"(?P<m>\d+):(?P<s>\d+)"),
    re.compile(r"(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"),
    re.compile(r"(?P<d>\d+)-(?P<h>\d+)"),
    re.compile(r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)"),
    re.compile(r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"),
)


def parse_duration(text: str) -> int | None:
    """Seconds in a Slurm duration (`--time` values, squeue's time left), or None (UNLIMITED, junk)."""
    for pattern in _DURATION:
        match = pattern.fullmatch(text.strip())
        if match is None:
            continue
        parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
        if parts.get("s", 0) >= 60 or ("h" in parts and parts.get("m", 0) >= 60):
            return None
        if "d" in parts and parts["h"] >= 24:
            return None
        hours = parts.get("d", 0) * 24 + parts.get("h", 0)
        return (hours * 60 + parts.get("m", 0)) * 60 + parts.get("s", 0)
    return None


def requeue_job(job_id: str) -> bool:
    """`scontrol requeue`: Slurm ends this attempt and reruns the job (same id, restart count + 1).

    Fails harmlessly when the job is already being requeued (e.g. a preemption that requeues by itself
    sent the SIGTERM that stopped us): the checkpoint is saved either way.
    """
    try:
        subprocess.run(
            ["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True
        )
    except subprocess.CalledProcessError as err:
        logger.warning(
            "scontrol requeue %s failed (%s); the job may already be requeued.", job_id, err.stderr.strip()
        )
        return False
    except (OSError, subprocess.TimeoutExpired) as err:
        logger.warning("scontrol requeue %s failed: %s", job_id, err)
        return False
    return True


@dataclass
class JobInfo:
    """What Slurm says of one job: its state, why (squeue's reason), and its exit code once it ended."""

    state: str
    reason: str = ""
    exit_code: str = ""
    source: str = ""  # "squeue" (queued or running) or "sacct" (ended)


def query_jobs(job_ids: Sequence[str], run: Runner = _run) -> dict[str, JobInfo] | None:
    """The state of many jobs with one `squeue` and one `sacct` call, whatever their number.

    Jobs squeue lists (queued, running, completing) come from squeue; the others from sacct (ended
    jobs, when accounting is on). A job neither knows is absent from the result. None when Slurm cannot
    be asked at all (no squeue, no controller).
    """
    wanted = {str(j) for j in job_ids}
    if not wanted:
        return {}
    out = run(["squeue", "-h", "-r", "--me", "-o", "%i|%T|%r"])  # -r: one line per array task
    if out is None:
        return None
    jobs: dict[str, JobInfo] = {}
    for line in out.splitlines():
        job_id, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job_id in wanted:
            jobs[job_id] = JobInfo(state, "" if reason == "None" else reason, source="squeue")
    missing = sorted(wanted - jobs.keys())
    if missing:
        ended = run(["sacct", "-X", "-n", "-P", "-j", ",".join(missing), "-o", "JobID,State,ExitCode"]) or ""
        for line in ended.splitlines():
            job_id, state, exit_code = ([*line.split("|"), "", ""])[:3]
            if job_id in wanted and job_id not in jobs and state:
                jobs[job_id] = JobInfo(state.split()[0], exit_code=exit_code, source="sacct")
    return jobs


# What `scontrol show job` says at the moment a job's processes receive SIGTERM (measured on Slurm 22.05,
# FACTS.md §4): partition preemption -> COMPLETING with Restarts already + 1 (Slurm requeues it itself);
# a node set DOWN -> PENDING with Restarts + 1 (requeued before the signal arrives); plain `scancel` ->
# COMPLETING, Restarts unchanged; the time limit -> COMPLETING, Reason=TimeLimit; GraceTime preemption and
# `scancel --signal` -> still RUNNING (Slurm has not decided anything yet).
_FIELD = re.compile(r"\b(JobState|Reason|Restarts|RunTime|TimeLimit|NodeList|ExcNodeList)=(\S*)")
_REQUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING"})


@dataclass(frozen=True)
class JobSnapshot:
    """One `scontrol show job` reading: enough to tell how Slurm is stopping the job."""

    state: str
    reason: str
    restarts: int
    time_left_s: int | None  # None: no limit (or unreadable)
    nodes: tuple[str, ...]
    excluded_nodes: tuple[str, ...]


SNAPSHOT_TRIES, SNAPSHOT_PAUSE_S = 3, 1.0


def job_snapshot(job_id: str, run: Runner = _run) -> JobSnapshot | None:
    """The job as slurmctld sees it now (one `scontrol show job` call), or None when it cannot be asked."""
    out = None
    for attempt in range(SNAPSHOT_TRIES):  # a busy slurmctld (many jobs ending at once) can time out
        out = run(["scontrol", "show", "job", "-o", job_id])
        if out:
            break
        if attempt + 1 < SNAPSHOT_TRIES:
            time.sleep(SNAPSHOT_PAUSE_S)
    if not out:
        return None
    fields = dict(_FIELD.findall(out))
    if "JobState" not in fields:
        return None
    limit = parse_duration(fields.get("TimeLimit", ""))
    elapsed = parse_duration(fields.get("RunTime", ""))
    return JobSnapshot(
        state=fields["JobState"],
        reason=fields.get("Reason", "None"),
        restarts=int(fields["Restarts"]) if fields.get("Restarts", "").isdigit() else 0,
        time_left_s=None if limit is None or elapsed is None else limit - elapsed,
        nodes=tuple(_hosts(fields.get("NodeList", ""))),
        excluded_nodes=tuple(_hosts(fields.get("ExcNodeList", ""))),
    )


def _hosts(hostlist: str) -> list[str]:
    from tsdia.cluster import expand_hostlist

    if hostlist in ("", "(null)"):
        return []
    try:
        return expand_hostlist(hostlist)
    except ValueError:
        return []


@dataclass(frozen=True)
class SlurmStop:
    """How Slurm is stopping this attempt, told from a `JobSnapshot` taken when the signal arrived."""

    end: str  # preempted, node_failure, cancelled, time_limit, or signalled (Slurm has not acted yet)
    words: str  # for the log and attempts.json
    requeued_by_slurm: bool  # Slurm puts the job back in the queue itself: do not requeue it again
    kill_is_near: bool  # SIGKILL follows within KillWait: requeue before saving, not after
    state: str = ""  # what scontrol said, e.g. "COMPLETING Reason=None Restarts=1" (for attempts.json)


def classify_slurm_stop(
    snapshot: JobSnapshot | None, signal_name: str, restart_count: int, lead_s: int
) -> SlurmStop:
    """Tell preemption, node failure, cancel and time limit apart (see the measurements above)."""
    stop = _classify(snapshot, signal_name, restart_count, lead_s)
    if snapshot is None:
        return stop
    said = f"{snapshot.state} Reason={snapshot.reason} Restarts={snapshot.restarts}"
    return SlurmStop(stop.end, stop.words, stop.requeued_by_slurm, stop.kill_is_near, said)


def _classify(snapshot: JobSnapshot | None, signal_name: str, restart_count: int, lead_s: int) -> SlurmStop:
    if snapshot is None:
        return SlurmStop(
            "signalled", f"stop requested ({signal_name}; Slurm could not be asked why)", False, False
        )
    state = snapshot.state
    if snapshot.reason == "TimeLimit" or state == "TIMEOUT":
        return SlurmStop("time_limit", f"time limit reached ({signal_name})", False, True)
    if snapshot.restarts > restart_count:
        if state in _REQUEUED_STATES:
            return SlurmStop("node_failure", f"node failure ({signal_name}; requeued by Slurm)", True, True)
        return SlurmStop("preempted", f"preempted ({signal_name}; requeued by Slurm)", True, True)
    if state in ("COMPLETING", "CANCELLED"):
        return SlurmStop("cancelled", f"cancelled ({signal_name})", False, True)
    left = snapshot.time_left_s
    # The lead signal (`--signal=USR2@lead`) comes within Slurm's ~30 s check after `lead` s are left. A
    # SIGTERM while RUNNING is never it (GraceTime preemption, `scancel --signal=TERM`), however close the limit.
    if signal_name != "SIGTERM" and left is not None and left <= lead_s + 30:
        return SlurmStop("time_limit", f"time limit ({signal_name}, {left} s left)", False, False)
    return SlurmStop("preempted", f"preemption ({signal_name})", False, False)


def exclude_nodes(job_id: str, nodes: list[str], run: Runner = _run) -> bool:
    """`scontrol update jobid=ID ExcNodeList=...`: the requeued job will not run on these nodes."""
    return run(["scontrol", "update", f"jobid={job_id}", f"ExcNodeList={','.join(nodes)}"]) is not None
