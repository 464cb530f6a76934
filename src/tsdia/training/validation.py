"""Validation: every scalar the model returns, averaged over the validation set and across ranks."""

from __future__ import annotations

from typing import Any

import torch


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
