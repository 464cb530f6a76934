"""Validation: every scalar the model returns, averaged over the validation set and across ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tsdia.training.ema import EMA


def validate(
    model: Any, val_dl: Any, accelerator: Any, max_steps: int | None, ema: EMA | None, validate_on: str
) -> dict[str, float]:
    """The raw weights' metrics (`val_*`) and/or, with an EMA, the EMA weights' (`val_ema_*`)."""
    metrics: dict[str, float] = {}
    if ema is None or validate_on in ("raw", "both"):
        metrics.update(validation_metrics(model, val_dl, accelerator, max_steps))
    if ema is not None and validate_on in ("ema", "both"):
        with ema.swapped_in():
            metrics.update(validation_metrics(model, val_dl, accelerator, max_steps, prefix="val_ema_"))
    return metrics


@torch.no_grad()
def validation_metrics(
    model: Any, val_dl: Any, accelerator: Any, max_steps: int | None, prefix: str = "val_"
) -> dict[str, float]:
    """`{prefix + name: mean}` for each scalar in the model's output (a dict, or the loss tensor itself).

    Collective: every rank must call it. The model is put in eval mode and back in train mode.
    """
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    try:
        for i, batch in enumerate(val_dl):
            if max_steps is not None and i >= max_steps:
                break
            output = model(batch)
            values = output if isinstance(output, dict) else {"loss": output}
            for name, value in values.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    total = sums.get(name, torch.zeros((), device=accelerator.device))
                    sums[name] = total + value.detach().float()
            batches += 1
    finally:
        model.train()
    return {
        f"{prefix}{name}": accelerator.reduce(total / max(batches, 1), "mean").item()
        for name, total in sorted(sums.items())
    }
