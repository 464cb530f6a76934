"""A model that talks through every channel a log must capture, then crashes at a chosen step."""

from __future__ import annotations

import logging
import subprocess
import warnings

from tsdia.examples.tsvad import TargetSpeakerVAD


class CrashingModel(TargetSpeakerVAD):
    resume_neutral_kwargs = ("crash_at_call",)  # test hooks: a resume may drop them (see config_change)

    def __init__(self, crash_at_call: int = 3, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.crash_at_call = crash_at_call
        self.calls = 0

    def forward(self, batch):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 1:
            print("plugin: hello from print")
            warnings.warn("plugin: a warning", UserWarning, stacklevel=1)
            logging.getLogger("plugin").info("plugin: a logging record")
            subprocess.run(
                ["sh", "-c", "echo plugin: from a child process; echo plugin: child stderr >&2"], check=True
            )
        if self.calls == self.crash_at_call:
            raise RuntimeError(f"boom at call {self.calls}")
        return super().forward(batch)


class RankReportingModel(TargetSpeakerVAD):
    """Prints a checksum of its parameters on every validation, in each rank's own log."""

    resume_neutral_kwargs = ("crash_on_rank", "crash_at_call")

    def __init__(self, crash_on_rank: int = -1, crash_at_call: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.crash_on_rank = crash_on_rank
        self.crash_at_call = crash_at_call
        self.calls = 0

    def forward(self, batch):  # type: ignore[no-untyped-def]
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        self.calls += 1
        if rank == self.crash_on_rank and self.calls == self.crash_at_call:
            raise RuntimeError(f"boom on rank {rank}")
        out = super().forward(batch)
        if not self.training:
            checksum = sum(float(p.double().sum()) for p in self.parameters())
            print(f"PARAM_CHECKSUM rank={rank} value={checksum!r}", flush=True)
        return out


class SelfSignalingModel(TargetSpeakerVAD):
    """Sends its own process a signal at a chosen training call: a deterministic 'preemption'."""

    resume_neutral_kwargs = ("signal_at_call", "signal_rank", "signal_name")

    def __init__(
        self, signal_at_call: int = 0, signal_rank: int = 0, signal_name: str = "SIGUSR2", **kwargs: object
    ):
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.signal_at_call, self.signal_rank, self.signal_name = signal_at_call, signal_rank, signal_name
        self.calls = 0

    def forward(self, batch):  # type: ignore[no-untyped-def]
        import os
        import signal

        import torch.distributed as dist

        if self.training:
            self.calls += 1
            rank = dist.get_rank() if dist.is_initialized() else 0
            if self.calls == self.signal_at_call and rank == self.signal_rank:
                os.kill(os.getpid(), signal.Signals[self.signal_name])
        return super().forward(batch)


class SlowModel(TargetSpeakerVAD):
    """Takes `step_seconds` per training batch, so a job lives long enough to be signalled mid-run."""

    resume_neutral_kwargs: tuple[str, ...] = ("step_seconds", "crash_at_call")

    def __init__(self, step_seconds: float = 0.2, crash_at_call: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.step_seconds = step_seconds
        self.crash_at_call = crash_at_call
        self.calls = 0

    def forward(self, batch):  # type: ignore[no-untyped-def]
        import time

        if self.training:
            self.calls += 1
            if self.calls == self.crash_at_call:
                raise RuntimeError("crash inside the job")
            time.sleep(self.step_seconds)
        return super().forward(batch)


class HangingModel(SlowModel):
    """Blocks forever in its forward on rank `hang_rank` at training call `hang_at_call`, once: the file
    `once_marker` records that it hung, so the requeued attempt trains through (a transient hang)."""

    resume_neutral_kwargs = (*SlowModel.resume_neutral_kwargs, "hang_rank", "hang_at_call", "once_marker")

    def __init__(
        self, hang_rank: int = 1, hang_at_call: int = 0, once_marker: str = "", **kwargs: object
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.hang_rank, self.hang_at_call, self.once_marker = hang_rank, hang_at_call, once_marker
        self.train_calls = 0

    def forward(self, batch):  # type: ignore[no-untyped-def]
        import os
        import threading

        import torch.distributed as dist

        if self.training:
            self.train_calls += 1
            rank = dist.get_rank() if dist.is_initialized() else 0
            if self.train_calls == 1:
                print(f"plugin: TSDIA_PROBE={os.environ.get('TSDIA_PROBE')}", flush=True)
            due = rank == self.hang_rank and self.train_calls == self.hang_at_call
            if due and not (self.once_marker and os.path.exists(self.once_marker)):
                if self.once_marker:
                    with open(self.once_marker, "w") as out:
                        out.write(str(os.getpid()))
                print(f"plugin: rank {rank} hangs at training call {self.train_calls}", flush=True)
                threading.Event().wait()  # forever
        return super().forward(batch)
