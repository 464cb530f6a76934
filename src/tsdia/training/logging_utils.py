"""The logging entry points: `setup_file_logger` (the console tee), `init_trackers`, `save_wandb_info`."""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from tsdia.fileio import atomic_write_text
from tsdia.training.tee import ConsoleTee
from tsdia.training.trackers import (
    WANDB_INFO,
    TensorBoardTracker,
    Tracker,
    Trackers,
    WandbSettings,
    WandbTracker,
    resolve_wandb_mode,
)

QUIET_LOGGERS = ("accelerate.checkpointing", "accelerate.accelerator")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_file_logger(log_path: str | Path, progress_interval: float = 30.0) -> ConsoleTee:
    """Send everything that reaches stdout/stderr to the console and to `log_path` at once.

    Also routes Python `logging` (INFO and up) and `warnings` to stderr, so they land in the file too.
    Returns the tee; `close()` it at the end of the run.
    """
    tee = ConsoleTee(str(log_path), progress_interval=progress_interval)
    root = logging.getLogger()
    if not any(getattr(h, "_tsdia", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        handler._tsdia = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    for noisy in QUIET_LOGGERS:  # per-file INFO chatter on every checkpoint
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return tee


def init_trackers(
    *,
    save_dir: str,
    full_config: dict[str, Any],
    config_yaml: str,
    tensorboard: bool,
    wandb: WandbSettings | None,
    start_step: int,
    resuming: bool,
    wandb_run_id: str | None,
) -> tuple[Trackers, WandbTracker | None]:
    """Start the enabled trackers with the whole nested config (model, dataset, training, ...)."""
    trackers: list[Tracker] = []
    wandb_tracker = None
    if tensorboard:
        trackers.append(
            TensorBoardTracker(
                str(Path(save_dir) / "tensorboard"), full_config, config_yaml, start_step, resuming
            )
        )
    if wandb is not None:
        wandb_tracker = WandbTracker(wandb, full_config, wandb_run_id)
        trackers.append(wandb_tracker)
    return Trackers(trackers), wandb_tracker


def save_wandb_info(tracker: WandbTracker, save_dir: str | Path) -> dict[str, Any]:
    """Write `<save_dir>/wandb_info.json`: run id, name, URL, project, entity, timestamp (+ offline sync)."""
    run = tracker.run
    info: dict[str, Any] = {
        "run_id": run.id,
        "run_name": run.name,
        "run_url": run.url if tracker.mode == "online" else None,
        "project": run.project,
        "entity": run.entity or None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "mode": tracker.mode,
    }
    if tracker.mode == "offline":
        info["offline_run_dir"] = tracker.offline_dir()
        info["sync_command"] = tracker.sync_command()
    lost = _read_wandb_info(save_dir).get("lost")
    if lost:  # what earlier attempts of this run lost stays on record
        info["lost"] = lost
    atomic_write_text(Path(save_dir) / WANDB_INFO, json.dumps(info, indent=2))
    return info


def reserve_wandb_run(save_dir: str | Path, settings: WandbSettings) -> str:
    """Fix this experiment's WandB run id in `wandb_info.json` before WandB starts; returns it.

    WandB starts in the background while training begins: a stop that came before it had created the
    run would otherwise leave no id behind, and the requeued attempt would open a second run. The id
    an earlier attempt recorded is kept; `save_wandb_info` completes the file once the run is up.
    """
    info = _read_wandb_info(save_dir)
    run_id = info.get("run_id")
    if isinstance(run_id, str) and run_id:
        return run_id
    run_id = "".join(secrets.choice(_RUN_ID_ALPHABET) for _ in range(8))  # WandB's own id shape
    info.update(
        run_id=run_id,
        run_name=settings.run_name,
        run_url=None,
        project=settings.project,
        entity=settings.entity,
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
        mode=resolve_wandb_mode(settings.mode),
    )
    atomic_write_text(Path(save_dir) / WANDB_INFO, json.dumps(info, indent=2))
    return run_id


_RUN_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def record_wandb_loss(save_dir: str | Path, attempt: int, since_step: int, error: BaseException) -> None:
    """Add to `wandb_info.json` that this attempt's WandB run misses every step from `since_step` on."""
    info = _read_wandb_info(save_dir)
    info.setdefault("lost", []).append(
        {"attempt": attempt, "since_step": since_step, "error": f"{type(error).__name__}: {error}"}
    )
    atomic_write_text(Path(save_dir) / WANDB_INFO, json.dumps(info, indent=2))


def _read_wandb_info(save_dir: str | Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(save_dir) / WANDB_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
