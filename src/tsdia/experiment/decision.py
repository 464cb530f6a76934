"""The one rule for an experiment directory: start fresh, resume, or refuse; and the claim of a new one.

`decide()` only reads the disk. `claim_directory()` then creates `save_dir` when the decision needs it
(`mkdir` is the atomic claim: of several racing runs or submits exactly one creates it). The job side
(global rank 0, whose decision is broadcast to every rank) and the submit side (`tsdia.experiment.claim`)
both call these two, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tsdia.errors import CheckpointDirectoryExistsError, CheckpointError, ConfigError
from tsdia.experiment.checkpoints import latest_checkpoint, read_manifest
from tsdia.experiment.layout import has_started, is_experiment, next_resume_index, now_timestamp, read_owner


@dataclass
class Decision:
    """What a run does with its experiment directory; rank 0's verdict, broadcast to every rank."""

    action: str  # "fresh" or "resume"
    save_dir: str
    timestamp: str  # YYYYmmdd_HHMMSS, shared by all ranks
    resume_from: str | None = None  # checkpoint to load; None on a fresh start or a restart from scratch
    resume_index: int = 0  # N of training_resume_N; 0 for the first attempt
    created_dir: bool = False  # this run is the experiment's first: it writes config.yml
    note: str = ""
    create: str = "no"  # what claim_directory() does: "no", "new" (must not exist) or "if_missing"
    # A resume's config compared with the experiment's (tsdia.experiment.config_change.ConfigChange.to_dict)
    config_change: dict[str, Any] | None = None

    @property
    def log_name(self) -> str:
        if self.resume_index == 0:
            return f"training_{self.timestamp}.log"
        return f"training_resume_{self.resume_index}_{self.timestamp}.log"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(save_dir: str, resume: str | None, claim_token: str | None = None) -> Decision:
    """Decide what a run does with `save_dir`, reading the disk only.

    `claim_token` is the job's token from the owner record that `tsdia-submit` wrote: it lets that job
    (and its requeues) into the directory it claimed. Raises `CheckpointDirectoryExistsError` (exists, not
    resuming), `CheckpointError` (bad resume path, not an experiment) or `ConfigError` (not a directory).
    """
    root = Path(save_dir)
    timestamp = now_timestamp()
    if root.exists() and not root.is_dir():
        raise ConfigError(
            f"training.checkpoint.save_dir: {save_dir} exists and is not a directory; choose another path."
        )
    owner = read_owner(root)
    if owner is not None and claim_token is not None and owner.get("claim_token") == claim_token:
        # tsdia-submit claimed the directory for this job: its first start, or a requeue of it.
        note = f"claimed at submit time by job {owner.get('job_id') or '?'}"
        if has_started(root) and (resume in (None, "latest") or latest_checkpoint(root) is not None):
            # A requeue continues from its own newest checkpoint, not from the one it started from.
            return _resume_latest(root, timestamp, note)
        if resume in (None, "latest"):
            return Decision("fresh", save_dir, timestamp, created_dir=True, note=note)
        return _resume_from(root, resume, timestamp, note)
    if resume is None:
        if root.exists():
            raise CheckpointDirectoryExistsError(save_dir)
        return Decision("fresh", save_dir, timestamp, created_dir=True, create="new")
    if resume != "latest":
        return _resume_from(root, resume, timestamp, "")
    if not root.exists() or not any(root.iterdir()):
        return Decision(
            "fresh",
            save_dir,
            timestamp,
            created_dir=True,
            create="if_missing",
            note="resume: latest found nothing yet",
        )
    if not is_experiment(root):
        raise CheckpointError(
            f"checkpoint.resume: latest: {save_dir} exists but is not a tsdia experiment (no logs/, config.yml "
            "or owner record). Point training.checkpoint.save_dir at an experiment, or at a new path."
        )
    if not has_started(root):  # claimed (or given a config) but no run ever started there
        return Decision("fresh", save_dir, timestamp, created_dir=True, note="no run had started here yet")
    return _resume_latest(root, timestamp, "")


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


def _resume_from(root: Path, resume: str, timestamp: str, note: str) -> Decision:
    """Resume from an explicit checkpoint (of this experiment or another one)."""
    checkpoint = check_resume_checkpoint(resume)
    first = not has_started(root)  # the experiment's first run writes config.yml
    return Decision(
        "resume",
        str(root),
        timestamp,
        resume_from=str(checkpoint.resolve()),
        resume_index=next_resume_index(root),
        created_dir=first,
        create="if_missing",
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


def claim_directory(decision: Decision) -> bool:
    """Create `save_dir` when the decision needs it; returns whether this call created it.

    `mkdir` is the claim: when the decision needs a new directory and another run made it first, this
    raises `CheckpointDirectoryExistsError`. Nothing is created when the parent cannot be made.
    """
    if decision.create == "no":
        return False
    root = Path(decision.save_dir)
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
        if decision.create == "if_missing" and root.is_dir():
            return False
        raise CheckpointDirectoryExistsError(decision.save_dir) from None
    except OSError as err:
        raise ConfigError(
            f"training.checkpoint.save_dir: cannot create {decision.save_dir}: {err.strerror}. "
            "Choose a writable location."
        ) from None
    return True


def open_experiment(save_dir: str, resume: str | None, claim_token: str | None = None) -> Decision:
    """The job side: decide, then claim the directory when it is new. On refusal nothing changes."""
    decision = decide(save_dir, resume, claim_token)
    claim_directory(decision)
    return decision
