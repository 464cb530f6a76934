"""The training loss and learning rate, logged every `logging.interval` optimizer steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class StepLog:
    """Averages the training loss per optimizer step over the steps between two log lines.

    The sums stay on the device, so a step costs no host synchronisation; a log line reduces them across
    ranks (collective: every rank reaches the same steps).
    """

    def __init__(
        self,
        accelerator: Any,
        interval: int,
        total_steps: int,
        log: Callable[[dict[str, float], int], None],
        bar: Any,
    ) -> None:
        self.accelerator, self.interval, self.total_steps, self.log, self.bar = (
            accelerator,
            interval,
            total_steps,
            log,
            bar,
        )
        self._window = torch.zeros((), device=accelerator.device)  # one optimizer step's micro-batches
        self._sum = torch.zeros((), device=accelerator.device)  # per-step means since the last line
        self._count = 0

    def add(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss."""
        self._window += loss.detach()

    def step_done(self, step: int, micro_batches: int, epoch: int, scheduler: Any) -> None:
        """An optimizer step over `micro_batches` micro-batches finished; log if a line is due."""
        self._sum += self._window / micro_batches
        self._count += 1
        self._window.zero_()
        if step % self.interval and step != self.total_steps:
            return
        mean_loss = self.accelerator.reduce(self._sum / max(self._count, 1), "mean").item()
        lr = float(scheduler.get_last_lr()[0])
        self.log({"train_loss": mean_loss, "lr": lr, "epoch": epoch}, step)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        self._sum.zero_()
        self._count = 0
