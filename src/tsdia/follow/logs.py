"""`tsdia logs DIR [-f] [--rank R] [--attempt N]`: an experiment's attempt log, followed across requeues."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from tsdia.errors import TsdiaError
from tsdia.experiment.layout import SWEEP_FILE, is_experiment
from tsdia.follow.scan import AttemptLog, attempt_logs, read_experiment
from tsdia.slurm_commands import FINAL_STATES, MAYBE_REQUEUED, job_state

POLL_S = 0.5
QUIET_END_S = 2.0  # a local run that has exited: stop following once its log has been quiet this long


def pick_log(root: Path, rank: int, attempt: int | None) -> AttemptLog:
    """The log of `attempt` (default: the newest) for `rank`; a clear error when there is none."""
    if not is_experiment(root):
        raise TsdiaError(f"{root} is not a tsdia experiment (no logs/, config.yml or owner record).")
    logs = attempt_logs(root, rank)
    if not logs:
        raise TsdiaError(f"{root} has no log for rank {rank} yet (the run has not started).")
    if attempt is None:
        return logs[-1]
    for log in logs:
        if log.index == attempt:
            return log
    have = ", ".join(str(log.index) for log in logs)
    raise TsdiaError(f"{root} has no attempt {attempt} for rank {rank}; attempts with logs: {have}.")


def resolve_member(root: Path, member: str | None) -> Path:
    """A sweep directory names one of its members: `--member NAME`, or asked for on a terminal."""
    if not (root / SWEEP_FILE).is_file():
        if member is not None:
            raise TsdiaError(f"--member {member}: {root} is not a sweep directory (no {SWEEP_FILE}).")
        return root
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and is_experiment(p))
    if member is None and sys.stdin.isatty() and names:
        for i, name in enumerate(names):
            print(f"  [{i}] {name}", file=sys.stderr)
        answer = input(f"{root} is a sweep: which member? [0-{len(names) - 1}] ").strip()
        member = names[int(answer)] if answer.isdigit() and int(answer) < len(names) else answer
    if member not in names:
        listed = ", ".join(names) or "none yet"
        why = "choose one with --member NAME" if member is None else f"it has no member {member!r}"
        raise TsdiaError(f"{root} is a sweep directory: {why}. Members: {listed}.")
    return root / member


def run_ended(root: Path) -> bool:
    """The experiment's job has ended for good (Slurm), or its local run is no longer alive."""
    info = read_experiment(root)
    if info.job_id:
        state, _ = job_state(info.job_id)
        # PREEMPTED or NODE_FAIL may still be followed by a requeue: keep following those.
        return (state in FINAL_STATES and state not in MAYBE_REQUEUED) or state == "UNKNOWN"
    progress = info.progress
    if progress and progress.attempt == info.current_attempt and progress.state != "running":
        return True
    return info.local_run_alive() is False


def follow(
    root: Path,
    rank: int = 0,
    attempt: int | None = None,
    out: TextIO = sys.stdout,
    ended: Callable[[Path], bool] = run_ended,
    poll_s: float = POLL_S,
) -> None:
    """Print the log and keep printing what is appended; move on to the next attempt's log when a requeue
    creates it; return once the job has ended (Slurm) or the run has exited (local) and nothing more came."""
    if not is_experiment(root):
        raise TsdiaError(f"{root} is not a tsdia experiment (no logs/, config.yml or owner record).")
    if attempt is None and not attempt_logs(root, rank):
        # Followed right after the submit: wait for the job to start and create its log.
        print(f"waiting for {root}'s run to start...", file=sys.stderr, flush=True)
        while not attempt_logs(root, rank) and not ended(root):
            time.sleep(poll_s)
    log = pick_log(root, rank, attempt)
    out.write(f"==> {log.path.name} <==\n")
    position = 0
    quiet_since = time.monotonic()
    while True:
        position, wrote = _copy_new(log.path, position, out)
        newer = [other for other in attempt_logs(root, rank) if other.index > log.index]
        if wrote:
            quiet_since = time.monotonic()
            continue
        if newer:
            log, position = newer[0], 0
            out.write(f"\n==> {log.path.name} <==\n")
            out.flush()
            quiet_since = time.monotonic()
            continue
        if time.monotonic() - quiet_since >= QUIET_END_S and ended(root):
            position, wrote = _copy_new(log.path, position, out)  # what was written while we looked
            if not wrote and not [o for o in attempt_logs(root, rank) if o.index > log.index]:
                return
            continue
        time.sleep(poll_s)


def print_log(root: Path, rank: int = 0, attempt: int | None = None, out: TextIO = sys.stdout) -> None:
    log = pick_log(root, rank, attempt)
    _copy_new(log.path, 0, out)


def _copy_new(path: Path, position: int, out: TextIO) -> tuple[int, bool]:
    """Write what `path` holds past `position` (complete lines only); return the new position."""
    try:
        with open(path, "rb") as f:
            f.seek(position)
            data = f.read()
    except OSError:
        return position, False
    end = data.rfind(b"\n") + 1  # a line still being written waits for its newline
    if end == 0:
        return position, False
    out.write(data[:end].decode("utf-8", errors="replace"))
    out.flush()
    return position + end, True
