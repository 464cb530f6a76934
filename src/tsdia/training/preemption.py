"""Stopping on a signal without saving inside the handler: flag -> agreed step -> collective save.

The handler only records the signal. The trainer asks `should_stop()` after every optimizer step; every
`check_interval` steps the ranks all-reduce their flags, so all of them stop after the same step (a
single process checks every step for free). What happens after the collective save (the attempt's
record, the requeue) is `tsdia.training.after_stop`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

_early_signal: int | None = None  # a stop signal that arrived before the trainer was ready


def catch_stop_signals_early(signals: Sequence[str]) -> None:
    """Flag stop signals from process start on (the heavy imports take seconds); the trainer picks it up."""

    def remember(signum: int, frame: FrameType | None) -> None:
        global _early_signal
        _early_signal = _early_signal or signum

    for name in signals:
        signal.signal(signal.Signals[name], remember)


def ignore_stop_signals(signals: Sequence[str]) -> None:
    """After the work is saved: a late signal must not turn a finished run into a killed one."""
    for name in signals:
        signal.signal(signal.Signals[name], signal.SIG_IGN)


INTERRUPT_NOTICE = (
    "\nCtrl-C: saving a checkpoint after the current step, then stopping. Press Ctrl-C again to abort "
    "without saving (the newest complete checkpoint stays valid).\n"
)


def _host_group() -> Any:
    """A gloo group over every rank when the default backend does not work on host tensors, else None."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


class PreemptionWatcher:
    """Installs flag-only signal handlers; `should_stop()` makes every rank agree on when to stop.

    SIGINT (Ctrl-C, `scancel --signal=INT`) is a stop too: the first one is flagged like the others and
    announced at once on the console; a second one raises `KeyboardInterrupt` (abort, no stop checkpoint).
    """

    def __init__(
        self,
        signals: Sequence[str],
        check_interval: int,
        distributed: bool,
        announce: bool = True,
        on_signal: Callable[[str], None] | None = None,
    ) -> None:
        names = list(dict.fromkeys([*signals, "SIGINT"]))
        self.signal_numbers = [signal.Signals[name] for name in names]
        self.announce = announce  # print the Ctrl-C notice (one process per node)
        self.on_signal = (
            on_signal  # called with the first signal's name, and a later SIGTERM's (returns at once)
        )
        self._term_seen = False
        self.interrupts = 0
        self.check_interval = check_interval
        self.distributed = distributed
        self.received: int | None = _early_signal  # signal number, set by the handler
        self.received_at: float | None = None
        self.stop_signal: str | None = None  # the agreed stop's signal name, once decided
        self._previous: dict[int, Any] = {}
        self._group: Any = None  # the process group the flags are all-reduced over (None: the default)

    def install(self) -> None:
        """Install the handlers (and, distributed under NCCL, the CPU group for agreeing: collective)."""
        if self.distributed:
            self._group = _host_group()
        for number in self.signal_numbers:
            self._previous[number] = signal.signal(number, self._handle)
        if self.received is not None and self.on_signal is not None:
            self.on_signal(signal.Signals(self.received).name)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Nothing else here: saving inside a handler can deadlock (locks held by the interrupted code).
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt  # the second Ctrl-C: abort now
            if self.announce:
                os.write(2, INTERRUPT_NOTICE.encode())  # not print(): a handler may interrupt a print
        if self.received is None:
            self.received, self.received_at = signum, time.time()
            if self.on_signal is not None:
                self.on_signal(signal.Signals(signum).name)
        elif signum == signal.SIGTERM and self.received != signum and not self._term_seen:
            # SIGTERM during a stop that began with the lead signal: maybe the limit itself (ask again).
            self._term_seen = True
            if self.on_signal is not None:
                self.on_signal("SIGTERM")

    def should_stop(self, step: int) -> bool:
        """True on every rank at the same step once any rank has received a signal."""
        if self.stop_signal is not None:
            return True
        if not self.distributed:
            local = self.received
        elif step % self.check_interval == 0:
            local = self._agree()
        else:
            return False
        if local:
            self.stop_signal = signal.Signals(local).name
            logger.warning(
                "Received %s: saving a checkpoint at step %d and stopping.", self.stop_signal, step
            )
            return True
        return False

    def _agree(self) -> int | None:
        """The highest signal number any rank received (0: none), agreed over host memory only.

        A flag on the GPU would cost a host-device sync (`.item()` waits for every queued kernel) at each
        agreement; under NCCL the flags go over a gloo group on the CPU instead, created once by
        `install()` on every rank.
        """
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.received or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag[0]) or None
