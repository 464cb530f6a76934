"""The `slurm` config section, checked and resolved into what the job asks Slurm for.

Every value that ends up in an sbatch script is checked here first, so a value Slurm could not accept (or
one that would change the script's meaning, such as a newline in `job_name`) is refused at submit time
with the key and the config line that set it. Quoting happens later, in `tsdia.launch.sbatch`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from tsdia.config.schema import Config
from tsdia.errors import ConfigError
from tsdia.slurm_commands import parse_duration

_MEM = re.compile(r"\d+([KMGTkmgt][Bb]?)?")
# Partition, account and QOS names (partition may be a comma-separated list): no spaces, quotes or shell syntax.
_NAME_LIST = re.compile(r"[A-Za-z0-9_.+@:-]+(,[A-Za-z0-9_.+@:-]+)*")
# Node features joined with & | , * and grouped with [] ().
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.+@:&|,*!\[\]()-]+")
_OPTION_KEY = re.compile(r"[a-z][a-z0-9-]*")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # every control character but tab
_MOUNT_BAD = re.compile(r"[:,\x00-\x1f\x7f]")  # what no runtime's mount list can carry in a path

# sbatch options that tsdia sets itself: an `sbatch_extra` entry for them says which key to use instead.
RESERVED_OPTIONS = {
    "job-name": "slurm.job_name",
    "nodes": "slurm.nodes",
    "ntasks": "slurm.nodes and slurm.tasks_per_node",
    "ntasks-per-node": "slurm.tasks_per_node",
    "gpus-per-node": "slurm.gpus_per_node",
    "cpus-per-task": "slurm.cpus_per_task",
    "mem": "slurm.mem",
    "partition": "slurm.partition",
    "account": "slurm.account",
    "qos": "slurm.qos",
    "constraint": "slurm.constraint",
    "time": "slurm.time",
    "signal": "slurm.signal_lead_s",
    "requeue": "slurm.max_requeues",
    "no-requeue": "slurm.max_requeues (0)",
    "output": "nothing: tsdia puts the Slurm logs in <save_dir>/slurm/",
    "error": "nothing: tsdia puts the Slurm logs in <save_dir>/slurm/",
    "open-mode": "nothing: tsdia appends, so requeued attempts keep the earlier output",
    "chdir": "nothing: the job runs where tsdia-submit ran",
    "array": "nothing: one tsdia job is one experiment",
    "wrap": "nothing: tsdia writes the script",
}


@dataclass(frozen=True)
class Mount:
    """One bind mount: `source` on the node appears at `target` in the container."""

    source: str  # absolute
    target: str  # absolute
    mode: str | None = None  # "ro", "rw" or None (the runtime's default: read-write)

    def spec(self) -> str:
        return ":".join(filter(None, (self.source, self.target, self.mode)))


@dataclass(frozen=True)
class ContainerSpec:
    """`slurm.container`, checked: every task of the job runs `tsdia-train` inside `image`."""

    image: str
    runtime: str  # pyxis, apptainer or podman
    mounts: tuple[Mount, ...] = ()  # the extra mounts of slurm.container.mounts (absolute paths)


@dataclass(frozen=True)
class SlurmResources:
    """What one tsdia job asks Slurm for, resolved from the config (defaults applied, values checked)."""

    save_dir: str  # absolute experiment directory
    job_name: str
    nodes: int
    tasks_per_node: int
    time: str  # as written in the config (a valid --time value)
    time_min: int  # the same in whole minutes (submitit's unit), rounded up
    signal_lead_s: int
    max_requeues: int
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # distributed.env, exported by the job script before training
    extra: dict[str, str | bool] = field(default_factory=dict)  # sbatch option -> value (True: a bare flag)
    container: ContainerSpec | None = None  # slurm.container, when an image is set

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def folder(self) -> str:
        """submitit's folder: job scripts, pickles and the Slurm logs, inside the experiment."""
        return os.path.join(self.save_dir, "slurm")


