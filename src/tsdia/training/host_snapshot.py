"""A host-memory copy of everything `accelerator.save_state` writes, and the writer that serialises it.

`take_snapshot` runs on the training thread: it gathers the same objects Accelerate's `save_state`
(non-DeepSpeed, non-FSDP) saves, under the same file names, and copies every tensor into a host buffer
that is reused from save to save (pinned when the tensor lives on a GPU, so the copies run at the
device-to-host bandwidth, then one synchronize). RNG states, CUDA's included, are read here too.
`write_snapshot` then serialises the host copy with the serialisers Accelerate uses (safetensors for
the weights, `torch.save` for the rest) and may run in any thread: it never touches a device, so a
background writer needs no CUDA context (CUDA cannot be used after `fork()` and is not needed here).
The files load with `accelerator.load_state` exactly like those of `save_state`.
"""

from __future__ import annotations

import copy
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class SnapshotFile:
    """One file of the checkpoint: `kind` is safetensors (a flat tensor dict), torch (torch.save) or bytes."""

    name: str
    kind: str
    payload: Any


class HostBuffers:
    """Host tensors reused across saves, keyed by where a tensor sits in the state (file, key path)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self.device_copies = 0  # tensors copied from an accelerator in the last snapshot

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def copy(self, key: tuple[Any, ...], tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        on_device = tensor.device.type != "cpu"
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            # Pinned (page-locked) memory only for device tensors: the DMA engine copies into it directly.
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=on_device)
            self._buffers[key] = buffer
        buffer.copy_(tensor.detach(), non_blocking=on_device)
        self.device_copies += on_device
        return buffer

    def to_host(self, obj: Any, key: tuple[Any, ...]) -> Any:
        """A copy of `obj` whose tensors are host buffers and whose other leaves are deep copies."""
        if isinstance(obj, torch.Tensor):
            return self.copy(key, obj)
        if isinstance(obj, dict):
            out = obj.copy()  # keeps the mapping's type (OrderedDict, defaultdict)
            for k, v in obj.items():
                out[k] = self.to_host(v, (*key, k))
            return out
        if isinstance(obj, list):
            return [self.to_host(v, (*key, i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            items = [self.to_host(v, (*key, i)) for i, v in enumerate(obj)]
            return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
        return copy.deepcopy(obj)


def take_snapshot(
    accelerator: Any,
    buffers: HostBuffers,
    directory: Path,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> list[SnapshotFile]:
    """On the training thread: the files `accelerator.save_state(directory, safe_serialization=True)`
    would write on this rank, with their tensors copied into `buffers`, plus the `extra` safetensors files
    (file name -> flat tensor dict, written by the main process: the EMA). Blocks until the copies are done."""
    from accelerate.utils import (
        OPTIMIZER_NAME,
        RNG_STATE_NAME,
        SAFE_WEIGHTS_NAME,
        SAMPLER_NAME,
        SCALER_NAME,
        SCHEDULER_NAME,
    )
    from accelerate.utils.other import clean_state_dict_for_safetensors

    main = accelerator.is_main_process  # Accelerate's `save` writes shared files from the main process only
    files: list[SnapshotFile] = []
    buffers.device_copies = 0
    weights = [accelerator.get_state_dict(model, unwrap=False) for model in accelerator._models]
    for hook in accelerator._save_model_state_pre_hook.values():
        hook(accelerator._models, weights, str(directory))
    for i, state in enumerate(weights if main else []):
        # Before the copy: shared storage (tied weights) is only visible on the original tensors.
        state = clean_state_dict_for_safetensors(state)
        name = SAFE_WEIGHTS_NAME if i == 0 else SAFE_WEIGHTS_NAME.replace(".", f"_{i}.")
        files.append(SnapshotFile(name, "safetensors", buffers.to_host(dict(state), (name,))))
    if main:
        for i, optimizer in enumerate(accelerator._optimizers):
            name = f"{OPTIMIZER_NAME}.bin" if i == 0 else f"{OPTIMIZER_NAME}_{i}.bin"
            files.append(SnapshotFile(name, "torch", buffers.to_host(optimizer.state_dict(), (name,))))
        for i, scheduler in enumerate(accelerator._schedulers):
            name = f"{SCHEDULER_NAME}.bin" if i == 0 else f"{SCHEDULER_NAME}_{i}.bin"
            files.append(SnapshotFile(name, "torch", buffers.to_host(scheduler.state_dict(), (name,))))
    for i, dataloader in enumerate(accelerator._dataloaders):
        # Samplers and loader states hold live objects, not tensors: they are pickled here, now.
        from accelerate.data_loader import IterableDatasetShard, SeedableRandomSampler

        if main and isinstance(dataloader.dataset, IterableDatasetShard):
            sampler = dataloader.get_sampler()
            if isinstance(sampler, SeedableRandomSampler):
                name = f"{SAMPLER_NAME}.bin" if i == 0 else f"{SAMPLER_NAME}_{i}.bin"
                files.append(SnapshotFile(name, "bytes", _pickled(sampler)))
        if getattr(dataloader, "use_stateful_dataloader", False):
            name = "dl_state_dict.bin" if i == 0 else f"dl_state_dict_{i}.bin"
            files.append(SnapshotFile(name, "bytes", _pickled(dataloader.state_dict())))
    if accelerator.scaler is not None:
        files.append(SnapshotFile(SCALER_NAME, "torch", buffers.to_host(accelerator.scaler.state_dict(), ())))
    name = f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    files.append(SnapshotFile(name, "torch", _rng_states(accelerator.step)))
    if main:
        for i, obj in enumerate(accelerator._custom_objects):
            files.append(SnapshotFile(f"custom_checkpoint_{i}.pkl", "bytes", _pickled(obj.state_dict())))
    for name, state in (extra or {}).items() if main else ():
        files.append(SnapshotFile(name, "safetensors", buffers.to_host(dict(state), (name,))))
    if buffers.device_copies:
        torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
    accelerator.project_configuration.iteration += 1  # as save_state does
    return files


def write_snapshot(files: list[SnapshotFile], directory: Path) -> None:
    """Serialise a snapshot into `directory`. Touches no device: safe on any thread."""
    from safetensors.torch import save_file

    for file in files:
        path = directory / file.name
        if file.kind == "safetensors":
            save_file(file.payload, str(path), metadata={"format": "pt"})
        elif file.kind == "torch":
            _torch_save(file.payload, path)
        else:
            path.write_bytes(file.payload)


class _RecordingWriter(io.RawIOBase):
    """A file that remembers the OSError of a failed write: torch.save reports only "unexpected pos"."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self.raw = raw
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            written: int = self.raw.write(data)
            return written
        except OSError as err:
            self.error = err
            raise


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save, but a full disk or a file-size limit raises the OSError (ENOSPC, EFBIG) that caused it."""
    with open(path, "wb", buffering=0) as raw:
        writer = _RecordingWriter(raw)
        try:
            torch.save(obj, writer)  # type: ignore[arg-type]  # a raw binary file: what torch writes to
        except RuntimeError as err:
            if writer.error is not None:
                raise writer.error from err
            raise


def _pickled(obj: Any) -> bytes:
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


def _rng_states(step: int) -> dict[str, Any]:
    """The generator states Accelerate saves (CPU, numpy, Python, CUDA), read now on the training thread."""
    states: dict[str, Any] = {
        "step": step,
        "random_state": random.getstate(),
        "numpy_random_seed": np.random.get_state(),
        "torch_manual_seed": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return states


def supported(accelerator: Any) -> bool:
    """Whether `take_snapshot` mirrors `save_state` for this run (plain, DDP; not DeepSpeed, FSDP, XLA)."""
    from accelerate.utils import DistributedType

    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    # Other device kinds have RNG states of their own that `_rng_states` does not read.
    return accelerator.distributed_type in plain and accelerator.device.type in ("cpu", "cuda")
