"""A resume compares its config with the experiment's: safe changes apply, the others are refused.

Every changed key falls in one class (`classify`):

- `safe`: logging, intervals, `max_steps`, validation and checkpoint options, `slurm.*`, trackers, data
  loading: applied, listed in the attempt's log and recorded in `logs/config_resume_N.yml`;
- `tied`: the saved training state (optimizer, schedule, batch geometry, seed, data, precision) was made
  under the old value: refused unless `training.checkpoint.resume_policy: override`;
- `incompatible`: the model (parameter shapes) or the optimizer's kind: refused, always.

The experiment's config is the newest one recorded (`logs/config_resume_N.yml`, else `config.yml`), so a
change applied at one resume is not reported again at the next. Torch-free: rank 0 runs it inside the
directory decision, before anything is written.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tsdia.config.schema import Config, ConfigSource
from tsdia.errors import ConfigError
from tsdia.experiment.layout import CONFIG_FILE, LOGS_DIR

SAFE, TIED, INCOMPATIBLE, IGNORED = "safe", "tied", "incompatible", "ignored"
WORLD_SIZE_KEY = "world size"  # a pseudo key: the number of processes, not a config value
_RESUME_CONFIG = re.compile(r"^config_resume_(\d+)\.yml$")
_UNSET = "(unset)"

# Longest matching prefix wins; a prefix matches the key itself and everything under it.
_RULES: dict[str, str] = {
    # What the resume itself is made of, not part of the run.
    "training.checkpoint.resume": IGNORED,
    "training.checkpoint.resume_policy": IGNORED,
    "training.checkpoint.save_dir": IGNORED,
    "training.init_from": IGNORED,  # applies at step 0 only; a resume loads its own checkpoint
    # Safe: they change what is logged, saved or checked, or how data is loaded, not what is trained.
    "training.checkpoint": SAFE,
    "training.logging": SAFE,
    "training.validation": SAFE,
    "training.max_steps": SAFE,
    "training.preemption": SAFE,
    "training.watchdog": SAFE,
    "training.early_stopping": SAFE,
    "training.num_workers": SAFE,  # per-sample seeding makes the weights independent of the workers
    "training.dataloader": SAFE,  # workers, pinning, prefetching: how fast, not what
    "slurm": SAFE,
    "distributed.env": SAFE,
    "distributed.timeout_s": SAFE,
    "distributed.backend": SAFE,
    # Tied to the saved state: the optimizer and scheduler states, the data position and the schedule.
    "training.optimizer": TIED,
    "training.scheduler": TIED,
    "training.epochs": TIED,  # the schedule is defined over the epochs
    "training.batch_size": TIED,
    "training.gradient_accumulation_steps": TIED,
    "training.seed": TIED,
    "training.max_grad_norm": TIED,
    "training.mixed_precision": TIED,
    "training.ema": TIED,
    "training.dataloader.seed_samples": TIED,  # the samples' random numbers
    "training.dataloader.sample_rngs": TIED,
    "training.dataloader.drop_last": TIED,  # the batches per epoch: the schedule and the data position
    "distributed.deepspeed": TIED,
    "dataset": TIED,  # other data is another run
    WORLD_SIZE_KEY: TIED,
    # Incompatible: the checkpoint cannot be loaded into it (or its optimizer state means nothing).
    "model": INCOMPATIBLE,
    "training.optimizer.name": INCOMPATIBLE,
    "training.optimizer.target": INCOMPATIBLE,
}


def classify(key: str) -> str:
    """The class of a changed dotted key. Keys no rule names are `tied`: refusing is the safe default."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        rule = _RULES.get(".".join(parts[:end]))
        if rule is not None:
            return rule
    return TIED


@dataclass
class Change:
    """One changed key: its class, the recorded and the new value (as text) and where it was set."""

    key: str
    kind: str
    old: str
    new: str
    where: str = ""

    def line(self) -> str:
        return f"{self.key}: {self.old} -> {self.new}"


@dataclass
class ConfigChange:
    """The outcome of the comparison: broadcast to every rank with the decision."""

    base: str  # the recorded config compared against (relative to save_dir)
    policy: str  # training.checkpoint.resume_policy
    changes: list[Change] = field(default_factory=list)
    old_world_size: int | None = None
    new_world_size: int | None = None

    def of_kind(self, kind: str) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]

    @property
    def overridden(self) -> list[Change]:
        """The tied changes applied under `resume_policy: override` (empty when refused or none)."""
        return self.of_kind(TIED) if self.policy == "override" else []

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfigChange:
        changes = [Change(**c) for c in data.get("changes", [])]
        return cls(**{**data, "changes": changes})


