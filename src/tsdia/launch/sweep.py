"""Sweeps: many experiments from one `tsdia-submit`, claimed all or nothing and submitted as one job array.

    tsdia-submit CONFIG training.checkpoint.save_dir=runs/lr-sweep \\
        --sweep training.optimizer.lr=1e-3,3e-4 --sweep training.seed=1,2 [--parallel 4]

`save_dir` becomes the sweep directory: `sweep.json` (the command, every member, the array job ids) and one
complete tsdia experiment per member, named from its swept values (`lr=1e-3,seed=1`). Every member's config
is checked before anything is created; then the sweep directory and every member directory are claimed
(of racing sweep submits exactly one wins); then one `sbatch --array` queues them all. Re-submitting with
`training.checkpoint.resume=latest` queues only the members that have not completed (and members for
values added since).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tsdia.config.loader import ConfigTemplate
from tsdia.config.schema import Config
from tsdia.config.yaml_source import parse_yaml
from tsdia.errors import CheckpointDirectoryExistsError, ConfigError, ExperimentInUseError, TsdiaError
from tsdia.experiment import claim as claims
from tsdia.experiment.layout import SWEEP_FILE
from tsdia.experiment.progress import read_progress
from tsdia.experiment.weight_files import check_init_from
from tsdia.fileio import atomic_write_text
from tsdia.launch.resources import SlurmResources, resolve
from tsdia.slurm_commands import ACTIVE_STATES, Runner, _run, query_jobs

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,@-]+")


@dataclass
class Axis:
    """One swept key and its values, as text (each parsed like an override value)."""

    key: str
    values: list[str]


@dataclass
class Member:
    """One experiment of a sweep."""

    index: int
    name: str  # the member's directory name, from its swept values
    values: dict[str, str]  # swept key -> value text
    save_dir: str = ""
    job_id: str | None = None

    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.values.items()]


@dataclass
class Sweep:
    """`sweep.json`: what was swept, every member, and the array jobs that ran them."""

    save_dir: str
    config: str
    overrides: list[str]
    axes: list[Axis]
    members: list[Member]
    parallel: int | None = None
    command: list[str] = field(default_factory=list)
    array_job_ids: list[str] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)  # when each array was submitted

    def write(self) -> None:
        atomic_write_text(Path(self.save_dir) / SWEEP_FILE, json.dumps(asdict(self), indent=2))


def read_sweep(save_dir: str | Path) -> Sweep | None:
    """The sweep recorded in `save_dir`, or None when it is not a sweep directory."""
    try:
        data = json.loads((Path(save_dir) / SWEEP_FILE).read_text())
        data["axes"] = [Axis(**a) for a in data["axes"]]
        data["members"] = [Member(**m) for m in data["members"]]
        return Sweep(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def split_values(text: str) -> list[str]:
    """`a,[b,c],'d,e'` -> ['a', '[b,c]', "'d,e'"]: commas inside brackets, braces or quotes stay."""
    values, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_axes(options: Sequence[str], sweep_file: str | None) -> list[Axis]:
    """`--sweep KEY=V1,V2,...` options (and a `sweep:` section from `--sweep-file`) -> axes, in order."""
    axes: list[Axis] = []
    if sweep_file:
        axes.extend(_axes_from_file(sweep_file))
    for option in options:
        key, sep, text = option.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ConfigError(
                f"--sweep {option!r}: expected KEY=V1,V2,... e.g. training.optimizer.lr=1e-3,3e-4"
            )
        values = split_values(text)
        if any(not v for v in values):
            raise ConfigError(
                f"--sweep {option!r}: an empty value (two commas in a row, or a trailing comma)"
            )
        axes.append(Axis(key, values))
    seen: set[str] = set()
    for axis in axes:
        if axis.key in seen:
            raise ConfigError(
                f"--sweep: {axis.key} is swept twice; give all its values in one --sweep option"
            )
        seen.add(axis.key)
        if len(set(axis.values)) != len(axis.values):
            raise ConfigError(f"--sweep {axis.key}: a value is listed twice ({', '.join(axis.values)})")
    return axes


def _axes_from_file(path: str) -> list[Axis]:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"--sweep-file {path}: cannot read it: {err.strerror}") from None
    data = parse_yaml(text, path)
    sweep = data.get("sweep") if isinstance(data, dict) else None
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError(f"{path}: expected a 'sweep:' mapping of dotted keys to lists of values")
    axes = []
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: sweep.{key}: expected a non-empty list of values, got {values!r}")
        texts = [
            yaml.safe_dump(v, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()
            for v in values
        ]
        axes.append(Axis(str(key), texts))
    return axes


def expand(axes: list[Axis]) -> list[Member]:
    """The Cartesian product of the axes (the first axis outermost), each member named from its values."""
    combos = [
        dict(zip([a.key for a in axes], values, strict=True))
        for values in itertools.product(*(a.values for a in axes))
    ]
    labels = _short_labels([a.key for a in axes])
    names: set[str] = set()
    members = []
    for index, combo in enumerate(combos):
        name = ",".join(
            f"{labels[key]}={value.strip('[]{}' + chr(34) + chr(39))}" for key, value in combo.items()
        )
        name = _UNSAFE.sub("_", name).strip("._") or f"member{index}"
        base, n = name, 1
        while name in names:  # two values that read alike once made safe
            n += 1
            name = f"{base}-{n}"
        names.add(name)
        members.append(Member(index, name, combo))
    return members


def _short_labels(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key, or more of it where two keys would read alike."""
    labels = {}
    for key in keys:
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):
            label = ".".join(parts[-depth:])
            if sum(1 for other in keys if other.split(".")[-depth:] == parts[-depth:]) == 1:
                break
        labels[key] = label
    return labels


