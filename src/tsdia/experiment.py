"""The experiment directory: decide fresh / resume / refuse, claim it atomically, and hold it.

Only global rank 0 calls `claim_experiment`; the trainer broadcasts the resulting `Decision` so that every
rank acts on the same answer (no other rank looks at the shared filesystem to decide).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from tsdia.errors import CheckpointDirectoryExistsError, CheckpointError, ConfigError, ExperimentInUseError
from tsdia.fileio import atomic_write_text
from tsdia.training.checkpoint_store import latest_checkpoint, read_manifest

LOGS_DIR = "logs"
LOCK_FILE = ".tsdia.lock"
OWNER_FILE = (
    ".tsdia-owner.json"  # written by tsdia-submit: the claim token (and job id) owning this directory
)
_RESUME_LOG = re.compile(r"^training_resume_(\d+)_\d{8}_\d{6}\.log$")


@dataclass
class Decision:
    """Rank 0's verdict on the experiment directory, broadcast to every rank."""

    action: str  # "fresh" or "resume"
    save_dir: str
    timestamp: str  # YYYYmmdd_HHMMSS, shared by all ranks
    resume_from: str | None = None  # checkpoint to load; None on a fresh start or a restart from scratch
    resume_index: int = 0  # N of training_resume_N; 0 for the first attempt
    created_dir: bool = False  # this run created save_dir (it writes config.yml)
    note: str = ""

    @property
    def log_name(self) -> str:
        if self.resume_index == 0:
            return f"training_{self.timestamp}.log"
        return f"training_resume_{self.resume_index}_{self.timestamp}.log"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def now_timestamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")


def claim_experiment(save_dir: str, resume: str | None, claim_token: str | None = None) -> Decision:
    """Decide what this run does with `save_dir` and claim the directory if it is new.

    Raises `CheckpointDirectoryExistsError` (exists, not resuming), `CheckpointError` (bad resume path),
    or `ConfigError` (save_dir unusable). On refusal nothing on disk is changed.
    """
    root = Path(save_dir)
    timestamp = now_timestamp()
    if root.exists() and not root.is_dir():
        raise ConfigError(
            f"training.checkpoint.save_dir: {save_dir} exists and is not a directory; choose another path."
        )
    owner = read_owner(root)
    claimed_first_start = False
    if owner is not None and claim_token is not None and owner.get("claim_token") == claim_token:
        # tsdia-submit claimed the directory for this job: its first start, or a requeue of it.
        note = f"claimed at submit time by job {owner.get('job_id') or '?'}"
        if not (root / LOGS_DIR).exists():
            if resume in (None, "latest"):
                return Decision("fresh", save_dir, timestamp, created_dir=True, note=note)
            claimed_first_start = True  # an explicit checkpoint to start from: checked below
        else:
            if resume in (None, "latest") or latest_checkpoint(root) is not None:
                # A requeue continues from its own newest checkpoint, not from the one it started from.
                return _resume_latest(root, timestamp, note)
    if resume is None:
        _create(root, save_dir)
        return Decision("fresh", save_dir, timestamp, created_dir=True)
    if resume == "latest":
        if not root.exists() or _is_empty_dir(root):
            created = _create(root, save_dir, exist_ok=True)
            return Decision(
                "fresh", save_dir, timestamp, created_dir=created, note="resume: latest found nothing yet"
            )
        if not (root / LOGS_DIR).is_dir() and not (root / "config.yml").exists():
            raise CheckpointError(
                f"checkpoint.resume: latest: {save_dir} exists but is not a tsdia experiment (no logs/ or "
                "config.yml). Point training.checkpoint.save_dir at an experiment, or at a new path."
            )
        return _resume_latest(root, timestamp, "")
    checkpoint = check_resume_checkpoint(resume)
    created = _create(root, save_dir, exist_ok=True) or claimed_first_start
    return Decision(
        "resume",
        save_dir,
        timestamp,
        resume_from=str(checkpoint.resolve()),
        resume_index=next_resume_index(root),
        created_dir=created,
    )


def _resume_latest(root: Path, timestamp: str, note: str) -> Decision:
    """Resume an experiment from its newest complete checkpoint (from step 0 if it has none yet)."""
    latest = latest_checkpoint(root)
    if latest is None:
        note = "; ".join(filter(None, [note, "no complete checkpoint yet: restarting from step 0"]))
    return Decision(
        "resume",
        str(root),
        timestamp,
        resume_from=str(latest) if latest else None,
        resume_index=next_resume_index(root),
        note=note,
    )


def check_resume_checkpoint(resume: str) -> Path:
    """`checkpoint.resume` as a path: it must be a complete tsdia checkpoint."""
    checkpoint = Path(resume)
    if not checkpoint.exists():
        raise CheckpointError(
            f"checkpoint.resume: {resume} does not exist. Use 'latest' or a checkpoint directory."
        )
    if not checkpoint.is_dir() or read_manifest(checkpoint) is None:
        raise CheckpointError(
            f"checkpoint.resume: {resume} is not a complete tsdia checkpoint (no valid manifest.json). "
            "Use 'latest' to pick the newest complete one, or another checkpoint-epoch*-step* directory."
        )
    return checkpoint


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _create(root: Path, save_dir: str, exist_ok: bool = False) -> bool:
    """mkdir the experiment: the atomic claim. Returns whether this call created it."""
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"training.checkpoint.save_dir: cannot create {root.parent}: {err.strerror}. "
            "Choose a writable location."
        ) from None
    try:
        root.mkdir()
    except FileExistsError:
        if exist_ok and root.is_dir():
            return False
        raise CheckpointDirectoryExistsError(save_dir) from None
    except OSError as err:
        raise ConfigError(
            f"training.checkpoint.save_dir: cannot create {save_dir}: {err.strerror}. Choose a writable location."
        ) from None
    return True


def next_resume_index(root: Path) -> int:
    """N for the next `training_resume_N` log: one more than the highest so far."""
    logs = root / LOGS_DIR
    found = [int(m.group(1)) for p in logs.glob("training_resume_*.log") if (m := _RESUME_LOG.match(p.name))]
    return max(found, default=0) + 1


def read_owner(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_owner(root: Path, record: dict[str, Any]) -> None:
    atomic_write_text(root / OWNER_FILE, json.dumps(record, indent=2))


class ExperimentLock:
    """An exclusive lock on the experiment, held by rank 0 for the whole run.

    Stops a second live run (a stray `resume: latest`, a duplicated job) from writing into the same
    directory. The kernel releases it when the process dies, so a crash never leaves it stale.
    """

    def __init__(self, save_dir: str) -> None:
        self.path = Path(save_dir) / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self, job_id: str | None = None) -> None:
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the run
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ExperimentInUseError(
                f"{self.path.parent} is in use by {holder}. Wait for that run to finish (or stop it) before "
                "resuming, or choose another training.checkpoint.save_dir."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(
            f"pid {os.getpid()} on {socket.gethostname()}"
            + (f" (Slurm job {job_id})" if job_id else "")
            + "\n"
        )
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