def compare_on_resume(
    config: Config,
    save_dir: str | Path,
    world_size: int | None,
    old_world_size: int | None,
    neutral: Collection[str] = (),
) -> ConfigChange | None:
    """Compare `config` with the experiment's newest recorded config; raise `ConfigError` on a refusal.

    `old_world_size` is the number of processes the resumed checkpoint was saved by (None: unknown, or
    no checkpoint); `neutral` are component keys declared safe (`neutral_component_keys`). Returns None
    when the experiment has no recorded config to compare with.
    """
    root = Path(save_dir)
    base = latest_recorded_config(root)
    if base is None:
        return None
    policy = config.training.checkpoint.resume_policy
    old = recorded_values(base)
    new = flatten(config.to_dict())
    changes = [
        Change(
            key, kind, _show(old.get(key, _UNSET)), _show(new.get(key, _UNSET)), _where(config.source, key)
        )
        for key in sorted(set(old) | set(new))
        if old.get(key, _UNSET) != new.get(key, _UNSET)
        and (kind := SAFE if _under(key, neutral) else classify(key)) != IGNORED
    ]
    if old_world_size is not None and world_size is not None and old_world_size != world_size:
        changes.append(Change(WORLD_SIZE_KEY, TIED, str(old_world_size), str(world_size), "the launcher"))
    report = ConfigChange(str(base.relative_to(root)), policy, changes, old_world_size, world_size)
    refusal = refusal_message(report)
    if refusal:
        raise ConfigError(refusal)
    return report


def neutral_component_keys(config: Config) -> set[str]:
    """`model.X` / `dataset.X` keys their component declares safe to change on resume.

    A model or dataset factory may list, in a `resume_neutral_kwargs` attribute, keyword arguments
    that do not change what is trained: a data root that moved, a cache path, a profiling or debugging
    switch. Imports the component's module (the trainer has imported it already); one that cannot be
    imported declares nothing (building it reports that error).
    """
    keys: set[str] = set()
    for section in ("model", "dataset"):
        component = getattr(config, section)
        module_name, _, attribute = component.target.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError, ValueError):
            continue
        keys |= {f"{section}.{name}" for name in getattr(target, "resume_neutral_kwargs", ())}
    return keys


