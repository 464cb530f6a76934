"""Saving and loading through Accelerate (and DeepSpeed) with tsdia's atomic checkpoint protocol.

Every rank writes its part into the staging directory, all ranks meet, then rank 0 writes the manifest
and renames the directory into place, updates `best_checkpoint` and rotates. A write that fails (disk
full, quota) raises `CheckpointError` on every rank and leaves the earlier checkpoints as they were.

With `checkpoint.async_save` the training loop only waits while the state is copied into reused host
buffers (`host_snapshot`); a background thread serialises those host tensors into the staging directory
and fsyncs them, touching no device. At most one write is in flight; it is committed (manifest, rename,
best, rotation) at the next save or at the end, after a bounded wait for the writer
(`checkpoint.async_timeout_s`): a writer that hangs is a `CheckpointError`, not a hung trainer.
DeepSpeed engines save synchronously (their `save_checkpoint` is collective and writes from the device).
With an EMA of the weights (`training.ema`), rank 0 adds `ema.safetensors` to every checkpoint (its host
copy is taken with the others in the async path) and `load` restores it.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsdia.config.schema import CheckpointConfig
from tsdia.errors import CheckpointError
from tsdia.experiment import checkpoints as store
from tsdia.training.distributed import barrier, broadcast_object
from tsdia.training.ema import EMA, EMA_FILE
from tsdia.training.host_snapshot import HostBuffers, supported, take_snapshot, write_snapshot

logger = logging.getLogger(__name__)


@dataclass
class _Write:
    """A checkpoint whose files are being (or have been) written into `staging`."""

    name: str
    staging: Path
    step: int
    epoch: int
    metrics: dict[str, float]
    trainer_state: dict[str, Any]
    final: bool
    started: float
    background: bool = False  # written by the writer thread
    done: threading.Event = field(default_factory=threading.Event)  # set when the writer has finished
    error: str | None = None


class Checkpointer:
    def __init__(
        self,
        accelerator: Any,
        save_dir: Path,
        config: CheckpointConfig,
        deepspeed: bool,
        resume_from: str | None,
        ema: EMA | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.ema = ema
        self.save_dir = save_dir
        self.config = config
        self.deepspeed = deepspeed
        # DeepSpeed engines write collectively from the device: they save synchronously.
        self.background = config.async_save and not deepspeed and supported(accelerator)
        if config.async_save and not self.background and accelerator.is_main_process:
            why = (
                "DeepSpeed's save_checkpoint is collective"
                if deepspeed
                else "no host snapshot for this backend"
            )
            logger.warning(
                "training.checkpoint.async_save: this run saves synchronously (%s); "
                "each checkpoint blocks training while it is written.",
                why,
            )
        self.buffers = HostBuffers()  # reused from save to save; free again once the pending write is done
        self.protected = [Path(resume_from)] if resume_from else []  # rotation never deletes these
        self.pending: _Write | None = None
        self.blocked_s = 0.0  # total time the training loop spent inside save()

    def save(
        self,
        model: Any,
        epoch: int,
        step: int,
        metrics: dict[str, float],
        trainer_state: dict[str, Any],
        final: bool,
    ) -> Path:
        """Write checkpoint-epoch{epoch}-step{step} (a no-op if it exists). Collective: call on every rank."""
        started = time.perf_counter()
        name = store.checkpoint_name(epoch, step)
        final_path = self.save_dir / name
        if self.pending is not None and self.pending.name == name:
            return final_path
        self.commit_pending()  # at most one write in flight, committed in order
        if final_path.exists():
            return final_path
        write = _Write(
            name, store.staging_path(self.save_dir, name), step, epoch, metrics, trainer_state, final, started
        )
        try:
            if self.accelerator.is_main_process:
                store.begin_checkpoint(self.save_dir, name)
        except OSError as err:
            write.error = _describe(err)
        barrier()
        if write.error is None:
            if self.background and not final:
                self._start_writer(write)
            else:
                write.error = self._write_files(model, write.staging, final)
        self.pending = write
        if not write.background:
            self.commit_pending()
        self.blocked_s += time.perf_counter() - started
        return final_path

    def _write_files(self, model: Any, staging: Path, final: bool) -> str | None:
        try:
            self.accelerator.save_state(str(staging), safe_serialization=True)
            if self.ema is not None and self.accelerator.is_main_process:
                from safetensors.torch import save_file

                save_file(self.ema.state_dict(), str(staging / EMA_FILE), metadata={"format": "pt"})
            if final and self.deepspeed:
                self._save_consolidated_weights(model, staging)
        except Exception as err:  # serialisers wrap I/O errors in their own types (SafetensorError, ...)
            if not isinstance(err, OSError):
                logger.debug("Writing %s failed", staging.name, exc_info=True)
            return _describe(err)
        return None

    def _start_writer(self, write: _Write) -> None:
        """Copy the state to host buffers here, then serialise and fsync it on a writer thread."""
        try:
            extra = {EMA_FILE: self.ema.state_dict()} if self.ema is not None else {}
            files = take_snapshot(self.accelerator, self.buffers, write.staging, extra)
        except Exception as err:  # e.g. no host memory for the buffers: reported like a failed write
            write.error = _describe(err)
            return

        def run() -> None:
            try:
                write_snapshot(files, write.staging)
                store.fsync_tree(write.staging)  # the slow part of durability, off the training loop too
            except BaseException as err:
                logger.debug("Background write of %s failed", write.name, exc_info=True)
                write.error = f"background writer failed: {_describe(err)}"
            finally:
                write.done.set()

        write.background = True
        threading.Thread(target=run, name=f"tsdia-writer-{write.name}", daemon=True).start()

    def commit_pending(self) -> None:
        """Finish the pending write: wait for its writer, then commit it (collective)."""
        write, self.pending = self.pending, None
        if write is None:
            return
        if write.background and not write.done.wait(self.config.async_timeout_s):
            # A thread cannot be killed: it is left behind (a daemon) with its own buffers.
            self.buffers = HostBuffers()
            write.error = (
                f"the background writer did not finish within {self.config.async_timeout_s:g} s "
                "(training.checkpoint.async_timeout_s); the file system may be hung or far too slow"
            )
        # Every rank learns whether any rank failed, so none of them waits for the others forever.
        errors = [e for e in _gather(write.error) if e]
        if not errors and self.accelerator.is_main_process:
            try:
                store.commit_checkpoint(
                    self.save_dir,
                    write.staging,
                    write.name,
                    write.step,
                    write.epoch,
                    write.metrics,
                    write.trainer_state,
                )
                store.update_best_and_rotate(
                    self.save_dir,
                    self.config.best_metric,
                    self.config.best_mode,
                    self.config.save_total_limit,
                    self.protected,
                    self.config.keep_best,
                )
            except OSError as err:
                errors = [_describe(err)]
        errors = broadcast_object(errors)
        if errors:
            if self.accelerator.is_main_process:
                shutil.rmtree(write.staging, ignore_errors=True)
            latest = store.latest_checkpoint(self.save_dir)
            raise CheckpointError(
                f"could not write checkpoint {write.name} in {self.save_dir}: {errors[0]}. "
                f"The earlier checkpoints are intact (latest complete: {latest.name if latest else 'none'}); "
                "free some space, then resume with training.checkpoint.resume=latest."
            )
        if self.accelerator.is_main_process:
            how = (
                "in the background" if write.background else f"in {time.perf_counter() - write.started:.2f}s"
            )
            logger.info("Saved %s %s%s", write.name, how, " (final)" if write.final else "")
        barrier()

    def abandon(self) -> None:
        """After a crash: let a background writer finish (bounded) without committing it; its staging
        directory is removed at the next start."""
        write, self.pending = self.pending, None
        if write is not None and write.background:
            write.done.wait(self.config.async_timeout_s)

    def _save_consolidated_weights(self, model: Any, directory: Path) -> None:
        """DeepSpeed checkpoints hold sharded engine states; the final one also gets plain weights."""
        from safetensors.torch import save_file

        state = self.accelerator.get_state_dict(model)  # a collective under ZeRO-3
        if self.accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))

    def load(self, checkpoint: str) -> dict[str, Any]:
        """Restore model, optimizer, scheduler, RNG states (and the EMA); return the trainer's counters."""
        self.accelerator.load_state(checkpoint)
        if self.ema is not None:
            self.ema.load_checkpoint(Path(checkpoint))
        state: dict[str, Any] = json.loads((Path(checkpoint) / store.TRAINER_STATE).read_text())
        return state


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}"


def _gather(item: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [item]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, item)
    return out
