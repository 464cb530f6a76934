"""Background checkpoint writes: the same files as `save_state`, no device use off the training thread,
a bounded wait for a writer that hangs, failures reported as CheckpointError."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from tsdia.config.schema import CheckpointConfig
from tsdia.errors import CheckpointError
from tsdia.experiment import checkpoints as store
from tsdia.training import checkpointer as checkpointer_module
from tsdia.training.checkpointer import Checkpointer


class Tied(torch.nn.Module):
    """Two layers and a tied output: shared storage is what safetensors needs cleaned."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, 8, bias=False)
        self.hidden = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 8, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return self.out(torch.tanh(self.hidden(self.embed(x))))


def make_run(seed: int = 0) -> tuple[Accelerator, Any, Any, Any]:
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def train(model: Any, optimizer: Any, scheduler: Any, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def checkpointer(accelerator: Accelerator, save_dir: Path, **config: Any) -> Checkpointer:
    save_dir.mkdir(exist_ok=True)
    cfg = CheckpointConfig(save_dir=str(save_dir), async_save=True, **config)
    return Checkpointer(accelerator, save_dir, cfg, deepspeed=False, resume_from=None)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal structure, bitwise-equal tensors and arrays."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.equal(b), where
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "shape"):  # numpy
        assert (a == b).all(), where
    else:
        assert a == b, where