def _under(key: str, prefixes: Collection[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def refusal_message(report: ConfigChange) -> str | None:
    """The error for incompatible changes, or tied ones without `override`; None when the resume may go on."""
    incompatible, tied = report.of_kind(INCOMPATIBLE), report.of_kind(TIED)
    if incompatible:
        lines = [f"  {_located(c)}" for c in incompatible]
        return (
            f"training.checkpoint.resume: the config changes the model (or the optimizer's kind) since "
            f"{report.base}, so this experiment's checkpoints cannot be resumed with it:\n"
            + "\n".join(lines)
            + "\nRevert these keys to resume, or start a new experiment (another training.checkpoint.save_dir)."
        )
    if tied and report.policy != "override":
        lines = [f"  {_located(c)}" for c in tied]
        return (
            f"training.checkpoint.resume: the config changes what the saved training state was made with "
            f"(recorded in {report.base}); resuming would keep the checkpoint's values:\n"
            + "\n".join(lines)
            + "\nEither set training.checkpoint.resume_policy=override to apply the new values after loading "
            "(exact resume is then no longer claimed), or start a new experiment (another "
            "training.checkpoint.save_dir) with training.init_from=<checkpoint> to begin from these weights."
        )
    return None


def log_lines(report: ConfigChange) -> list[str]:
    """What the attempt's log says about the changes (rank 0 prints them)."""
    safe, overridden = report.of_kind(SAFE), report.overridden
    if not (safe or overridden):
        return []
    lines = [f"Config changed since {report.base}:"]
    lines += [f"  {c.line()}  (applied)" for c in safe]
    lines += [f"  {c.line()}  (resume_policy: override)" for c in overridden]
    if overridden:
        lines.append(
            "resume_policy: override: the new values take effect after loading the checkpoint; "
            "exact resume is no longer claimed."
        )
    return lines


def resume_config_path(save_dir: str | Path, resume_index: int) -> Path:
    """`logs/config_resume_N.yml`: the effective config of resumed attempt N, when it changed anything."""
    return Path(save_dir) / LOGS_DIR / f"config_resume_{resume_index}.yml"


def render_resume_config(config: Config, report: ConfigChange, resume_index: int) -> str:
    """The attempt's effective config (every key, defaults filled in), headed by what changed."""
    import yaml

    header = [f"# Effective config of resumed attempt {resume_index}; changed since {report.base}:"]
    header += [f"#   {c.line()}  ({c.kind})" for c in report.of_kind(SAFE) + report.overridden]
    header.append(f"# resume_policy: {report.policy}")
    if report.new_world_size is not None:
        header.append(f"# world size: {report.new_world_size}")
    body = yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    return "\n".join(header) + "\n" + body


def saved_world_size(save_dir: str | Path, checkpoint: str | None) -> int | None:
    """The number of processes that saved `checkpoint`: its trainer state, else hyperparameters.json.

    Checkpoints older than the `world_size` trainer-state field fall back to the experiment's first
    attempt; None when neither says (or there is no checkpoint: then no saved state depends on it).
    """
    if checkpoint is None:
        return None
    from tsdia.experiment.checkpoints import TRAINER_STATE

    for path in (Path(checkpoint) / TRAINER_STATE, Path(save_dir) / "hyperparameters.json"):
        try:
            value = json.loads(path.read_text()).get("world_size")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int) and value > 0:
            return value
    return None


def latest_recorded_config(root: Path) -> Path | None:
    """The newest `logs/config_resume_N.yml`, else `config.yml`; None when neither exists."""
    found = [
        (int(m.group(1)), p)
        for p in (root / LOGS_DIR).glob("config_resume_*.yml")
        if (m := _RESUME_CONFIG.match(p.name))
    ]
    if found:
        return max(found)[1]
    path = root / CONFIG_FILE
    return path if path.is_file() else None


def recorded_values(path: Path) -> dict[str, Any]:
    """A recorded config as dotted keys with every default filled in.

    A record an older tsdia wrote may no longer validate (a key since renamed or removed): its keys are
    then laid over the defaults as they are, so each difference is still reported, never skipped.
    """
    from tsdia.config.loader import config_from_dict
    from tsdia.config.yaml_source import parse_yaml

    text = path.read_text()
    positions: dict[str, str] = {}
    raw = parse_yaml(text, str(path), positions=positions)
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the experiment's recorded config is not a mapping, so a changed config cannot be "
            "detected on resume; restore the file (or start a new experiment)."
        )
    try:
        source = ConfigSource(path=str(path), text=text, raw=raw, positions=positions)
        return flatten(config_from_dict(_with_save_dir(raw, path), source).to_dict())
    except ConfigError:
        return {**flatten(Config().to_dict()), **flatten(raw)}


def _with_save_dir(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """`raw` with a save_dir (required to validate; never compared), when it has none."""
    training = raw.get("training")
    checkpoint = training.get("checkpoint") if isinstance(training, dict) else None
    if isinstance(checkpoint, dict) and checkpoint.get("save_dir"):
        return raw
    return {
        **raw,
        "training": {
            **(training if isinstance(training, dict) else {}),
            "checkpoint": {
                **(checkpoint if isinstance(checkpoint, dict) else {}),
                "save_dir": str(path.parent),
            },
        },
    }


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys; lists and scalars are values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def _show(value: Any) -> str:
    if isinstance(value, str) and value != _UNSET:
        return repr(value)
    return "null" if value is None else str(value)


def _where(source: ConfigSource, key: str) -> str:
    """`file:line` (or the override) that set `key`; "" for a default."""
    return source.positions.get(key, "")


def _located(change: Change) -> str:
    return f"{change.line()}" + (f"  ({change.where})" if change.where else "")


def check_resume_at_submit(config: Config, save_dir: str | Path, world_size: int) -> None:
    """tsdia-submit's look at a resume: refuse now what the job would refuse after waiting in the queue.

    The same comparison as the job's, against the checkpoint the job would resume. Components are
    imported (for their `resume_neutral_kwargs`) only when a `model.*`/`dataset.*` change would otherwise
    be refused, so a plain submit stays free of torch. Other refusals (no checkpoint, a directory in use)
    are left to the directory checks that follow.
    """
    from tsdia.errors import TsdiaError
    from tsdia.experiment.decision import decide

    resume = config.training.checkpoint.resume
    if resume is None:
        return
    try:
        decision = decide(str(save_dir), resume)
    except TsdiaError:
        return
    if not decision.resume_from:
        return
    old_world = saved_world_size(save_dir, decision.resume_from)
    try:
        compare_on_resume(config, save_dir, world_size, old_world)
    except ConfigError:
        compare_on_resume(config, save_dir, world_size, old_world, neutral_component_keys(config))
