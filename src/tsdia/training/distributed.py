"""Accelerate (and DeepSpeed) set-up from the config and the cluster environment, and rank agreement."""

from __future__ import annotations

import inspect
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tsdia.cluster import ClusterEnvironment
from tsdia.config.schema import Config
from tsdia.errors import ConfigError


def cache_per_step_probes() -> None:
    """Answer the questions Accelerate asks on every optimizer step from a cache.

    - `AcceleratedOptimizer.step` calls `is_lomo_available()` twice per step, each a search of sys.path
      with importlib (~100 us here). Installed packages do not change during a run: the first answer
      is kept.
    - `AcceleratedOptimizer.zero_grad` calls `inspect.signature(optimizer.zero_grad)` per step to learn
      whether it takes `set_to_none` (~35 us: torch wraps `zero_grad` in decorators inspect unwraps). A
      function's signature does not change: it is kept per function.

    Together ~0.2 ms per step, a tenth of a small GPU step.
    """
    import accelerate.optimizer as accelerated_optimizer

    available = bool(accelerated_optimizer.is_lomo_available())
    accelerated_optimizer.is_lomo_available = lambda: available
    if not isinstance(accelerated_optimizer.inspect, _CachedSignatures):
        accelerated_optimizer.inspect = _CachedSignatures()


class _CachedSignatures:
    """`inspect` for one module, whose `signature(bound_method)` is computed once per function."""

    def __init__(self) -> None:
        self._signatures: dict[Any, inspect.Signature] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    def signature(self, obj: Any, *args: Any, **kwargs: Any) -> inspect.Signature:
        function = getattr(obj, "__func__", None)  # a bound method's function: the same for every instance
        if function is None or args or kwargs:
            return inspect.signature(obj, *args, **kwargs)
        cached = self._signatures.get(function)
        if cached is None:
            cached = self._signatures[function] = inspect.signature(obj)
        return cached


def build_accelerator(config: Config, cluster: ClusterEnvironment) -> Any:
    """An `Accelerator` whose ranks really synchronise, on GPUs or on CPU (gloo)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    training = config.training
    on_gpu = torch.cuda.is_available()
    if training.mixed_precision == "fp16" and not on_gpu:
        raise ConfigError(
            f"{config.source.where('training.mixed_precision')}: training.mixed_precision: fp16 needs a GPU; "
            "use bf16 (or no) on CPU."
        )
    deepspeed_plugin = build_deepspeed_plugin(config, cluster)
    if cluster.distributed or deepspeed_plugin is not None:
        # DeepSpeed and torch.distributed read these; under Slurm nobody else sets them.
        os.environ.update(cluster.torch_env())
    backend = config.distributed.backend
    if backend == "auto":
        backend = "nccl" if on_gpu else "gloo"
    handlers = []
    if cluster.distributed or deepspeed_plugin is not None:
        timeout = timedelta(seconds=config.distributed.timeout_s)
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
    cache_per_step_probes()
    return Accelerator(
        # Without a GPU, cpu=True is what makes plain multi-process runs synchronise (else ranks run alone);
        # but it silently drops DeepSpeed, which brings its own CPU support.
        cpu=not on_gpu and deepspeed_plugin is None,
        mixed_precision=training.mixed_precision,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        deepspeed_plugin=deepspeed_plugin,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )


def deepspeed_config(config: Config, cluster: ClusterEnvironment) -> dict[str, Any] | None:
    """The DeepSpeed JSON implied by the tsdia config (or loaded from `config_file`, checked for agreement)."""
    ds = config.distributed.deepspeed
    training = config.training
    if ds.zero_stage is None and ds.config_file is None:
        return None
    expected: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.batch_size * training.gradient_accumulation_steps * cluster.world_size,
    }
    if ds.config_file is not None:
        path = Path(ds.config_file)
        where = config.source.where("distributed.deepspeed.config_file")
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"{where}: distributed.deepspeed.config_file: cannot read {path}: {err}"
            ) from None
        for key, value in expected.items():
            if loaded.get(key, "auto") not in ("auto", value):
                raise ConfigError(
                    f"{where}: {path} sets {key}={loaded[key]} but the tsdia config implies {value}; "
                    f'set it to "auto" or make training.batch_size / gradient_accumulation_steps agree.'
                )
        return {**loaded, **expected}
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer}
    if ds.offload_param != "none":
        if ds.zero_stage != 3:
            raise ConfigError(
                f"{config.source.where('distributed.deepspeed.offload_param')}: distributed.deepspeed.offload_param "
                "needs zero_stage: 3."
            )
        zero["offload_param"] = {"device": ds.offload_param}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # for the final checkpoint's safetensors
    out = {
        **expected,
        "zero_optimization": zero,
        "bf16": {"enabled": training.mixed_precision == "bf16"},
        "fp16": {"enabled": training.mixed_precision == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if training.max_grad_norm is not None:
        out["gradient_clipping"] = training.max_grad_norm
    return out


def build_deepspeed_plugin(config: Config, cluster: ClusterEnvironment) -> Any:
    ds_config = deepspeed_config(config, cluster)
    if ds_config is None:
        return None
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=ds_config)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (a no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
