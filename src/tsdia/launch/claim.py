"""The experiment directory, claimed at submit time so that a refused experiment never waits in the queue.

A fresh experiment is claimed with one `mkdir` (of N racing submits exactly one succeeds), then the owner
record `<save_dir>/.tsdia-owner.json` gets a random claim token. The job carries the token
(`TSDIA_CLAIM_TOKEN`), so `tsdia.experiment.claim_experiment` lets the job and its requeues in while any
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

from tsdia.errors import CheckpointDirectoryExistsError, CheckpointError, ConfigError, ExperimentInUseError
from tsdia.experiment import LOGS_DIR, OWNER_FILE, check_resume_checkpoint, read_owner, write_owner

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
        """Write the job id into the owner record (the job finds its token there, people find the job)."""
        self.record["job_id"] = job_id
        write_owner(self.save_dir, self.record)

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


def check_directory(save_dir: str, resume: str | None, job_is_active: JobIsActive | None = None) -> None:
    """Raise what the job's own directory decision would raise, without touching the disk.

    Used by `--dry-run` and before a resume submit: the same refusals, at submit time.
    """
    root = Path(save_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(
            f"training.checkpoint.save_dir: {save_dir} exists and is not a directory; choose another path."
        )
    if resume is None:
        if root.exists():
            raise CheckpointDirectoryExistsError(save_dir)
        return
    _check_owner_not_running(root, job_is_active)
    if resume == "latest":
        is_experiment = (root / LOGS_DIR).is_dir() or (root / "config.yml").exists()
        claimed_by_submit = (root / OWNER_FILE).exists()
        if root.is_dir() and any(root.iterdir()) and not (is_experiment or claimed_by_submit):
            raise CheckpointError(
                f"checkpoint.resume: latest: {save_dir} exists but is not a tsdia experiment (no logs/ or "
                "config.yml). Point training.checkpoint.save_dir at an experiment, or at a new path."
            )
        return
    check_resume_checkpoint(resume)


def claim(
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
    if resume is None:
        _mkdir_parent(root)
        try:
            root.mkdir()  # the atomic claim: exactly one of several racing submits gets here
        except FileExistsError:
            raise CheckpointDirectoryExistsError(save_dir) from None
        except OSError as err:
            raise ConfigError(
                f"training.checkpoint.save_dir: cannot create {save_dir}: {err.strerror}. Choose a writable location."
            ) from None
        result = Claim(root, record["claim_token"], record, created=True)
    else:
        check_directory(save_dir, resume, job_is_active)
        _mkdir_parent(root)
        created = False
        try:
            root.mkdir()
            created = True
        except FileExistsError:
            pass
        result = Claim(root, record["claim_token"], record, created=created, previous=read_owner(root))
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


def _mkdir_parent(root: Path) -> None:
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"training.checkpoint.save_dir: cannot create {root.parent}: {err.strerror}. Choose a writable location."
        ) from None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