def load_all(directory: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix == ".safetensors":
            out[path.name] = load_file(path)
        elif path.suffix in (".bin", ".pkl", ".pt"):
            out[path.name] = torch.load(path, weights_only=False)
    return out


def test_background_write_equals_save_state_and_resumes_bitwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained_on = threading.Event()
    real_write = checkpointer_module.write_snapshot

    def write_after_training_moved_on(files: Any, directory: Path) -> None:
        assert trained_on.wait(60)
        real_write(files, directory)

    monkeypatch.setattr(checkpointer_module, "write_snapshot", write_after_training_moved_on)
    accelerator, model, optimizer, scheduler = make_run()
    train(model, optimizer, scheduler, 3)
    rng = torch.get_rng_state()
    accelerator.save_state(str(tmp_path / "sync"), safe_serialization=True)
    torch.set_rng_state(rng)
    saver = checkpointer(accelerator, tmp_path / "exp")
    saver.save(model, 0, 3, {}, {"global_step": 3}, final=False)
    assert saver.pending is not None and saver.pending.background
    train(model, optimizer, scheduler, 2)  # the loop goes on, changing every tensor, before the thread writes
    trained_on.set()
    saver.commit_pending()
    written = tmp_path / "exp" / "checkpoint-epoch0-step3"
    assert store.read_manifest(written) is not None
    sync_files = load_all(tmp_path / "sync")
    assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == sorted(
        p.name for p in written.iterdir() if p.name not in (store.MANIFEST, store.TRAINER_STATE)
    )
    assert "out.weight" not in sync_files["model.safetensors"]  # the tied copy is dropped by both
    assert_same(sync_files, load_all(written))
    # A second save reuses the host buffers and still writes the state of its own step.
    held = saver.buffers.nbytes
    saver.save(model, 0, 5, {}, {"global_step": 5}, final=False)
    saver.commit_pending()
    step5 = load_all(tmp_path / "exp" / "checkpoint-epoch0-step5")["model.safetensors"]
    live = accelerator.get_state_dict(model)
    assert sorted(step5) == sorted(k for k in live if k != "out.weight")
    assert all(step5[k].equal(live[k]) for k in step5)
    assert saver.buffers.nbytes == held > 0
    # Resuming from either directory continues bitwise identically.
    finals = []
    for source in (tmp_path / "sync", written):
        accelerator.load_state(str(source))
        train(model, optimizer, scheduler, 2)
        finals.append({k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()})
    assert_same(finals[0], finals[1])


@pytest.fixture
def cuda_off_thread() -> Iterator[dict[str, list[str]]]:
    """torch.cuda as a GPU run sees it on the training thread; any torch.cuda call from another thread
    raises (CUDA must not be used off the training thread, and not at all after a fork)."""
    calls: dict[str, list[str]] = {"main": [], "other": []}
    fake_rng = [torch.arange(16, dtype=torch.uint8)]
    real: dict[str, Any] = {}
    replacements: dict[str, Any] = {"is_available": lambda: True, "get_rng_state_all": lambda: fake_rng}

    def guarded(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                calls["other"].append(name)
                raise RuntimeError(f"torch.cuda.{name} called from thread {threading.current_thread().name}")
            calls["main"].append(name)
            return replacements.get(name, fn)(*args, **kwargs)

        return call

    for name in dir(torch.cuda):
        fn = getattr(torch.cuda, name)
        if callable(fn) and not isinstance(fn, type) and not name.startswith("__"):
            real[name] = fn
            setattr(torch.cuda, name, guarded(name, fn))
    tensor_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = guarded("Tensor.cuda", tensor_cuda)  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        for name, fn in real.items():
            setattr(torch.cuda, name, fn)
        torch.Tensor.cuda = tensor_cuda  # type: ignore[method-assign]


def test_the_guard_catches_cuda_use_off_the_training_thread(cuda_off_thread: dict[str, list[str]]) -> None:
    errors: list[BaseException] = []

    def touch() -> None:
        try:
            torch.cuda.get_rng_state_all()
        except RuntimeError as err:
            errors.append(err)

    thread = threading.Thread(target=touch)
    thread.start()
    thread.join()
    assert errors and cuda_off_thread["other"] == ["get_rng_state_all"]


def test_writer_thread_never_touches_cuda(tmp_path: Path, cuda_off_thread: dict[str, list[str]]) -> None:
    accelerator, model, optimizer, scheduler = make_run()
    train(model, optimizer, scheduler, 2)
    saver = checkpointer(accelerator, tmp_path / "exp")
    saver.save(model, 0, 2, {}, {"global_step": 2}, final=False)
    saver.commit_pending()  # raises CheckpointError if the writer failed (as it does on any cuda call)
    assert cuda_off_thread["other"] == []
    assert "get_rng_state_all" in cuda_off_thread["main"]  # CUDA's RNG is read on the training thread
    states = torch.load(
        tmp_path / "exp" / "checkpoint-epoch0-step2" / "random_states_0.pkl", weights_only=False
    )
    assert states["torch_cuda_manual_seed"][0].equal(torch.arange(16, dtype=torch.uint8))


def test_a_hung_writer_is_a_bounded_wait_and_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accelerator, model, optimizer, scheduler = make_run()
    saver = checkpointer(accelerator, tmp_path / "exp", async_timeout_s=0.5)
    saver.save(model, 0, 1, {}, {"global_step": 1}, final=False)
    saver.commit_pending()
    release = threading.Event()
    monkeypatch.setattr(checkpointer_module, "write_snapshot", lambda files, directory: release.wait(60))
    try:
        train(model, optimizer, scheduler, 1)
        saver.save(model, 0, 2, {}, {"global_step": 2}, final=False)
        with pytest.raises(CheckpointError, match=r"did not finish within 0.5 s .*async_timeout_s"):
            saver.save(model, 0, 3, {}, {"global_step": 3}, final=False)
    finally:
        release.set()
    assert store.latest_checkpoint(tmp_path / "exp") == tmp_path / "exp" / "checkpoint-epoch0-step1"
    assert not list((tmp_path / "exp" / store.STORE_DIR).glob(".incomplete-*"))


def test_a_failed_background_write_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accelerator, model, _, _ = make_run()
    saver = checkpointer(accelerator, tmp_path / "exp")

    def full(files: Any, directory: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointer_module, "write_snapshot", full)
    saver.save(model, 0, 1, {}, {"global_step": 1}, final=False)
    with pytest.raises(CheckpointError, match="background writer failed: OSError: No space left"):
        saver.commit_pending()
    assert store.latest_checkpoint(tmp_path / "exp") is None
    assert not list((tmp_path / "exp" / store.STORE_DIR).glob(".incomplete-*"))


def test_deepspeed_runs_say_they_save_synchronously(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    accelerator, _, _, _ = make_run()
    cfg = CheckpointConfig(save_dir=str(tmp_path), async_save=True)
    with caplog.at_level("WARNING", logger="tsdia.training.checkpointer"):
        saver = Checkpointer(accelerator, tmp_path, cfg, deepspeed=True, resume_from=None)
    assert not saver.background
    assert "saves synchronously (DeepSpeed's save_checkpoint is collective)" in caplog.text
