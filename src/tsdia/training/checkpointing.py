"""Saving and loading through Accelerate (and DeepSpeed) with tsdia's atomic checkpoint protocol.

Every rank writes its part into the staging directory, all ranks meet at a barrier, then rank 0 writes
the manifest and renames the directory into place, updates `best_checkpoint` and rotates. A write that
fails (disk full, quota) raises `CheckpointError` and leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tsdia.config.schema import CheckpointConfig
from tsdia.errors import CheckpointError
from tsdia.training import checkpoint_store as store
from tsdia.training.distributed import barrier, broadcast_object

logger = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        accelerator: Any,
        save_dir: Path,
        config: CheckpointConfig,
        deepspeed: bool,
        resume_from: str | None,
    ) -> None:
        self.accelerator = accelerator
        self.save_dir = save_dir
        self.config = config
        self.deepspeed = deepspeed
        self.protected = [Path(resume_from)] if resume_from else []  # rotation never deletes these

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
        name = store.checkpoint_name(epoch, step)
        final_path = self.save_dir / name
        if final_path.exists():
            return final_path
        accelerator = self.accelerator
        staging = store.staging_path(self.save_dir, name)
        started = time.perf_counter()
        error = None
        try:
            if accelerator.is_main_process:
                store.begin_checkpoint(self.save_dir, name)
            barrier()
            accelerator.save_state(str(staging), safe_serialization=True)
            if final and self.deepspeed:
                self._save_consolidated_weights(model, staging)
        except Exception as err:  # serialisers wrap I/O errors in their own types (SafetensorError, ...)
            if not isinstance(err, OSError):
                logger.debug("Writing %s failed", name, exc_info=True)
            error = f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}"
        # Every rank learns whether any rank failed, so none of them waits for the others forever.
        errors = [e for e in _gather(error) if e]
        if not errors and accelerator.is_main_process:
            try:
                store.commit_checkpoint(self.save_dir, staging, name, step, epoch, metrics, trainer_state)
                store.update_best_and_rotate(
                    self.save_dir,
                    self.config.best_metric,
                    self.config.best_mode,
                    self.config.save_total_limit,
                    self.protected,
                )
            except OSError as err:
                errors = [f"{type(err).__name__}: {err.strerror or err}"]
        errors = broadcast_object(errors)
        if errors:
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            latest = store.latest_checkpoint(self.save_dir)
            raise CheckpointError(
                f"could not write checkpoint {name} in {self.save_dir}: {errors[0]}. "
                f"The earlier checkpoints are intact (latest complete: {latest.name if latest else 'none'}); "
                "free some space, then resume with training.checkpoint.resume=latest."
            )
        if accelerator.is_main_process:
            took = time.perf_counter() - started
            logger.info("Saved %s in %.2fs%s", name, took, " (final)" if final else "")
        barrier()
        return final_path

    def _save_consolidated_weights(self, model: Any, directory: Path) -> None:
        """DeepSpeed checkpoints hold sharded engine states; the final one also gets plain weights."""
        from safetensors.torch import save_file

        state = self.accelerator.get_state_dict(model)  # a collective under ZeRO-3
        if self.accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))

    def load(self, checkpoint: str) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and RNG states; return the trainer's counters."""
        self.accelerator.load_state(checkpoint)
        state: dict[str, Any] = json.loads((Path(checkpoint) / store.TRAINER_STATE).read_text())
        return state


def _gather(item: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [item]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, item)
    return out
