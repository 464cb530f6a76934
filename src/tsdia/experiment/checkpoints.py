"""Named checkpoints on disk: the manifest that marks one complete, discovery, best and rotation.

A checkpoint `checkpoint-epoch{E}-step{S}/` is complete when its `manifest.json` exists and every file it
lists has the listed size. It is written under `checkpoints/.incomplete-<name>/` and renamed into place only
after the manifest is written, so a crash leaves either a complete checkpoint or staging debris that the
next start removes. Nothing here imports torch: `tsdia.training.checkpointer` writes the state into the
staging directory, and this module commits it, finds it again, and rotates.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tsdia.errors import CheckpointError
from tsdia.experiment.layout import STORE_DIR
from tsdia.fileio import atomic_symlink, atomic_write_text, fsync_dir, remove_tree

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
BEST_LINK = "best_checkpoint"

STAGING_PREFIX = ".incomplete-"
INDEX_FILE = "index.json"  # in checkpoints/: a summary of the manifests, rewritten after every checkpoint
_NAME = re.compile(r"^checkpoint-epoch(\d+)-step(\d+)$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"checkpoint-epoch{epoch}-step{step}"


@dataclass
class Manifest:
    """What a complete checkpoint holds; written last, so its presence means complete."""

    name: str
    step: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # relative path -> size in bytes
    created: str = ""


def read_manifest(checkpoint_dir: str | os.PathLike[str]) -> Manifest | None:
    """The manifest of a complete checkpoint, or None if it is missing, unreadable or incomplete."""
    directory = Path(checkpoint_dir)
    try:
        data = json.loads((directory / MANIFEST).read_text())
        manifest = Manifest(**data)
    except (OSError, ValueError, TypeError):
        return None
    for rel, size in manifest.files.items():
        try:
            if (directory / rel).stat().st_size != size:
                return None
        except OSError:
            return None
    return manifest


def complete_checkpoints(save_dir: str | os.PathLike[str]) -> list[tuple[Path, Manifest]]:
    """Every complete named checkpoint in an experiment, oldest step first."""
    found = []
    root = Path(save_dir)
    if not root.is_dir():
        return []
    for entry in root.iterdir():
        if _NAME.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            manifest = read_manifest(entry)
            if manifest is None:
                logger.warning(
                    "Ignoring %s: it has no valid %s (incomplete or not a tsdia checkpoint).", entry, MANIFEST
                )
            else:
                found.append((entry, manifest))
    return sorted(found, key=lambda item: (item[1].step, item[1].epoch))


def latest_checkpoint(save_dir: str | os.PathLike[str]) -> Path | None:
    found = complete_checkpoints(save_dir)
    return found[-1][0] if found else None


def best_checkpoint(
    checkpoints: Iterable[tuple[Path, Manifest]], metric: str, mode: str
) -> tuple[Path, Manifest] | None:
    """The checkpoint with the best recorded `metric` (ties: the earlier one)."""
    best: tuple[Path, Manifest] | None = None
    for path, manifest in checkpoints:
        value = manifest.metrics.get(metric)
        if value is None or not math.isfinite(value):
            continue
        if best is None:
            best = (path, manifest)
            continue
        current = best[1].metrics[metric]
        if (value < current) if mode == "min" else (value > current):
            best = (path, manifest)
    return best


def best_checkpoints(
    checkpoints: Iterable[tuple[Path, Manifest]], metric: str, mode: str, count: int
) -> list[tuple[Path, Manifest]]:
    """The `count` checkpoints with the best recorded `metric`, best first (ties: the earlier one).

    Checkpoints without a finite value of `metric` are left out, so fewer than `count` may come back.
    """
    scored = [
        (path, manifest)
        for path, manifest in checkpoints
        if (value := manifest.metrics.get(metric)) is not None and math.isfinite(value)
    ]
    scored.sort(key=lambda item: (item[1].step, item[1].epoch))  # the earlier one first among ties
    sign = 1.0 if mode == "min" else -1.0
    return sorted(scored, key=lambda item: sign * item[1].metrics[metric])[:count]


def clean_staging(save_dir: str | os.PathLike[str]) -> list[str]:
    """Remove checkpoint writes and deletions that a crash interrupted. Returns what was removed."""
    store = Path(save_dir) / STORE_DIR
    removed = []
    if store.is_dir():
        for entry in store.iterdir():
            if entry.name.startswith((STAGING_PREFIX, ".deleting-")):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
    return removed


def staging_path(save_dir: str | os.PathLike[str], name: str) -> Path:
    """Where checkpoint `name` is written before it is complete (the same path on every rank)."""
    return Path(save_dir) / STORE_DIR / f"{STAGING_PREFIX}{name}"


def begin_checkpoint(save_dir: str | os.PathLike[str], name: str) -> Path:
    """Create an empty staging directory for checkpoint `name` (any leftover from a crash is removed)."""
    staging = staging_path(save_dir, name)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk (cheap for files already flushed)."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(directory)


def commit_checkpoint(
    save_dir: str | os.PathLike[str],
    staging: Path,
    name: str,
    step: int,
    epoch: int,
    metrics: dict[str, float],
    trainer_state: dict[str, Any],
) -> Path:
    """Write trainer state and manifest into `staging`, fsync, then rename it to `save_dir/name`."""
    atomic_write_text(staging / TRAINER_STATE, json.dumps(trainer_state, indent=2, sort_keys=True))
    fsync_tree(staging)
    files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
    manifest = Manifest(
        name=name,
        step=step,
        epoch=epoch,
        metrics=metrics,
        files=files,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    atomic_write_text(staging / MANIFEST, json.dumps(asdict(manifest), indent=2, sort_keys=True))
    final = Path(save_dir) / name
    if final.exists():
        raise CheckpointError(f"{final} already exists; refusing to overwrite a saved checkpoint.")
    os.rename(staging, final)
    fsync_dir(final.parent)
    return final


def update_best_and_rotate(
    save_dir: str | os.PathLike[str],
    metric: str,
    mode: str,
    save_total_limit: int | None,
    protected: Iterable[Path] = (),
    keep_best: int | None = None,
) -> Path | None:
    """Point `best_checkpoint` at the best complete checkpoint, then delete the oldest beyond the limit.

    Never deletes the `keep_best` best (default 1), the newest, or anything in `protected` (e.g. the
    checkpoint a run resumed from). Runs after a new checkpoint is complete, so a crash here loses nothing.
    """
    root = Path(save_dir)
    checkpoints = complete_checkpoints(root)
    best = best_checkpoint(checkpoints, metric, mode)
    if best is not None:
        atomic_symlink(best[0].name, root / BEST_LINK)
    if save_total_limit is not None and len(checkpoints) > save_total_limit:
        keep = {p.resolve() for p in protected}
        keep.add(checkpoints[-1][0].resolve())
        keep.update(p.resolve() for p, _ in best_checkpoints(checkpoints, metric, mode, keep_best or 1))
        excess = len(checkpoints) - save_total_limit
        for path, _ in checkpoints:
            if excess <= 0:
                break
            if path.resolve() in keep:
                continue
            logger.info("Rotating out %s (save_total_limit=%d).", path.name, save_total_limit)
            remove_tree(path, root / STORE_DIR)
            excess -= 1
    write_index(root, metric, mode)
    return best[0] if best else None


def write_index(save_dir: Path, metric: str, mode: str) -> None:
    """`checkpoints/index.json`: a human-readable summary derived from the manifests (never relied upon)."""
    checkpoints = complete_checkpoints(save_dir)
    best = best_checkpoint(checkpoints, metric, mode)
    index = {
        "latest": checkpoints[-1][0].name if checkpoints else None,
        "best": best[0].name if best else None,
        "best_metric": metric,
        "best_mode": mode,
        "checkpoints": [
            {"name": m.name, "step": m.step, "epoch": m.epoch, "metrics": m.metrics} for _, m in checkpoints
        ],
    }
    atomic_write_text(save_dir / STORE_DIR / INDEX_FILE, json.dumps(index, indent=2))