@dataclass
class Prepared:
    """A member ready to claim and submit: its checked config and job resources."""

    member: Member
    config: Config
    res: SlurmResources
    overrides: list[str]


def prepare(
    config_path: str, overrides: Sequence[str], sweep_dir: str, members: list[Member], group: str
) -> list[Prepared]:
    """Load and check every member's config (the file is parsed once); a bad one names the member."""
    template = ConfigTemplate(config_path).extended(overrides)  # the common overrides parsed once
    prepared = []
    for member in members:
        member.save_dir = str(Path(sweep_dir) / member.name)
        own = [
            *member.overrides(),
            f"training.checkpoint.save_dir={member.save_dir}",
            f"training.logging.wandb_group={group}",
        ]
        member_overrides = [*overrides, *own]
        try:
            config = template.with_overrides(own)
            res = resolve(config)
            check_init_from(config)
        except ConfigError as err:
            raise ConfigError(f"sweep member {member.index} ({member.name}): {err}") from None
        prepared.append(Prepared(member, config, res, member_overrides))
    return prepared


def completed(member: Member) -> bool:
    """The member's run finished (its progress record says so)."""
    progress = read_progress(Path(member.save_dir))
    return progress is not None and progress.state == "finished"


def claim_all(
    sweep_dir: str,
    prepared: list[Prepared],
    resume: str | None,
    config_path: str,
    executor: str,
    job_is_active: Any,
) -> list[claims.Claim]:
    """Claim the sweep directory and every member, or nothing at all."""
    root = Path(sweep_dir)
    made: list[claims.Claim] = []
    created_root = False
    member: Member | None = None
    try:
        if resume is None:
            try:
                root.parent.mkdir(parents=True, exist_ok=True)
                root.mkdir()  # the claim of the sweep: exactly one of several racing submits gets here
            except FileExistsError:
                raise CheckpointDirectoryExistsError(sweep_dir) from None
            except OSError as err:
                raise ConfigError(
                    f"training.checkpoint.save_dir: cannot create {sweep_dir}: {err.strerror}"
                ) from None
            created_root = True
        for p in prepared:
            member = p.member
            resume_member = resume if Path(member.save_dir).exists() else None  # a value added since
            made.append(
                claims.claim_for_submit(
                    member.save_dir, resume_member, config_path, p.overrides, executor, job_is_active
                )
            )
    except BaseException as err:
        for claim in reversed(made):
            claim.release()
        if created_root:
            shutil.rmtree(root, ignore_errors=True)
        if (
            member is not None
            and isinstance(err, TsdiaError)
            and not isinstance(err, CheckpointDirectoryExistsError)
        ):
            raise type(err)(f"sweep member {member.index} ({member.name}): {err}") from None
        raise
    return made


def check_resumable(sweep: Sweep, run: Runner = _run) -> None:
    """A sweep is re-submitted only once none of its members' jobs is queued or running (one squeue)."""
    job_ids = [m.job_id for m in sweep.members if m.job_id]
    jobs = query_jobs(job_ids, run) if job_ids else {}
    if jobs is None:
        raise ExperimentInUseError(
            f"{sweep.save_dir}: cannot ask Slurm whether the sweep's jobs are still queued or running; "
            "try again once squeue answers."
        )
    active = sorted(job for job, info in jobs.items() if info.state in ACTIVE_STATES)
    if active:
        raise ExperimentInUseError(
            f"{sweep.save_dir}: members are still queued or running ({', '.join(active)}). Wait for them to "
            f"end (tsdia status {sweep.save_dir}) or cancel them (scancel {' '.join(active)}) before "
            "re-submitting the sweep."
        )


def merge_members(previous: Sweep, axes: list[Axis]) -> tuple[list[Axis], list[Member]]:
    """On re-submission: the previous axes with any added values; members keep their index and name."""
    if [a.key for a in axes] != [a.key for a in previous.axes]:
        raise ConfigError(
            f"{previous.save_dir} sweeps {', '.join(a.key for a in previous.axes)}; a re-submission must sweep the same "
            "keys (values may be added). Start a new sweep directory for other keys."
        )
    merged = [
        Axis(a.key, a.values + [v for v in b.values if v not in a.values])
        for a, b in zip(previous.axes, axes, strict=True)
    ]
    old = {tuple(m.values.items()): m for m in previous.members}
    members = []
    next_index = max((m.index for m in previous.members), default=-1) + 1
    for member in expand(merged):
        known = old.get(tuple(member.values.items()))
        if known is not None:
            member.index, member.name = known.index, known.name
        else:
            member.index, next_index = next_index, next_index + 1
        members.append(member)
    return merged, sorted(members, key=lambda m: m.index)


def member_table(members: list[Member], base: str) -> str:
    rows = [["index", "directory", *[k for k in (members[0].values if members else {})]]]
    for m in members:
        rows.append([str(m.index), str(Path(base) / m.name), *m.values.values()])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
