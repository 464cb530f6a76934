"""Start the trackers off the critical path: in a thread, while the model prepares and trains its first steps.

`wandb.init` (its service process, the run files) takes most of a resumed attempt's start-up. Here it
runs in a background thread that the trainer releases with `begin()` once the attempt's first optimizer
step is done: importing wandb and TensorBoard is Python work that would otherwise compete for the GIL
with the model's preparation and first step. `log()` calls made before the trackers are ready are
queued in order and handed over, in that order, the moment they are; `log()` and `finish()` also
release the start, and `finish()` waits for it (bounded) so nothing queued is lost. A start that fails
surfaces at the next `log()` on the training thread, as it would have at start-up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tsdia.training.trackers import WANDB_INIT_TIMEOUT_S, Trackers

logger = logging.getLogger(__name__)

FINISH_WAIT_S = WANDB_INIT_TIMEOUT_S + 30  # wandb gives up on its own after its init timeout


class BackgroundTrackers(Trackers):
    """A `Trackers` whose trackers are still starting; behaves like the real one once they are."""

    def __init__(self, start: Callable[[], Trackers], configured: bool) -> None:
        super().__init__()
        self._configured = configured  # some tracker is enabled (true before it has started)
        self._lock = threading.Lock()
        self._queue: list[tuple[dict[str, float], int]] = []
        self._started: Trackers | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._go = threading.Event()
        self._thread = threading.Thread(target=self._start, args=(start,), name="tsdia-trackers", daemon=True)
        self._thread.start()

    def begin(self) -> None:
        """Let the trackers start now (idempotent)."""
        self._go.set()

    def _start(self, start: Callable[[], Trackers]) -> None:
        self._go.wait()
        try:
            started = start()
        except BaseException as err:  # handed to the training thread at its next log()
            with self._lock:
                self._error = err
                self._ready.set()
            return
        with self._lock:  # a log() racing with the hand-over waits here, so the order is kept
            for metrics, step in self._queue:
                started.log(metrics, step)
            self._queue.clear()
            self._started = started
            self.trackers = started.trackers
            self._ready.set()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._go.set()
        with self._lock:
            if not self._ready.is_set():
                self._queue.append((dict(metrics), step))
                return
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            started = self._started
        if started is not None:
            started.log(metrics, step)

    def wait_started(self, timeout: float | None = None) -> bool:
        """Let them start and block until they have (or have failed); False on timeout."""
        self._go.set()
        return self._ready.wait(timeout)

    def finish(self) -> None:
        self._go.set()
        if not self._ready.wait(FINISH_WAIT_S):
            logger.warning(
                "The trackers did not start within %d s; %d queued record(s) were not logged.",
                FINISH_WAIT_S,
                len(self._queue),
            )
            return
        if self._error is not None:
            logger.warning("The trackers could not start: %s", self._error)
            return
        if self._started is not None:
            self._started.finish()

    def __bool__(self) -> bool:
        return self._configured
