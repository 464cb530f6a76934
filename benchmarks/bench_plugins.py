"""Models the benchmarks load into every variant (tsdia via `model.target=bench_plugins:...`, PYTHONPATH).

They time from *inside* the training loop, so start-up (imports, tracker init, first-step warm-up) and
shut-down (final validation and checkpoint, tracker close) never enter a steady-state figure, and every
variant (tsdia, a bare Accelerate loop, Lightning) is timed by the same code at the same place.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from typing import Any

import torch
from baton import BatonClient

from tsdia.examples.tsvad import TargetSpeakerVAD


def pin_threads() -> int:
    """`torch.set_num_threads($BENCH_THREADS)` (unset: leave torch's default); returns the number in use."""
    threads = os.environ.get("BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
        with contextlib.suppress(RuntimeError):  # settable only before the first inter-op work
            torch.set_num_interop_threads(1)
    return torch.get_num_threads()


class StepWindowTimer:
    """Records the wall time between the starts of two training forward calls (mixed into a model).

    `perf_counter()` is read at the start of the first training forward call after `warmup` calls (step
    `warmup` has fully finished: its backward, optimizer step, logging and any checkpoint; with
    `$BENCH_WAIT_FOR_WANDB`, the first one once WandB has started) and `steps` calls later. The
    difference covers exactly `steps` whole optimizer steps (gradient accumulation 1), including data
    loading, logging and checkpoints inside that window. The CPU seconds this process and its children
    (wandb's service) spent in the same window are recorded too: a figure that other load on a shared
    machine disturbs far less than wall time. The result goes to `$BENCH_TIMING_FILE` as JSON.
    Validation calls (`self.training` false) are not counted.

    With `$BENCH_BATON` set, the model times blocks of steps instead, taking turns with the other
    variants (`baton.BatonClient`); the parent collects the times.
    """

    training: bool

    def start_timer(self, timing_warmup: int, timing_steps: int) -> None:
        self.timing_warmup = timing_warmup
        self.timing_steps = timing_steps
        self.calls = 0
        self.started: float | None = None
        self.start_call = 0
        self.cpu_started = (0.0, 0.0)
        self.thread_started = 0.0
        self.threads = pin_threads()
        self.baton = BatonClient.from_env(self.threads)

    def tick(self, batch: dict[str, torch.Tensor]) -> None:
        """Call at the start of forward."""
        if not self.training:
            return
        self.calls += 1
        if self.baton is not None:
            self.baton.tick(
                lambda: self.calls > self.timing_warmup and _trackers_started(), lambda: _sync(batch)
            )
            return
        if self.started is None and self.calls > self.timing_warmup and _trackers_started():
            _sync(batch)
            self.started = time.perf_counter()
            self.cpu_started = tree_cpu_seconds()
            self.thread_started = time.thread_time()
            self.start_call = self.calls
        elif self.started is not None and self.calls == self.start_call + self.timing_steps:
            _sync(batch)
            elapsed = time.perf_counter() - self.started
            own, children = tree_cpu_seconds()
            _write_timing(
                {
                    "window_s": elapsed,
                    "cpu_s": own + children - sum(self.cpu_started),
                    "cpu_main_s": own - self.cpu_started[0],
                    "cpu_training_thread_s": time.thread_time() - self.thread_started,
                    "cpu_helpers_s": children - self.cpu_started[1],
                    "steps": self.timing_steps,
                    "threads": torch.get_num_threads(),
                    **_device_facts(),
                }
            )


class TimedTSVAD(StepWindowTimer, TargetSpeakerVAD):
    """The example model (TargetSpeakerVAD), timed over a window of steps (see `StepWindowTimer`)."""

    def __init__(self, timing_warmup: int = 10, timing_steps: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_timer(timing_warmup, timing_steps)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.tick(batch)
        return super().forward(batch)


class TimedMLP(StepWindowTimer, torch.nn.Module):
    """A 3-layer MLP regressor whose step costs ~1-2 ms on one CPU thread: the loop's own costs show."""

    def __init__(
        self,
        features: int = 64,
        hidden: int = 256,
        outputs: int = 8,
        timing_warmup: int = 10,
        timing_steps: int = 100,
    ) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(features, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, outputs),
        )
        self.start_timer(timing_warmup, timing_steps)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.tick(batch)
        loss = torch.nn.functional.mse_loss(self.net(batch["features"]), batch["targets"])
        return {"loss": loss}


class TensorSamples(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Precomputed tensors in memory: loading a sample is two row views (no synthesis, no I/O)."""

    def __init__(self, size: int, features: int, outputs: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.randn(size, features, generator=generator)
        self.targets = torch.randn(size, outputs, generator=generator)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[index], "targets": self.targets[index]}


def tensor_datasets(
    num_train: int = 4096, features: int = 64, outputs: int = 8, seed: int = 0
) -> tuple[TensorSamples, None]:
    """`dataset.target` for TimedMLP: a training set of precomputed tensors, no validation set."""
    return TensorSamples(num_train, features, outputs, seed), None


def _trackers_started() -> bool:
    """With `$BENCH_WAIT_FOR_WANDB` set: whether WandB (and tsdia's tracker start-up) has finished starting.

    tsdia starts its trackers in a background thread after the first step; their start-up (importing
    wandb, `wandb.init`: seconds of CPU) is start-up, not steady state, and must not fall inside the
    window (the other variants start WandB before their first step).
    """
    if not os.environ.get("BENCH_WAIT_FOR_WANDB"):
        return True
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return False
    # tsdia's tracker thread goes on after wandb.init (TensorBoard, the run's records) before it is renamed
    # from "tsdia-trackers-starting" to "tsdia-trackers" (it then delivers the records).
    return not any(thread.name == "tsdia-trackers-starting" for thread in threading.enumerate())


def _sync(batch: dict[str, torch.Tensor]) -> None:
    """On a GPU, wait for the queued kernels, so a window boundary is where the device really is."""
    device = next(iter(batch.values())).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {}
    if torch.cuda.is_available():
        facts["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        facts["device_name"] = torch.cuda.get_device_name()
    try:
        from accelerate.state import PartialState

        state = PartialState()
        facts["distributed_type"] = str(state.distributed_type).split(".")[-1]
        facts["world_size"] = state.num_processes
    except Exception:  # accelerate not initialised (cannot happen in the benchmark's variants)
        pass
    return facts


def tree_cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of (this process, its live descendants such as wandb's service)."""
    try:
        import psutil
    except ImportError:  # only the CPU benchmark reports CPU time; psutil comes with wandb there
        return float("nan"), float("nan")
    me = psutil.Process()
    own = sum(me.cpu_times()[:2])
    children = 0.0
    for proc in me.children(recursive=True):  # wandb-core (and its wandb-symon) are children
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            children += times.user + times.system
    return own, children


class MarkerTSVAD(TargetSpeakerVAD):
    """TargetSpeakerVAD that writes `time.time()` to `$BENCH_TIMING_FILE` at training forward call `mark_at_call`.

    Call 1 of a resumed run is the forward of its first resumed optimizer step (start-up is over); call
    k + 1 is the start of step k + 1, where a benchmark can send a signal knowing which step is in flight.
    """

    def __init__(self, mark_at_call: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mark_at_call = mark_at_call
        self.calls = 0
        self.call_times: list[float] = []
        pin_threads()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.training:
            self.calls += 1
            now = time.time()
            self.call_times = [*self.call_times[-2:], now]
            if self.calls == self.mark_at_call:
                mark: dict[str, Any] = {"marked_at_epoch_s": now, "call": self.calls}
                if len(self.call_times) == 3:  # the step before last: a plain one (no checkpoint after it)
                    mark["step_s"] = self.call_times[1] - self.call_times[0]
                _write_timing(mark)
        return super().forward(batch)


def _write_timing(data: dict[str, Any]) -> None:
    path = os.environ.get("BENCH_TIMING_FILE")
    if path and os.environ.get("RANK", "0") == "0":  # one writer in a multi-process run
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)  # a poller never sees half a file
