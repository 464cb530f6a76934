"""The lock rank 0 holds on an experiment directory for the whole run."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from tsdia.errors import ExperimentInUseError
from tsdia.experiment.layout import LOCK_FILE


class ExperimentLock:
    """An exclusive `flock` on `<save_dir>/.tsdia.lock`.

    Stops a second live run (a stray `resume: latest`, a duplicated job) from writing into the same
    directory. The kernel releases it when the process dies, so a crash never leaves it stale.
    """

    def __init__(self, save_dir: str | os.PathLike[str]) -> None:
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
