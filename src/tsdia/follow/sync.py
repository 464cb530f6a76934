"""`tsdia sync DIR ...`: upload the offline WandB runs of experiments (every attempt, in order)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from tsdia.errors import TsdiaError
from tsdia.follow.scan import unsynced_wandb_runs


class SyncError(TsdiaError):
    """The runs cannot be uploaded from here (no login, no network); nothing was changed."""


def sync(directories: list[Path], timeout_s: float = 5.0) -> list[Path]:
    """Upload every unsynced offline run of `directories`; returns the runs uploaded.

    Checks first that a WandB login exists and that the server answers, so that without either nothing
    is touched and the user gets one line saying why.
    """
    runs = [run for d in directories for run in unsynced_wandb_runs(d)]
    if not runs:
        return []
    from tsdia.training.trackers import has_wandb_credentials

    if not has_wandb_credentials():
        raise SyncError(
            f"{len(runs)} offline run(s) to upload, but no WandB login here: run `wandb login` (or set "
            "WANDB_API_KEY) on a node with internet access, then `tsdia sync` again. Nothing was changed."
        )
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    url = urlparse(base)
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise SyncError(
            f"cannot reach {base} ({err.strerror or err}): no network from this node. Run `tsdia sync` on a "
            "login node with internet access. Nothing was changed."
        ) from None
    done = subprocess.run([sys.executable, "-m", "wandb", "sync", *map(str, runs)], check=False)
    if done.returncode != 0:
        raise SyncError(
            f"wandb sync failed (exit {done.returncode}); the runs not marked synced stay unsynced."
        )
    return runs
