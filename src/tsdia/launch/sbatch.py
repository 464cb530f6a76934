"""sbatch text: submitit's script (what `tsdia-submit` submits) and the packaged `templates/*.sbatch` scripts.

The templates are package data (`tsdia/launch/templates/`, read with `importlib.resources`), so a wheel or
`pip install .` finds them wherever it is installed; `slurm/templates/` in the repository is a byte-equal copy
for readers (tests/test_packaging.py keeps them equal).

Every config value placed in a script is shell-quoted with `shlex.quote` (sbatch parses `#SBATCH` lines
with the same quoting rules), after `tsdia.launch.resources` refused values no quoting can make valid.
`slurm.setup` lines are shell code by design; each is run through `eval` of its quoted text, so a line
with an unbalanced quote fails on its own instead of swallowing the rest of the script.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from tsdia.errors import ConfigError
from tsdia.launch.resources import SlurmResources

TEMPLATE_KINDS = ("single", "multi", "requeue")
# A directory of *.sbatch templates used instead of the packaged ones.
TEMPLATES_ENV = "TSDIA_SBATCH_TEMPLATES"
SUBMITIT_SIGNAL = "USR2"  # submitit's preemption/timeout signal (env SUBMITIT_PREEMPT_SIGNAL changes it)
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def setup_lines(setup: Sequence[str]) -> list[str]:
    """`slurm.setup` as script lines: each line runs in the batch shell (so `module load`, `source` and
    `export` take effect), but as one quoted word, so it cannot change how the lines after it parse."""
    return [f"eval {shlex.quote(line)}" for line in setup]


def script_setup(res: SlurmResources) -> list[str]:
    """The batch shell's set-up: `distributed.env` exported (so every task, and a container launched from
    the script, sees it; the trainer also sets it itself), then the `slurm.setup` lines."""
    exports = [f"export {name}={shlex.quote(value)}" for name, value in res.env]
    return exports + setup_lines(res.setup)


def submitit_command(folder: str, python: str = sys.executable) -> str:
    """The command submitit puts after `srun` (same text as `SlurmExecutor._submitit_command_str`)."""
    return " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(folder)])


def submitit_parameters(res: SlurmResources, cwd: str) -> dict[str, Any]:
    """`SlurmExecutor.update_parameters(**...)` for this job: the same for `--dry-run` and a real submit."""
    params: dict[str, Any] = {
        "job_name": res.job_name,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "time": res.time_min,  # submitit wants minutes (it also times its signal handler with them)
        "signal_delay_s": res.signal_lead_s,
    }
    if res.setup or res.env:
        params["setup"] = script_setup(res)
    optional = {
        "gpus_per_node": res.gpus_per_node or None,
        "cpus_per_task": res.cpus_per_task,
        "mem": res.mem,
        "partition": res.partition,
        "account": res.account,
        "qos": res.qos,
        "constraint": res.constraint,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    additional: dict[str, Any] = {"chdir": cwd}
    if res.max_requeues > 0:
        additional["requeue"] = True  # `scontrol requeue` (preemption, time limit) needs a requeueable job
    additional.update(res.extra)
    params["additional_parameters"] = additional
    return params


def render_submitit_script(
    res: SlurmResources, cwd: str, python: str = sys.executable, array: tuple[int, int] | None = None
) -> str:
    """The sbatch script `tsdia-submit` would submit, rendered by submitit itself (nothing is written).

    `array=(N, P)` renders a job array of N tasks, at most P running at once (a sweep). The one use of
    submitit's private `_make_sbatch_string` (what `SlurmExecutor` writes before `sbatch`);
    tests/test_contracts.py checks it against the installed submitit."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = submitit_parameters(res, cwd)
    if array is not None:
        params.update(map_count=array[0], array_parallelism=array[1])
    return str(_make_sbatch_string(command=submitit_command(res.folder, python), folder=res.folder, **params))