def resolve(config: Config) -> SlurmResources:
    """Check the `slurm` section and resolve its defaults; raises `ConfigError` naming every bad key."""
    slurm = config.slurm
    errors: list[str] = []

    def bad(key: str, why: str) -> None:
        errors.append(f"{config.source.where('slurm.' + key)}: slurm.{key}: {why}")

    save_dir = os.path.abspath(config.training.checkpoint.save_dir)
    if _CONTROL.search(save_dir):
        where = config.source.where("training.checkpoint.save_dir")
        errors.append(
            f"{where}: training.checkpoint.save_dir: got {save_dir!r}; a path with newlines or control "
            "characters cannot be passed to Slurm safely. Choose another path."
        )
    job_name = slurm.job_name if slurm.job_name is not None else os.path.basename(save_dir.rstrip("/"))
    if not job_name.strip():
        bad("job_name", "must not be empty.")
    elif _CONTROL.search(job_name):
        bad("job_name", f"got {job_name!r}: a job name must be one line without control characters.")
    time_text = str(slurm.time)  # a bare number is minutes, as for sbatch
    time_s = parse_duration(time_text)
    if time_s is None:
        bad(
            "time",
            f"got {time_text!r}; expected a Slurm time limit: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
            "D-HH:MM:SS (minutes and seconds below 60), e.g. 4:00:00 or 2-00:00:00.",
        )
    elif time_s <= 0:
        bad("time", f"got {time_text!r}; the time limit must be positive.")
    elif slurm.signal_lead_s >= time_s:
        bad(
            "signal_lead_s",
            f"got {slurm.signal_lead_s} s, but slurm.time is only {time_s} s: the save signal would come "
            "before the job could train. Lower signal_lead_s or raise slurm.time.",
        )
    if slurm.signal_lead_s > 65535:
        bad("signal_lead_s", f"got {slurm.signal_lead_s}; Slurm accepts at most 65535 seconds.")
    if slurm.mem is not None and not _MEM.fullmatch(slurm.mem):
        bad("mem", f"got {slurm.mem!r}; expected a size such as 32G, 500M or 64000 (megabytes).")
    for key in ("partition", "account", "qos"):
        value = getattr(slurm, key)
        if value is not None and not _NAME_LIST.fullmatch(value):
            bad(
                key,
                f"got {value!r}; expected a Slurm name (letters, digits, _ . - ; a comma-separated list).",
            )
    if slurm.constraint is not None and not _CONSTRAINT.fullmatch(slurm.constraint):
        bad(
            "constraint",
            f"got {slurm.constraint!r}; expected node features joined by & | , (no spaces), e.g. a100&ib.",
        )
    setup: list[str] = []
    for index, line in enumerate(slurm.setup):
        if _CONTROL.search(line):
            bad(
                f"setup[{index}]",
                f"got {line!r}: one shell line per item (no newlines or control characters).",
            )
        elif line.strip():
            setup.append(line)
    extra = _check_extra(slurm.sbatch_extra, bad)
    container = check_container(config, save_dir, bad)
    if errors:
        raise ConfigError("invalid slurm settings:\n  " + "\n  ".join(errors))
    assert time_s is not None
    default_tasks = slurm.gpus_per_node if slurm.gpus_per_node > 0 else 1
    return SlurmResources(
        save_dir=save_dir,
        job_name=job_name,
        nodes=slurm.nodes,
        tasks_per_node=slurm.tasks_per_node or default_tasks,
        time=time_text,
        time_min=-(-time_s // 60),
        signal_lead_s=slurm.signal_lead_s,
        max_requeues=slurm.max_requeues,
        gpus_per_node=slurm.gpus_per_node,
        cpus_per_task=slurm.cpus_per_task,
        mem=slurm.mem,
        partition=slurm.partition,
        account=slurm.account,
        qos=slurm.qos,
        constraint=slurm.constraint,
        setup=tuple(setup),
        env=tuple(config.distributed.env.items()),
        extra=extra,
        container=container,
    )


def check_container(config: Config, save_dir: str, bad: Callable[[str, str], None]) -> ContainerSpec | None:
    """`slurm.container` -> a `ContainerSpec` (None without an image). Paths that the runtimes' mount syntax
    cannot carry (`:` separates source, target and mode; pyxis and Apptainer join mounts with `,`) are
    refused, as are images and paths that would not stay one word on one line."""
    container = config.slurm.container
    if container.image is None:
        return None
    image = container.image
    if not image.strip() or _CONTROL.search(image) or re.search(r"\s", image) or image.startswith("-"):
        bad(
            "container.image",
            f"got {image!r}; expected one image reference without spaces or control characters, e.g. "
            "nvcr.io#nvidia/pytorch:24.01-py3 (pyxis), /images/tsdia.sif (apptainer), localhost/tsdia:cpu (podman).",
        )
    for what, path in (("training.checkpoint.save_dir", save_dir), ("the working directory", os.getcwd())):
        if _MOUNT_BAD.search(path):
            bad(
                "container.image",
                f"{what} {path!r} is mounted into the container, and a path with ':' or ',' cannot be "
                "written in a mount list. Choose a path without them.",
            )
    mounts: list[Mount] = []
    for index, raw in enumerate(container.mounts):
        mount = _parse_mount(raw)
        if isinstance(mount, str):
            bad(f"container.mounts[{index}]", f"got {raw!r}: {mount}")
        else:
            mounts.append(mount)
    return ContainerSpec(image=image, runtime=container.runtime, mounts=tuple(mounts))


def _parse_mount(raw: str) -> Mount | str:
    """`HOST`, `HOST:CONTAINER` or `HOST:CONTAINER:ro|rw` -> a Mount, or why it is not one."""
    if _CONTROL.search(raw) or "," in raw:
        return "a mount must be one line without ',' (pyxis and Apptainer separate mounts with commas)."
    parts = raw.split(":")
    if len(parts) > 3 or not all(parts):
        return "expected HOST, HOST:CONTAINER or HOST:CONTAINER:ro|rw (no ':' inside a path)."
    mode = parts[2] if len(parts) == 3 else None
    if mode not in (None, "ro", "rw"):
        return f"unknown mount mode {mode!r}; use ro or rw."
    target = parts[1] if len(parts) > 1 else None
    if target is not None and not target.startswith("/"):
        return f"the container path {target!r} must be absolute."
    source = os.path.abspath(parts[0])  # relative to where tsdia-submit runs, as the job's --chdir
    return Mount(source, target or source, mode)


def check_line(what: str, value: str) -> None:
    """Refuse a value (a path, an argument) that would not stay on one line of a script."""
    if _CONTROL.search(value):
        raise ConfigError(
            f"{what}: got {value!r}; newlines and control characters cannot go into an sbatch script."
        )


def _check_extra(options: dict[str, str], bad: Callable[[str, str], None]) -> dict[str, str | bool]:
    extra: dict[str, str | bool] = {}
    for raw_key, value in options.items():
        key = raw_key.lstrip("-").replace("_", "-")
        where = f"sbatch_extra.{raw_key}"
        if not _OPTION_KEY.fullmatch(key):
            bad(where, f"{raw_key!r} is not an sbatch option name (letters, digits and -, e.g. mail-type).")
        elif key in RESERVED_OPTIONS:
            bad(where, f"--{key} is set by tsdia; use {RESERVED_OPTIONS[key]}.")
        elif _CONTROL.search(value):
            bad(where, f"got {value!r}: an sbatch value must be one line without control characters.")
        else:
            # An empty value is a bare flag such as --exclusive.
            extra[key] = value if value != "" else True
    return extra
