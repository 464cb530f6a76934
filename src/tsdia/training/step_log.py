"""The training loss and learning rate, logged every `logging.interval` optimizer steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class StepLog:
    """Averages the training loss per optimizer step over the steps between two log lines.

    The losses stay on the device, so a step costs no host synchronisation and no kernel; a log line
    averages them and reduces the mean across ranks (collective: every rank reaches the same steps).
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
        # The detached micro-batch losses since the last line, each with its weight 1 / (micro-batches in
        # its optimizer step): no tensor arithmetic per step (each op is a kernel launch on a GPU).
        self._losses: list[torch.Tensor] = []
        self._weights: list[float] = []
        self._window = 0  # micro-batches of the optimizer step in progress
        self._count = 0  # optimizer steps since the last line

    def add(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss."""
        self._losses.append(loss.detach())
        self._window += 1

    def step_done(self, step: int, micro_batches: int, epoch: int, scheduler: Any) -> None:
        """An optimizer step over `micro_batches` micro-batches finished; log if a line is due."""
        self._weights.extend([1.0 / micro_batches] * self._window)
        self._window = 0
        self._count += 1
        if step % self.interval and step != self.total_steps:
            return
        losses = torch.stack(self._losses).float()
        weights = torch.tensor(self._weights, device=losses.device)
        step_mean = (losses * weights).sum() / max(self._count, 1)
        mean_loss = self.accelerator.reduce(step_mean, "mean").item()
        lr = float(scheduler.get_last_lr()[0])
        self.log({"train_loss": mean_loss, "lr": lr, "epoch": epoch}, step)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        self._losses.clear()
        self._weights.clear()
        self._count = 0
