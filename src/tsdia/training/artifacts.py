"""The experiment's descriptive files: `hyperparameters.json`, `model_summary.txt`, the full config dict."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any

from torch import nn

from tsdia.config.schema import Config


def full_config_dict(config: Config) -> dict[str, Any]:
    """The whole resolved config as a nested dict (defaults filled in), as sent to the trackers."""
    return config.to_dict()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(path: str | Path) -> str | None:
    """The commit of the git checkout holding `path` (with `-dirty` if it has changes), if any."""
    try:
        cwd = Path(path).resolve()
        cwd = cwd if cwd.is_dir() else cwd.parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def hyperparameters(
    config: Config,
    *,
    world_size: int,
    steps_per_epoch: int,
    total_steps: int,
    zero_stage: int | None,
    num_parameters: int,
    code_path: str | Path,
    init_from: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a reader needs to compare runs: the effective numbers, not only what was typed."""
    training = config.training
    effective_batch = training.batch_size * training.gradient_accumulation_steps * world_size
    return {
        "epochs": training.epochs,
        "max_steps": training.max_steps,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "world_size": world_size,
        "per_device_batch_size": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "effective_batch_size": effective_batch,
        "optimizer": training.optimizer.settings(),
        "scheduler": training.scheduler.settings(),
        "max_grad_norm": training.max_grad_norm,
        "mixed_precision": training.mixed_precision,
        "seed": training.seed,
        "zero_stage": zero_stage,
        "distributed_env": dict(config.distributed.env),
        "num_parameters": num_parameters,
        "model": {"target": config.model.target, **config.model.kwargs},
        "dataset": {"target": config.dataset.target, **config.dataset.kwargs},
        "versions": {
            name: package_version(name)
            for name in ("tsdia", "torch", "accelerate", "deepspeed", "wandb", "submitit")
        },
        "git_commit": git_commit(code_path),
        "init_from": init_from,  # training.init_from: the source's path, checkpoint and manifest
    }


def model_summary(model: nn.Module) -> str:
    """Architecture plus total/trainable parameter counts for every module."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = [("(model)", type(model).__name__, total, trainable)]
    for name, module in model.named_modules():
        if not name:
            continue
        params = list(module.parameters())
        rows.append(
            (
                name,
                type(module).__name__,
                sum(p.numel() for p in params),
                sum(p.numel() for p in params if p.requires_grad),
            )
        )
    width = max(len(r[0]) for r in rows)
    type_width = max(len(r[1]) for r in rows)
    lines = [
        f"Model: {type(model).__name__}",
        f"Total parameters:     {total:,}",
        f"Trainable parameters: {trainable:,}",
        "",
        f"{'module':<{width}}  {'type':<{type_width}}  {'total':>12}  {'trainable':>12}",
        f"{'-' * width}  {'-' * type_width}  {'-' * 12}  {'-' * 12}",
    ]
    lines += [f"{n:<{width}}  {t:<{type_width}}  {a:>12,}  {b:>12,}" for n, t, a, b in rows]
    return "\n".join(lines) + "\n\nArchitecture:\n" + repr(model) + "\n"