def template_text(name: str) -> tuple[str, str]:
    """The text of template `name` (e.g. `single.sbatch`) and where it was read (for messages).

    From `$TSDIA_SBATCH_TEMPLATES/<name>` when that is set, else from the package data."""
    override = os.environ.get(TEMPLATES_ENV)
    if override:
        path = Path(override) / name
        try:
            return path.read_text(), str(path)
        except OSError as err:
            raise ConfigError(
                f"cannot read the sbatch template {path}: {err.strerror}. {TEMPLATES_ENV}={override} must be a "
                f"directory holding {name}; unset it to use the templates installed with tsdia."
            ) from None
    resource = resources.files("tsdia.launch").joinpath("templates").joinpath(name)
    where = f"tsdia/launch/templates/{name}"
    try:
        return resource.read_text(encoding="utf-8"), where
    except OSError as err:
        raise ConfigError(
            f"cannot read the sbatch template {where} from the installed tsdia package: {err}. The "
            "installation is incomplete (templates are package data): reinstall tsdia, or set "
            f"{TEMPLATES_ENV} to a directory holding the templates."
        ) from None


def render_template(
    kind: str,
    res: SlurmResources,
    config_path: str,
    overrides: Sequence[str],
    cwd: str,
    python: str = sys.executable,
) -> str:
    """Fill the `<kind>.sbatch` template from the resolved config: a script for plain `sbatch`."""
    if kind not in TEMPLATE_KINDS:
        raise ConfigError(
            f"--emit-sbatch: unknown template {kind!r}; choose one of {', '.join(TEMPLATE_KINDS)}."
        )
    if kind == "single" and res.nodes > 1:
        raise ConfigError(
            f"--emit-sbatch single: the config asks for slurm.nodes={res.nodes}; the single-node template runs "
            "on one node. Use --emit-sbatch multi (or requeue), or set slurm.nodes=1."
        )
    template, where = template_text(f"{kind}.sbatch")
    train = [python, "-m", "tsdia.train", os.path.abspath(config_path), *overrides]
    values = {
        "sbatch_options": "\n".join(_template_options(kind, res, cwd)),
        "setup": "\n".join(script_setup(res)) or "# (none: slurm.setup is empty)",
        "train_command": " ".join(shlex.quote(arg) for arg in train),
        "signal": shlex.quote(SUBMITIT_SIGNAL),
    }
    return fill(template, values, where)


def fill(template: str, values: dict[str, str], name: str = "template") -> str:
    """Replace every `{{ key }}`; a placeholder without a value is an error, never left in the script."""
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise ConfigError(f"{name}: unknown placeholder(s) {', '.join(missing)}; known: {', '.join(values)}.")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def resource_options(res: SlurmResources) -> list[tuple[str, str | bool | int]]:
    """The resource requests of a plain sbatch script (name, shape, limits), in template order."""
    options: list[tuple[str, str | bool | int]] = [
        ("job-name", res.job_name),
        ("nodes", res.nodes),
        ("ntasks-per-node", res.tasks_per_node),
    ]
    if res.gpus_per_node:
        options.append(("gpus-per-node", res.gpus_per_node))
    if res.cpus_per_task is not None:
        options.append(("cpus-per-task", res.cpus_per_task))
    for key in ("mem", "partition", "account", "qos", "constraint"):
        value = getattr(res, key)
        if value is not None:
            options.append((key, value))
    options.append(("time", res.time))
    return options


def _template_options(kind: str, res: SlurmResources, cwd: str) -> list[str]:
    options = resource_options(res)
    options += [
        ("chdir", cwd),
        # Relative to --chdir: the experiment directory does not exist before the job starts.
        ("output", "%x-%j.out"),
    ]
    if kind == "requeue":
        # B: signals the batch shell only; its trap forwards the signal to the training step.
        options += [
            ("signal", f"B:{SUBMITIT_SIGNAL}@{res.signal_lead_s}"),
            ("requeue", True),
            ("open-mode", "append"),
        ]
    options += sorted(res.extra.items())
    return [sbatch_flag(key, value) for key, value in options]


def sbatch_flag(key: str, value: str | bool | int) -> str:
    """One `#SBATCH` line; the value is shell-quoted (sbatch unquotes it like a shell would)."""
    if value is True:
        return f"#SBATCH --{key}"
    return f"#SBATCH --{key}={shlex.quote(str(value))}"
