"""The trackers, off the training thread: started in a thread of their own, which then delivers every record.

`wandb.init` (its service process, the run files) takes most of a resumed attempt's start-up. Here it
runs in a background thread that the trainer releases with `begin()` once the attempt's first optimizer
step is done: importing wandb and TensorBoard is Python work that would otherwise compete for the GIL
with the model's preparation and first step. `log()` only queues the record (a few microseconds); the
same thread hands the records to the trackers, in order, once they are ready and from then on:
`wandb.log` and TensorBoard's scalars cost ~0.5 ms each per log line here, which on a small GPU step
is a sizeable share of the step. `log()` and `finish()` also release the start; `finish()` waits
(bounded) until every queued record is delivered, so nothing is lost. A start that fails surfaces at
the next `log()` on the training thread, as it would have at start-up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tsdia.training.trackers import WANDB_INIT_TIMEOUT_S, Trackers

logger = logging.getLogger(__name__)

FINISH_WAIT_S = WANDB_INIT_TIMEOUT_S + 30  # wandb gives up on its own after its init timeout


class BackgroundTrackers(Trackers):
    """A `Trackers` whose trackers start and receive their records in a thread of their own."""

    def __init__(self, start: Callable[[], Trackers], configured: bool) -> None:
        super().__init__()
        self._configured = configured  # some tracker is enabled (true before it has started)
        self._queue: list[tuple[dict[str, float], int]] = []
        self._pending = (
            threading.Condition()
        )  # guards the fields below; notified: records queued, or finishing
        self._finishing = False
        self._started: Trackers | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._go = threading.Event()
        # Named for its phase (as stack dumps show it): starting, then delivering as "tsdia-trackers".
        self._thread = threading.Thread(
            target=self._run, args=(start,), name="tsdia-trackers-starting", daemon=True
        )
        self._thread.start()

    def begin(self) -> None:
        """Let the trackers start now (idempotent)."""
        self._go.set()

    def _run(self, start: Callable[[], Trackers]) -> None:
        self._go.wait()
        try:
            started = start()
        except BaseException as err:  # handed to the training thread at its next log()
            with self._pending:
                self._error = err
                self._queue.clear()  # nothing to deliver them to
                self._ready.set()
            return
        self._started = started
        self.trackers = started.trackers
        threading.current_thread().name = "tsdia-trackers"
        self._ready.set()
        while True:
            with self._pending:
                while not self._queue and not self._finishing:
                    self._pending.wait()
                if not self._queue:  # finishing, and everything is delivered
                    return
                records, self._queue = self._queue, []
            for metrics, step in records:  # in order; a failing tracker is dropped inside (see Trackers)
                started.log(metrics, step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._go.set()
        with self._pending:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._ready.is_set() and self._started is None:  # the start failed: no tracker to take it
                return
            self._queue.append((dict(metrics), step))
            self._pending.notify_all()

    def wait_started(self, timeout: float | None = None) -> bool:
        """Let them start and block until they have (or have failed); False on timeout."""
        self._go.set()
        return self._ready.wait(timeout)

    def finish(self) -> None:
        self._go.set()
        with self._pending:
            self._finishing = True
            self._pending.notify_all()
        self._thread.join(FINISH_WAIT_S)
        if self._thread.is_alive():
            logger.warning(
                "The trackers did not start or take their records within %d s; %d queued record(s) were "
                "not logged.",
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
