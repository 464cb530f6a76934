"""Per-step costs the training loop must not pay."""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import pytest
import torch
from accelerate import Accelerator

from tsdia.training.distributed import cache_per_step_probes


def test_optimizer_steps_ask_accelerate_s_per_step_questions_only_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On every optimizer step Accelerate asks importlib whether lomo_optim is installed (a sys.path
    search, ~100 us) and inspects `zero_grad`'s signature (~35 us); tsdia answers both from a cache, so
    after the first step a step makes no importlib lookup and computes no signature."""
    cache_per_step_probes()
    cache_per_step_probes()  # idempotent: the trainer builds an Accelerator per attempt
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))

    def step() -> None:
        accelerator.backward(model(torch.randn(2, 4)).sum())
        optimizer.step()
        optimizer.zero_grad()

    step()  # the first step fills the caches
    lookups: list[str] = []
    real_find_spec, real_signature = importlib.util.find_spec, inspect.signature

    def counting_find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        lookups.append(name)
        return real_find_spec(name, *args, **kwargs)

    def counting_signature(obj: Any, *args: Any, **kwargs: Any) -> Any:
        lookups.append(f"signature of {obj}")
        return real_signature(obj, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", counting_find_spec)
    monkeypatch.setattr(inspect, "signature", counting_signature)
    for _ in range(3):
        step()
    assert lookups == []
    assert all(parameter.grad is None for parameter in model.parameters())  # zero_grad still sets to None


class _Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[int, dict[str, float]]] = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.lines.append((step, metrics))


class _Bar:
    def set_postfix(self, **kwargs: Any) -> None:
        pass


def test_a_step_that_does_not_log_runs_no_tensor_op_and_the_line_is_the_mean_of_step_means() -> None:
    """On a GPU every tensor op is a kernel launch: the loss bookkeeping of a step that does not log
    only keeps a detached reference; the log line averages the per-step means (micro-batches weighted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tsdia.training.step_log import StepLog

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    accelerator = Accelerator(cpu=True)
    recorder = _Recorder()
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=0.5), lambda s: 1.0)
    log = StepLog(accelerator, interval=2, total_steps=10, log=recorder, bar=_Bar())
    losses = [torch.tensor(v) for v in (1.0, 3.0, 10.0, 20.0)]  # step 1: (1, 3); step 2: (10, 20)
    counter = CountOps()
    with counter:
        log.add(losses[0])
        log.add(losses[1])
        log.step_done(1, micro_batches=2, epoch=0, scheduler=scheduler)
    assert set(counter.ops) <= {"aten.detach.default"}, counter.ops
    log.add(losses[2])
    log.add(losses[3])
    log.step_done(2, micro_batches=2, epoch=0, scheduler=scheduler)
    ((step, metrics),) = recorder.lines
    assert step == 2 and metrics["train_loss"] == pytest.approx((2.0 + 15.0) / 2)
    assert metrics["lr"] == 0.5
