"""The experiment directory, claimed at submit time so that a refused experiment never waits in the queue.

A fresh experiment is claimed with one `mkdir` (of N racing submits exactly one succeeds), then the owner
record `<save_dir>/.tsdia-owner.json` gets a random claim token. The job carries the token
(`TSDIA_CLAIM_TOKEN`), so the job's `tsdia.experiment.decision.decide` lets the job and its requeues in while any
other run is still refused. A submission that fails takes its claim back: nothing half-made remains.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsdia.errors import ExperimentInUseError
from tsdia.experiment.decision import Decision, claim_directory, decide
from tsdia.experiment.layout import OWNER_FILE, read_owner, write_owner

JobIsActive = Callable[[str], bool]


@dataclass
class Claim:
    """A submit-time claim on `save_dir`; `release()` undoes it when the submission fails."""

    save_dir: Path
    token: str
    record: dict[str, Any]
    created: bool  # this submit created save_dir: releasing removes it
    previous: dict[str, Any] | None = None  # the owner record this claim replaced (resume submits)
    _released: bool = field(default=False, repr=False)

    def record_job(self, job_id: str) -> None:
        """Write the job id into the owner record, for people and `tsdia status` to find the job.

        Not fsynced: the claim itself (the token) was written durably; a lost job id only costs the status
        its Slurm state, and a sweep also keeps the ids in sweep.json.
        """
        self.record["job_id"] = job_id
        write_owner(self.save_dir, self.record, durable=False)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self.created:
            shutil.rmtree(self.save_dir, ignore_errors=True)
        elif self.previous is not None:
            write_owner(self.save_dir, self.previous)
        else:
            (self.save_dir / OWNER_FILE).unlink(missing_ok=True)


def check_can_submit(save_dir: str, resume: str | None, job_is_active: JobIsActive | None = None) -> Decision:
    """Raise what the job's own directory decision would raise, without touching the disk.

    Used by `--dry-run` and by `claim_for_submit`: the same rule as the job's, at submit time, plus the
    check that a resume does not take the directory from a job that is still queued or running.
    """
    decision = decide(save_dir, resume)
    if resume is not None:
        _check_owner_not_running(Path(save_dir), job_is_active)
    return decision


def claim_for_submit(
    save_dir: str,
    resume: str | None,
    config_path: str,
    overrides: Sequence[str],
    executor: str,
    job_is_active: JobIsActive | None = None,
) -> Claim:
    """Claim `save_dir` for a job about to be submitted; raises the same refusals as the job would."""
    root = Path(save_dir)
    record: dict[str, Any] = {
        "claim_token": uuid.uuid4().hex,
        "job_id": None,
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "user": _user(),
        "executor": executor,
        "config": os.path.abspath(config_path),
        "overrides": list(overrides),
    }
    decision = check_can_submit(save_dir, resume, job_is_active)
    previous = read_owner(root)
    created = claim_directory(decision)
    if decision.create == "new":
        # mkdir made the directory: of several racing submits exactly one got here.
        result = Claim(root, record["claim_token"], record, created=True)
    else:
        # A resume submit (or a claimed directory resubmitted): the old owner record comes back on failure.
        result = Claim(root, record["claim_token"], record, created=created, previous=previous)
    try:
        write_owner(root, record)
    except BaseException:
        result.release()
        raise
    return result


def _check_owner_not_running(root: Path, job_is_active: JobIsActive | None) -> None:
    """A resume submit must not take the directory from a job that is still queued or running."""
    owner = read_owner(root)
    job_id = owner.get("job_id") if owner else None
    if job_is_active is None or not job_id or owner is None or owner.get("executor") == "local":
        return
    if job_is_active(str(job_id)):
        raise ExperimentInUseError(
            f"{root} belongs to Slurm job {job_id}, which is still queued or running. Wait for it to end "
            f"(squeue -j {job_id}) or cancel it (scancel {job_id}) before submitting a resume, or choose "
            "another training.checkpoint.save_dir."
        )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
