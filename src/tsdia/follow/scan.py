"""Find tsdia experiments under some paths and read what each one holds on disk (no Slurm, no torch)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsdia.experiment.attempts import AttemptRecord, read_attempts
from tsdia.experiment.checkpoints import BEST_LINK, INDEX_FILE, MANIFEST, complete_checkpoints, read_manifest
from tsdia.experiment.layout import (
    LOCK_FILE,
    LOGS_DIR,
    RANK_LOGS_DIR,
    STORE_DIR,
    is_experiment,
    read_owner,
)
from tsdia.experiment.progress import ProgressRecord, read_progress

MAX_DEPTH = 4  # how deep below each given path experiments are looked for
_WANDB_INFO = "wandb_info.json"


def find_experiments(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Every experiment directory at or below `paths` (not inside another experiment), sorted."""
    found: set[Path] = set()
    for path in paths:
        found.update(_walk(Path(path), MAX_DEPTH))
    return sorted(found)


def _walk(path: Path, depth: int) -> Iterator[Path]:
    if not path.is_dir():
        return
    if is_experiment(path):
        yield path
        return
    if depth == 0:
        return
    try:
        children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return
    for child in children:
        yield from _walk(child, depth - 1)


@dataclass
class AttemptLog:
    """One attempt's log file: index 0 is `training_<ts>.log`, N is `training_resume_N_<ts>.log`."""

    index: int
    path: Path


def attempt_logs(root: Path, rank: int = 0) -> list[AttemptLog]:
    """The experiment's attempt logs for `rank`, oldest first."""
    logs = root / LOGS_DIR
    directory = logs if rank == 0 else logs / RANK_LOGS_DIR
    suffix = ".log" if rank == 0 else f".rank{rank}.log"
    found = []
    for path in directory.glob(f"training_*{suffix}"):
        stem = path.name[: -len(suffix)]
        if rank == 0 and ".rank" in stem:
            continue
        parts = stem.split("_")
        if parts[1] == "resume" and len(parts) >= 3 and parts[2].isdigit():
            found.append(AttemptLog(int(parts[2]), path))
        elif parts[1].isdigit():
            found.append(AttemptLog(0, path))
    return sorted(found, key=lambda a: (a.index, a.path.name))


@dataclass
class OnDisk:
    """What an experiment directory says about itself."""

    root: Path
    owner: dict[str, Any] | None
    progress: ProgressRecord | None
    attempts: list[AttemptRecord]
    logs: list[AttemptLog]
    best_metric: str = "val_loss"
    best: tuple[float, int] | None = None  # (value, step) of best_checkpoint
    last_checkpoint_mtime: float | None = None
    lock_holder: str = ""  # the lock file's text: "pid N on HOST (Slurm job J)"
    wandb: dict[str, Any] = field(default_factory=dict)
    unsynced_wandb: int = 0

    @property
    def job_id(self) -> str | None:
        """The Slurm job that owns the experiment (None for local runs and tsdia-train)."""
        if not self.owner or self.owner.get("executor") == "local" or not self.owner.get("job_id"):
            return None
        return str(self.owner["job_id"])

    @property
    def current_attempt(self) -> int | None:
        return self.logs[-1].index if self.logs else None

    def last_record_of_current_attempt(self) -> AttemptRecord | None:
        if self.attempts and self.attempts[-1].resume_index == self.current_attempt:
            return self.attempts[-1]
        return None

    def local_run_alive(self) -> bool | None:
        """True/False for a run on this host (its pid is alive or not); None when it ran elsewhere."""
        words = self.lock_holder.split()
        if len(words) < 4 or words[0] != "pid" or not words[1].isdigit():
            return False
        if words[3] != socket.gethostname():
            return None
        try:
            os.kill(int(words[1]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def read_experiment(root: Path) -> OnDisk:
    """Read every file `tsdia status` needs; each one may be missing."""
    info = OnDisk(
        root=root,
        owner=read_owner(root),
        progress=read_progress(root),
        attempts=read_attempts(root),
        logs=attempt_logs(root),
    )
    _read_checkpoints(info)
    with contextlib.suppress(OSError):
        info.lock_holder = (root / LOCK_FILE).read_text().strip()
    try:
        info.wandb = json.loads((root / _WANDB_INFO).read_text())
    except (OSError, ValueError):
        info.wandb = {}
    info.unsynced_wandb = len(unsynced_wandb_runs(root))
    return info


def offline_wandb_runs(root: Path) -> list[Path]:
    """The experiment's offline WandB run directories (one per attempt), oldest first."""
    return sorted((root / "wandb").glob("offline-run-*"))


def unsynced_wandb_runs(root: Path) -> list[Path]:
    """Offline runs without wandb's `.synced` marker (`wandb sync` writes it after an upload)."""
    return [run for run in offline_wandb_runs(root) if not any(run.glob("*.synced"))]


def _read_checkpoints(info: OnDisk) -> None:
    """Best metric and newest checkpoint, from `checkpoints/index.json` (rewritten with every checkpoint),
    else from the manifests themselves (slower: every checkpoint's files are checked)."""
    root = info.root
    try:
        index = json.loads((root / STORE_DIR / INDEX_FILE).read_text())
        entries = {c["name"]: c for c in index["checkpoints"]}
        info.best_metric = index.get("best_metric") or info.best_metric
        best, latest = entries.get(index.get("best") or ""), index.get("latest")
        if best is not None and info.best_metric in best.get("metrics", {}):
            info.best = (float(best["metrics"][info.best_metric]), int(best["step"]))
        if latest:
            info.last_checkpoint_mtime = (root / latest / MANIFEST).stat().st_mtime
        return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    checkpoints = complete_checkpoints(root)
    if checkpoints:
        info.last_checkpoint_mtime = (checkpoints[-1][0] / MANIFEST).stat().st_mtime
    best_link = root / BEST_LINK
    manifest = read_manifest(best_link) if best_link.is_symlink() else None
    if manifest is not None and info.best_metric in manifest.metrics:
        info.best = (manifest.metrics[info.best_metric], manifest.step)
