"""`tsdia status`: one row per experiment; its state from Slurm (one squeue, one sacct) or from disk.

A state is never a guess: when Slurm cannot be asked, or a run's host cannot be checked from here, the
row says so instead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tsdia.experiment.layout import SWEEP_FILE
from tsdia.follow.scan import OnDisk, find_experiments, read_experiment
from tsdia.slurm_commands import JobInfo, Runner, _run, query_jobs

HIDE_AFTER_S = 7 * 24 * 3600  # finished experiments older than this are hidden unless --all
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "STOPPED", "CRASHED", "HUNG", "DIED", "TIMEOUT"})
_SLURM_STATES = {  # Slurm's words -> ours (the rest pass through: FAILED, CANCELLED, TIMEOUT, ...)
    "RUNNING": "RUNNING",
    "COMPLETING": "RUNNING",
    "CONFIGURING": "RUNNING",
    "REQUEUED": "REQUEUED",
    "REQUEUE_HOLD": "REQUEUED",
    "REQUEUE_FED": "REQUEUED",
    "SUSPENDED": "SUSPENDED",
}


@dataclass
class Row:
    """One experiment as `tsdia status` shows it (and `--json` prints it)."""

    experiment: str
    state: str
    detail: str
    job_id: str | None
    step: int | None
    total_steps: int | None
    eta_s: float | None
    attempts: int
    attempts_detail: str
    best_metric: str
    best: list[float] | None  # [value, step]
    last_checkpoint_age_s: float | None
    wandb: str
    updated: float | None  # when the experiment last changed (progress record or newest log)
    sweep: str | None = None  # the sweep directory this experiment is a member of

    @property
    def progress(self) -> float | None:
        if self.step is None or not self.total_steps:
            return None
        return self.step / self.total_steps


def collect(paths: Sequence[str], run: Runner = _run, now: float | None = None) -> list[Row]:
    """Rows for every experiment under `paths`; Slurm is asked once for all of them."""
    now = time.time() if now is None else now
    experiments = [read_experiment(root) for root in find_experiments(paths)]
    job_ids = [e.job_id for e in experiments if e.job_id]
    slurm = query_jobs(job_ids, run) if job_ids else {}
    return [_row(e, slurm, now) for e in experiments]


def _row(e: OnDisk, slurm: dict[str, JobInfo] | None, now: float) -> Row:
    state, detail = _state(e, slurm)
    progress = e.progress
    step = progress.step if progress else None
    total = progress.total_steps if progress else None
    eta = None
    if state == "RUNNING" and progress and progress.steps_per_s and total is not None and step is not None:
        eta = (total - step) / progress.steps_per_s
    newest_log = e.logs[-1].path.stat().st_mtime if e.logs else None
    updated = max(filter(None, [progress.updated if progress else None, newest_log]), default=None)
    return Row(
        experiment=str(e.root),
        state=state,
        detail=detail,
        job_id=e.job_id,
        step=step,
        total_steps=total,
        eta_s=eta,
        attempts=len(e.logs),
        attempts_detail=_attempts_detail(e),
        best_metric=e.best_metric,
        best=[e.best[0], e.best[1]] if e.best else None,
        last_checkpoint_age_s=now - e.last_checkpoint_mtime if e.last_checkpoint_mtime else None,
        wandb=_wandb(e),
        updated=updated,
        sweep=str(e.root.parent) if (e.root.parent / SWEEP_FILE).is_file() else None,
    )


def _state(e: OnDisk, slurm: dict[str, JobInfo] | None) -> tuple[str, str]:
    """(STATE, why) from Slurm when the experiment has a job, else from disk."""
    if e.job_id:
        if slurm is None:
            return "UNKNOWN", f"Slurm could not be asked about job {e.job_id}"
        info = slurm.get(e.job_id)
        if info is not None:
            state = _SLURM_STATES.get(info.state, info.state)
            if state == "PENDING":
                state = "REQUEUED" if e.logs else "QUEUED"
            why = info.reason or (f"exit {info.exit_code}" if info.exit_code not in ("", "0:0") else "")
            return state, f"job {e.job_id}" + (f": {why}" if why else "")
        disk_state, why = _disk_state(e)
        return disk_state, f"Slurm no longer knows job {e.job_id}; " + why
    return _disk_state(e)


def _disk_state(e: OnDisk) -> tuple[str, str]:
    if not e.logs:
        return "NEW", "claimed, no run has started"
    record = e.last_record_of_current_attempt()  # written when the current attempt stopped or crashed
    progress = e.progress if e.progress and e.progress.attempt == e.current_attempt else None
    ended = record is not None or (progress is not None and progress.state != "running")
    if not ended:
        alive = e.local_run_alive()  # the lock file names the pid and host of the newest run
        if alive is None:
            return "UNKNOWN", f"running on another host? ({e.lock_holder}): cannot check it from here"
        if alive:
            return "RUNNING", e.lock_holder
        return (
            "DIED",
            "no stop was recorded (killed, or its node died); resume with training.checkpoint.resume=latest",
        )
    if record is not None:
        if record.end == "completed":  # the reason says why when it ended early (early stopping)
            return "COMPLETED", "" if record.reason == "completed" else record.reason
        if record.failed:
            return (
                "HUNG" if record.end == "hang" else "CRASHED"
            ), f"{record.reason} at step {record.stop_step}"
        return "STOPPED", f"{record.reason} at step {record.stop_step}"
    if progress is not None and progress.state == "finished":
        return "COMPLETED", ""
    return "STOPPED", "stopped without a record"


_SHORT_ENDS = {"preempted": "pre", "preemption": "pre", "time_limit": "time", "time": "time"}


def _attempts_detail(e: OnDisk) -> str:
    """`3 (2 pre, 1 crash)`: the attempts, and how the ones that did not complete ended."""
    kinds: dict[str, int] = {}
    for a in e.attempts:
        end = a.end or a.reason.split(" ")[0]  # records older than `end` have only the reason
        if end != "completed":
            word = _SHORT_ENDS.get(end, end)
            kinds[word] = kinds.get(word, 0) + 1
    if not kinds:
        return str(len(e.logs))
    return f"{len(e.logs)} ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})"


def _wandb(e: OnDisk) -> str:
    if not e.wandb:
        return "-"
    if e.wandb.get("mode") == "online" and e.wandb.get("run_url"):
        return str(e.wandb["run_url"])
    if e.unsynced_wandb:
        return f"offline ({e.unsynced_wandb} unsynced)"
    return "offline (synced)"


def visible(rows: list[Row], show_all: bool, now: float) -> tuple[list[Row], int]:
    """The rows to show, and how many finished ones older than a week were hidden."""
    if show_all:
        return rows, 0
    keep = [
        r
        for r in rows
        if not (r.state in FINISHED and r.updated is not None and now - r.updated > HIDE_AFTER_S)
    ]
    return keep, len(rows) - len(keep)


def format_table(rows: list[Row], base: Path | None = None) -> str:
    """The table people read (`--json` has the same data)."""
    header = ["experiment", "state", "step", "progress", "ETA", "attempts", "best", "last ckpt", "wandb"]
    lines = [header]
    sweep = None
    for r in rows:
        if r.sweep != sweep and r.sweep is not None:  # members are listed under their sweep
            members = sum(1 for other in rows if other.sweep == r.sweep)
            lines.append([f"{_relative(r.sweep, base)}/ (sweep, {members} members)", *[""] * 8])
        sweep = r.sweep
        name = _relative(r.experiment, base) if r.sweep is None else "  " + Path(r.experiment).name
        step = f"{r.step}/{r.total_steps}" if r.step is not None else "-"
        progress = f"{r.progress:.0%}" if r.progress is not None else "-"
        best = f"{r.best_metric} {r.best[0]:.4g} @ {int(r.best[1])}" if r.best else "-"
        lines.append(
            [
                name,
                r.state,
                step,
                progress,
                _duration(r.eta_s),
                r.attempts_detail,
                best,
                _duration(r.last_checkpoint_age_s, " ago"),
                r.wandb,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    notes = [f"  {_relative(r.experiment, base)}: {r.state} - {r.detail}" for r in rows if r.detail]
    return "\n".join(text + (["", *notes] if notes else []))


def as_json(rows: list[Row]) -> list[dict[str, object]]:
    return [{**asdict(r), "progress": r.progress} for r in rows]


def _relative(path: str, base: Path | None) -> str:
    if base is None:
        return path
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return path


def _duration(seconds: float | None, suffix: str = "") -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}{suffix}"
    return f"{int(seconds)}s{suffix}"
