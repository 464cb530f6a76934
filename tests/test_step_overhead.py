"""Per-step costs the training loop must not pay."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from accelerate import Accelerator

from tsdia.training.distributed import cache_package_probes


def test_optimizer_steps_search_no_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accelerate asks importlib whether lomo_optim is installed on every optimizer step (a sys.path
    search, ~100 us); tsdia answers from a cache, so a step makes no importlib lookup at all."""
    cache_package_probes()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    lookups: list[str] = []
    real = importlib.util.find_spec

    def counting(name: str, *args: Any, **kwargs: Any) -> Any:
        lookups.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", counting)
    for _ in range(3):
        accelerator.backward(model(torch.randn(2, 4)).sum())
        optimizer.step()
        optimizer.zero_grad()
    assert lookups == []
