"""An exponential moving average (EMA) of the weights, kept in fp32 next to the model.

After every `every`-th optimizer step the EMA is updated: up to `start_step` it copies the weights, then
it averages them, `ema = decay * ema + (1 - decay) * weights`. Floating-point entries of the model's
state_dict (parameters and buffers such as BatchNorm statistics) are averaged; integer ones (counters)
are copied. Every checkpoint holds the EMA as `ema.safetensors`, with the same keys as the model's
`model.safetensors` (tied weights under their first name), so a resumed run continues it bitwise.

Memory: one fp32 copy of the model's state on each rank's device (plus a temporary copy of the weights
while validating on the EMA). Under DeepSpeed ZeRO 1/2 every rank holds the full parameters, so the
EMA works as without DeepSpeed; ZeRO-3 shards them and is refused (config loader, `build_ema`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tsdia.config.schema import Config
from tsdia.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"  # `tsdia export --ema` reads this name


class EMA:
    """fp32 shadow weights of `model` (the unwrapped module whose parameters the optimizer updates)."""

    def __init__(self, model: nn.Module, decay: float, start_step: int = 0, every: int = 1) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.start_step, self.every = decay, start_step, every
        self._live: dict[str, torch.Tensor] = {}  # the model's tensors, one name per storage
        seen: set[int] = set()
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:  # tied weights: the first name, as in model.safetensors
                seen.add(id(tensor))
                self._live[name] = tensor
        self.shadow = {
            name: t.detach().clone().float() if t.is_floating_point() else t.detach().clone()
            for name, t in self._live.items()
        }
        self._averaged = [name for name, t in self._live.items() if t.is_floating_point()]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Call after optimizer step `step` (1-based) has updated the weights."""
        if step % self.every:
            return
        if step <= self.start_step:
            self._copy_weights()
            return
        averaged = self._averaged
        if averaged:
            weights = [self._live[n].detach().float() for n in averaged]
            torch._foreach_lerp_([self.shadow[n] for n in averaged], weights, 1.0 - self.decay)
        for name, tensor in self._live.items():
            if not tensor.is_floating_point():
                self.shadow[name].copy_(tensor.detach())

    def _copy_weights(self) -> None:
        for name, tensor in self._live.items():
            self.shadow[name].copy_(tensor.detach())

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the EMA weights inside the block (cast to its dtypes), its own ones again after."""
        with torch.no_grad():
            backup = {name: t.detach().clone() for name, t in self._live.items()}
            for name, tensor in self._live.items():
                tensor.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, tensor in self._live.items():
                    tensor.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights under the model's state_dict names (fp32 for floating-point entries)."""
        return dict(self.shadow)

    def load(self, path: Path) -> None:
        """Restore the shadow weights from a checkpoint's `ema.safetensors`."""
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        if loaded.keys() != self.shadow.keys():
            missing, extra = (
                sorted(self.shadow.keys() - loaded.keys()),
                sorted(loaded.keys() - self.shadow.keys()),
            )
            raise CheckpointError(
                f"{path} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}; "
                "was the checkpoint made with another model?"
            )
        with torch.no_grad():
            for name, tensor in self.shadow.items():
                tensor.copy_(loaded[name])

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Restore from a checkpoint directory; one saved without an EMA starts it from the loaded weights."""
        path = checkpoint / EMA_FILE
        if path.exists():
            self.load(path)
            return
        logger.warning(
            "%s has no %s (saved without training.ema): the EMA starts from its weights", checkpoint, EMA_FILE
        )
        with torch.no_grad():
            self._copy_weights()


def build_ema(config: Config, model: nn.Module, zero_stage: int | None) -> EMA | None:
    """The run's EMA (None without `training.ema.decay`); ZeRO-3 from a DeepSpeed JSON file is refused here
    (the config loader refuses `distributed.deepspeed.zero_stage: 3` before anything is created)."""
    ema = config.training.ema
    if ema.decay is None:
        return None
    if zero_stage == 3:
        where = config.source.where("training.ema.decay")
        raise ConfigError(
            f"{where}: training.ema.decay: an EMA of the weights needs the full parameters on every rank, but "
            f"distributed.deepspeed.config_file ({config.distributed.deepspeed.config_file}) sets ZeRO stage 3, "
            "which shards them; use stage 2 or less, or set training.ema.decay: null."
        )
    return EMA(model, ema.decay, ema.start_step, ema.every)
