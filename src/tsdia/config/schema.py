"""The typed configuration schema: one dataclass per YAML section, every field documented here.

Defaults live only in this file. `tsdia.config.loader` turns YAML into these objects and validates
types and ranges from the field metadata (`ge`, `gt`, `le`, `lt`, `choices`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

EXAMPLE_MODEL = "tsdia.examples.tsvad:TargetSpeakerVAD"
EXAMPLE_DATASET = "tsdia.examples.tsvad:build_datasets"


def option(default: Any = None, doc: str = "", **checks: Any) -> Any:
    """A dataclass field with a docstring and range checks (`ge`, `gt`, `le`, `lt`) kept in its metadata;
    `internal=True`: filled by the loader, never a YAML key of its own."""
    meta = {"doc": doc, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str = "") -> Any:
    """A nested section field."""
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass
class ComponentConfig:
    """A pluggable component: `target` is an import path, every other key is a keyword argument."""

    target: str = option("", "Import path `package.module:callable` of the factory or class.")
    kwargs: dict[str, Any] = option({}, "Keyword arguments passed to the target (all other keys).")


@dataclass
class OptimizerConfig:
    """A built-in optimizer by `name`, or any optimizer by `target` (then every other key is its kwarg)."""

    name: Literal["adamw", "adam", "sgd"] = option("adamw", "Optimizer: adamw, adam or sgd.")
    lr: float = option(1e-3, "Peak learning rate (the schedule scales it); also passed to `target`.", gt=0)
    weight_decay: float = option(0.01, "Decoupled (adamw) or L2 (adam, sgd) weight decay.", ge=0)
    betas: list[float] = option([0.9, 0.999], "Adam betas (two values in [0, 1)).")
    eps: float = option(1e-8, "Adam epsilon.", gt=0)
    momentum: float = option(0.9, "SGD momentum.", ge=0, le=1)
    target: str | None = option(
        None,
        "Import path of any optimizer class or factory, e.g. torch.optim.SGD, called as "
        "target(params, lr=lr, **other_keys); replaces `name` and its keys.",
    )
    kwargs: dict[str, Any] = option({}, "With `target`: its other keys (keyword arguments).", internal=True)

    def settings(self) -> dict[str, Any]:
        """What the optimizer is built from (for hyperparameters.json and the trackers)."""
        if self.target is None:
            return {k: v for k, v in asdict(self).items() if k not in ("target", "kwargs")}
        return {"target": self.target, "lr": self.lr, **self.kwargs}


@dataclass
class SchedulerConfig:
    """A built-in schedule by `name`, or any LRScheduler factory by `target` (every other key its kwarg)."""

    name: Literal["cosine", "linear", "constant", "noam", "inverse_sqrt"] = option(
        "cosine",
        "Learning-rate schedule after the warm-up: cosine, linear (to min_lr_ratio at the end of "
        "`training.epochs`, not `max_steps`), constant, or noam / inverse_sqrt (the same: lr * "
        "sqrt(warmup_steps / step)).",
    )
    warmup_steps: int = option(
        0, "Linear warm-up to `lr`, in optimizer steps (noam and inverse_sqrt need it > 0).", ge=0
    )
    min_lr_ratio: float = option(
        0.0,
        "Lowest learning rate as a fraction of `lr`: where cosine and linear end, the floor of noam and "
        "inverse_sqrt; constant ignores it.",
        ge=0,
        le=1,
    )
    target: str | None = option(
        None,
        "Import path of a schedule factory, called as target(optimizer, total_steps=N, **other_keys) "
        "(total_steps only if it takes it), returning an LRScheduler; replaces `name` and its keys.",
    )
    kwargs: dict[str, Any] = option({}, "With `target`: its other keys (keyword arguments).", internal=True)

    def settings(self) -> dict[str, Any]:
        """What the schedule is built from (for hyperparameters.json and the trackers)."""
        if self.target is None:
            return {k: v for k, v in asdict(self).items() if k not in ("target", "kwargs")}
        return {"target": self.target, **self.kwargs}


@dataclass
class CheckpointConfig:
    save_dir: str = option("", "Experiment directory (required). Refused if it exists and `resume` is unset.")
    interval: int | None = option(
        1000, "Save every this many optimizer steps (null: only at validation/end).", gt=0
    )
    save_total_limit: int | None = option(
        None, "Keep at most this many named checkpoints; the best and the newest are never deleted.", ge=1
    )
    resume: str | None = option(None, "`latest`, or a checkpoint directory to resume from.")
    resume_policy: Literal["strict", "override"] = option(
        "strict",
        "A resume whose config changes the optimizer, schedule, batch geometry, seed, data or world size "
        "since the experiment's recorded config: strict refuses it; override applies the new values after "
        "loading the checkpoint (exact resume is then no longer claimed). Model changes are always refused.",
    )
    best_metric: str = option("val_loss", "Validation metric that picks `best_checkpoint`.")
    best_mode: Literal["min", "max"] = option(
        "min", "Whether a lower (min) or higher (max) metric is better."
    )
    save_on_validation: bool = option(
        True, "Also save a checkpoint after each validation, so it can be best."
    )
    keep_best: int | None = option(
        None,
        "Rotation never deletes the N best checkpoints by best_metric, N being this value (for `tsdia "
        "export --average-best N`); null: only the best. At most save_total_limit.",
        ge=1,
    )
    async_save: bool = option(
        False,
        "Interval checkpoints: training waits only for a copy of the state into host buffers (one host "
        "copy of model + optimizer, pinned on GPUs, kept for the run); a thread writes it meanwhile. "
        "DeepSpeed saves synchronously.",
    )
    async_timeout_s: float = option(
        600.0,
        "Longest wait for a background checkpoint write at the next save or the end; then CheckpointError.",
        gt=0,
    )


@dataclass
class LoggingConfig:
    interval: int = option(50, "Log training loss and learning rate every this many optimizer steps.", gt=0)
    tensorboard: bool = option(True, "Write TensorBoard event files under `<save_dir>/tensorboard/`.")
    wandb: bool = option(False, "Log to Weights & Biases (files under `<save_dir>/wandb/`).")
    wandb_project: str = option("ts-dia-training", "WandB project.")
    wandb_entity: str | None = option(None, "WandB entity (team or user); null uses your default.")
    wandb_group: str | None = option(None, "WandB group; a sweep puts all its members in the sweep's group.")
    wandb_mode: Literal["auto", "online", "offline"] = option(
        "auto", "auto: online when logged in and reachable, else offline (never prompts)."
    )
    run_name: str | None = option(None, "Run name for the trackers; default: the save_dir's base name.")
    progress_bar: bool = option(True, "Show a tqdm progress bar (loss, lr, it/s) on rank 0.")
    progress_log_seconds: float = option(
        30.0,
        "A progress-bar line reaches the log file at most this often (the console sees every redraw).",
        ge=0,
    )


@dataclass
class ValidationConfig:
    interval: int = option(1, "Validate every this many epochs, and once more at the end of training.", gt=0)
    batch_size: int | None = option(
        None, "Validation batch size per device; default: training.batch_size.", gt=0
    )
    max_steps: int | None = option(None, "Validate on at most this many batches (per device).", gt=0)


@dataclass
class PreemptionConfig:
    signals: list[str] = option(
        ["SIGUSR2", "SIGTERM"], "Signals that mean 'save and stop' (Slurm's time-limit/preemption signals)."
    )
    check_interval: int = option(
        10, "Optimizer steps between the ranks' agreement on stopping (one tiny all-reduce each time).", gt=0
    )


@dataclass
class DataLoaderConfig:
    persistent_workers: bool = option(
        False, "Keep the worker processes alive between epochs (needs training.num_workers > 0)."
    )
    pin_memory: bool | None = option(
        None, "Page-locked batches for faster host-to-GPU copies; null: on with CUDA."
    )
    prefetch_factor: int | None = option(
        None,
        "Batches each worker loads ahead; null: PyTorch's default, 2 (needs training.num_workers > 0).",
        gt=0,
    )
    drop_last: bool = option(False, "Drop the last training batch of an epoch when it is incomplete.")
    seed_samples: bool = option(
        True,
        "Seed torch, random and numpy from (seed, epoch, index) before each sample is loaded, so on-the-fly "
        "augmentation and resume are exact with any num_workers.",
    )
    sample_rngs: list[str] = option(
        ["torch", "random", "numpy"],
        "The global RNGs tsdia keeps per-sample exact (any of torch, random, numpy): each is seeded per "
        "sample once the dataset is seen drawing from it; one left out is neither seeded nor watched.",
    )


@dataclass
class WatchdogConfig:
    enabled: bool = option(
        True,
        "Treat a run in which no optimizer step completes in time as hung: dump every rank's stacks to its "
        "log, record `hang` in attempts.json, exit (and requeue under Slurm).",
    )
    timeout_s: float | None = option(
        None,
        "Seconds without a completed optimizer step that count as a hang. null: derived, max(min_timeout_s, "
        "10 x the slowest of the last 100 steps): ten times the slowest step leaves room for stragglers and "
        "slow I/O while a real hang is caught in minutes, not at distributed.timeout_s.",
        gt=0,
    )
    min_timeout_s: float = option(
        300.0,
        "Floor of the derived timeout. Validation and checkpoint saves get at least the timeout and 10 x "
        "their slowest earlier run; the start-up, the first step (e.g. DeepSpeed's JIT compile) and the "
        "first validation and save of an attempt are not watched (distributed.timeout_s bounds them).",
        gt=0,
    )


@dataclass
class EarlyStoppingConfig:
    metric: str | None = option(
        None,
        "Validation metric watched at each validation (val_<name>, or val_ema_<name> with training.ema); "
        "null: no early stopping.",
    )
    mode: Literal["min", "max"] = option("min", "Whether a lower (min) or higher (max) metric is better.")
    patience: int = option(
        3, "Stop after this many validations in a row without an improvement of at least min_delta.", gt=0
    )
    min_delta: float = option(0.0, "The smallest change that counts as an improvement.", ge=0)


@dataclass
class EmaConfig:
    decay: float | None = option(
        None,
        "Keep an exponential moving average of the weights: ema = decay * ema + (1 - decay) * weights, in "
        "fp32 (one more fp32 copy of the parameters per rank). Must be in (0, 1); null: no EMA.",
        gt=0,
        lt=1,
    )
    start_step: int = option(
        0,
        "Until this optimizer step the EMA copies the weights; it averages them from the next update on.",
        ge=0,
    )
    every: int = option(1, "Update the EMA every this many optimizer steps.", gt=0)
    validate_on: Literal["ema", "raw", "both"] = option(
        "both", "Validate on the EMA weights (metrics val_ema_<name>), the raw weights (val_<name>), or both."
    )


@dataclass
class TrainingConfig:
    epochs: int = option(10, "Number of epochs; the learning-rate schedule is defined over them.", gt=0)
    max_steps: int | None = option(
        None, "Stop after this many optimizer steps without changing the schedule (an exact prefix).", gt=0
    )
    batch_size: int = option(32, "Batch size per device (per process).", gt=0)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.", gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "no, fp16 (GPU only) or bf16.")
    seed: int = option(42, "Seed for weights, data order and every random number generator.", ge=0)
    max_grad_norm: float | None = option(1.0, "Clip gradients to this global norm (null: no clipping).", gt=0)
    num_workers: int = option(0, "DataLoader worker processes per rank.", ge=0)
    init_from: str | None = option(
        None,
        "Start a new experiment from these weights only (fresh optimizer and schedule, step 0): a checkpoint "
        "directory, an experiment directory (its best_checkpoint), a `tsdia export` directory or a "
        ".safetensors file. Unused when the run resumes.",
    )
    init_from_strict: bool = option(
        True,
        "Refuse init_from weights whose keys do not match the model's exactly (false: load the common ones).",
    )
    dataloader: DataLoaderConfig = section(
        DataLoaderConfig, "DataLoader options (workers, pinning, batches)."
    )
    optimizer: OptimizerConfig = section(OptimizerConfig, "Optimizer settings.")
    scheduler: SchedulerConfig = section(SchedulerConfig, "Learning-rate schedule.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Experiment directory and checkpoints.")
    logging: LoggingConfig = section(LoggingConfig, "Console, file and tracker logging.")
    validation: ValidationConfig = section(ValidationConfig, "Validation schedule.")
    preemption: PreemptionConfig = section(PreemptionConfig, "Stopping cleanly on a signal (then requeue).")
    watchdog: WatchdogConfig = section(WatchdogConfig, "Detecting a hung run (no step progress).")
    early_stopping: EarlyStoppingConfig = section(
        EarlyStoppingConfig, "Stop when a validation metric stops improving (a normal end)."
    )
    ema: EmaConfig = section(EmaConfig, "An exponential moving average of the weights, saved and validated.")


@dataclass
class DeepSpeedConfig:
    zero_stage: int | None = option(None, "ZeRO stage 0-3; null disables DeepSpeed.", ge=0, le=3)
    offload_optimizer: Literal["none", "cpu"] = option("none", "Offload optimizer states (ZeRO >= 1).")
    offload_param: Literal["none", "cpu"] = option("none", "Offload parameters (ZeRO-3 only).")
    config_file: str | None = option(None, "A DeepSpeed JSON file used instead of the keys above.")


@dataclass
class DistributedConfig:
    backend: Literal["auto", "gloo", "nccl"] = option(
        "auto", "Process-group backend; auto: nccl on GPU, else gloo."
    )
    timeout_s: int = option(
        600, "Collective timeout in seconds; also how long the start-up waits for every rank to join.", gt=0
    )
    env: dict[str, str] = option(
        {},
        "Environment variables set in every rank before the process group starts (and exported by the job "
        "script), e.g. {NCCL_SOCKET_IFNAME: ib0, NCCL_IB_DISABLE: '1', NCCL_DEBUG: WARN}.",
    )
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "DeepSpeed through Accelerate.")


@dataclass
class ContainerConfig:
    image: str | None = option(None, "Container image to run the job in (null: no container).")
    runtime: Literal["pyxis", "apptainer", "podman"] = option("pyxis", "pyxis (srun), apptainer or podman.")
    mounts: list[str] = option(
        [],
        "Extra `HOST[:CONTAINER[:ro|rw]]` mounts; the working and experiment directories are always mounted.",
    )


@dataclass
class SlurmConfig:
    nodes: int = option(1, "Number of nodes.", gt=0)
    tasks_per_node: int | None = option(None, "Processes per node; default: gpus_per_node, else 1.", gt=0)
    gpus_per_node: int = option(0, "GPUs per node.", ge=0)
    cpus_per_task: int | None = option(None, "CPUs per task.", gt=0)
    mem: str | None = option(None, "Memory per node, e.g. 32G.")
    partition: str | None = option(None, "Partition.")
    account: str | None = option(None, "Account.")
    qos: str | None = option(None, "Quality of service.")
    constraint: str | None = option(None, "Node constraint.")
    time: str = option("1-00:00:00", "Time limit, e.g. 4:00:00 or 2-00:00:00.")
    job_name: str | None = option(None, "Job name; default: the save_dir's base name.")
    signal_lead_s: int = option(
        120, "Seconds before the time limit at which the job is signalled to save.", gt=0
    )
    max_requeues: int = option(10, "Most times the job requeues itself (preemption or time limit).", ge=0)
    requeue_on_crash: bool = option(False, "Requeue after a crash too (bounded by max_requeues).")
    array_parallelism: int | None = option(
        None, "Sweeps: most members running at once (`--parallel` overrides it; null: all).", gt=0
    )
    requeue_on_hang: bool = option(
        True, "Requeue after a hang (training.watchdog), bounded by max_requeues; false: treat it as a crash."
    )
    setup: list[str] = option([], "Shell lines run before training (module load, source venv, ...).")
    sbatch_extra: dict[str, str] = option({}, "Extra sbatch options, e.g. {mail-type: END}.")
    container: ContainerConfig = section(ContainerConfig, "Run the job inside a container image.")


@dataclass
class ConfigSource:
    """Where a configuration came from: needed to copy it and to point errors at file:line."""

    path: str = ""
    text: str = ""
    overrides: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    positions: dict[str, str] = field(default_factory=dict)

    def where(self, key_path: str) -> str:
        """`file:line` of a dotted key (or the override that set it), else the file."""
        return self.positions.get(key_path, self.path)


@dataclass
class Config:
    """A whole tsdia configuration file."""

    model: ComponentConfig = field(default_factory=lambda: ComponentConfig(target=EXAMPLE_MODEL))
    dataset: ComponentConfig = field(default_factory=lambda: ComponentConfig(target=EXAMPLE_DATASET))
    training: TrainingConfig = section(TrainingConfig, "Training loop, checkpoints, logging, validation.")
    distributed: DistributedConfig = section(DistributedConfig, "Multi-process and DeepSpeed settings.")
    slurm: SlurmConfig = section(SlurmConfig, "Slurm job settings for tsdia-submit.")
    source: ConfigSource = field(default_factory=ConfigSource, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The whole resolved config as a nested dict, defaults filled in, loadable again: components as
        `target` plus their arguments; the optimizer and schedule as written (a `target` with its arguments,
        or a built-in `name` with its keys). Sent to the trackers and compared on resume."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "source":
                continue
            value = getattr(self, f.name)
            if isinstance(value, ComponentConfig):
                out[f.name] = {"target": value.target, **value.kwargs}
            else:
                out[f.name] = asdict(value)
        out["training"]["optimizer"] = self.training.optimizer.settings()
        out["training"]["scheduler"] = self.training.scheduler.settings()
        return out
