"""Container jobs: the sbatch script that runs every task of a tsdia job inside `slurm.container.image`.

submitit pickles a function for the host's Python, which a container cannot run, so a container job is a
plain sbatch script (the packaged template `container.sbatch`), submitted with `sbatch --parsable`. Each srun task
runs `tsdia-train SNAPSHOT OVERRIDES...` inside the image, through the runtime named by
`slurm.container.runtime`:

  pyxis      srun --container-image=IMG --container-mounts=SRC:DST,... --container-workdir=CWD tsdia-train ...
  apptainer  srun apptainer exec [--nv] --bind SRC:DST,... --pwd CWD IMG tsdia-train ...
  podman     srun podman run --rm --network=host --ipc=host -v SRC:DST ... -e 'SLURM_*' ... IMG tsdia-train ...

Mounted at the same path inside: the working directory (the job's --chdir, so relative paths in the config mean
the same thing as outside, as Apptainer does by default), the experiment directory (it holds the config snapshot
and receives everything the run writes) and `slurm.container.mounts`. Every value is shell-quoted.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

from tsdia.cluster import CLAIM_TOKEN_VAR, SLURM_FROM_SCRIPT_VAR
from tsdia.errors import EXIT_REQUEUED
from tsdia.launch import sbatch
from tsdia.launch.resources import ContainerSpec, Mount, SlurmResources

TEMPLATE = "container.sbatch"
TRAIN = "tsdia-train"  # on the image's PATH (both tsdia images put their venv there)
# podman starts the container with the image's environment: these pass the host task's values through
# (a name ending in * passes every variable with that prefix; unset ones stay unset).
PODMAN_ENV = ("SLURM_*", "TSDIA_*", "MASTER_ADDR", "MASTER_PORT", "WANDB_*", "OMP_NUM_THREADS", "NCCL_*")
DRY_RUN_TOKEN = "X" * 32  # stands for the claim token that a real submit makes


def mounts(res: SlurmResources, spec: ContainerSpec, cwd: str, mount_root: str | None = None) -> list[Mount]:
    """Working directory, experiment directory (or `mount_root`), then the extra mounts; no duplicates."""
    wanted = [cwd] if cwd != "/" else []
    wanted.append(mount_root or res.save_dir)
    result: list[Mount] = []
    for mount in [Mount(path, path) for path in wanted] + list(spec.mounts):
        if all(m.target != mount.target for m in result):
            result.append(mount)
    return result


def launch_command(
    res: SlurmResources, spec: ContainerSpec, cwd: str, train: Sequence[str], mount_root: str | None = None
) -> str:
    """What follows `srun [options]` in the script: the runtime's command around `train`, shell-quoted."""
    q = shlex.quote
    binds = mounts(res, spec, cwd, mount_root)
    command = " ".join(q(arg) for arg in train)
    if spec.runtime == "pyxis":
        return (
            f"--container-image={q(spec.image)} "
            f"--container-mounts={q(','.join(m.spec() for m in binds))} "
            f"--container-workdir={q(cwd)} {command}"
        )
    if spec.runtime == "apptainer":
        nv = "--nv " if res.gpus_per_node > 0 else ""
        bind = q(",".join(m.spec() for m in binds))
        return f"apptainer exec {nv}--bind {bind} --pwd {q(cwd)} {q(spec.image)} {command}"
    if spec.runtime == "podman":
        words = ["podman run --rm --network=host --ipc=host --security-opt=label=disable"]
        words.append('${podman_user[@]+"${podman_user[@]}"}')  # set by the script: --userns=keep-id
        words += [f"-v {q(m.spec())}" for m in binds]
        words += [f"-e {q(name)}" for name in PODMAN_ENV]
        words += [f"-e {q(name)}" for name, _ in res.env]  # distributed.env, exported by the script
        if res.gpus_per_node > 0:
            words += ["--device=nvidia.com/gpu=all", "-e CUDA_VISIBLE_DEVICES"]
        words += [f"-w {q(cwd)}", q(spec.image), command]
        return " \\\n    ".join(words)
    raise ValueError(f"unknown container runtime {spec.runtime!r}")


def render_script(
    res: SlurmResources,
    spec: ContainerSpec,
    cwd: str,
    config_path: str,
    overrides: Sequence[str],
    token: str | None,
) -> str:
    """The container job script. With `token` (tsdia-submit): the directory is already claimed, logs go to
    `<save_dir>/slurm/`. Without (`--emit-sbatch`): the job claims it when it starts, so the experiment's
    parent directory is mounted (and created) instead, and Slurm's output goes to JOBNAME-JOBID.out."""
    train = [TRAIN, os.path.abspath(config_path), *overrides]
    if token is not None:
        mount_root = None
        output = os.path.join(res.folder, "%j_0_log")
        srun_options = (
            f"--output={shlex.quote(os.path.join(res.folder, '%j_%t_log.out'))} "
            f"--error={shlex.quote(os.path.join(res.folder, '%j_%t_log.err'))} "
        )
        claim = (
            "# The experiment directory was claimed by tsdia-submit; this token lets this job (and its reruns) in.\n"
            f"export {CLAIM_TOKEN_VAR}={shlex.quote(token)}"
        )
        log_options = [("output", output + ".out"), ("error", output + ".err")]
    else:
        mount_root = os.path.dirname(res.save_dir.rstrip("/")) or "/"
        srun_options = ""
        claim = (
            "# The experiment directory is claimed when the job starts (tsdia-submit claims it at submit time);\n"
            "# its parent is mounted into the container, so it must exist.\n"
            f"mkdir -p {shlex.quote(mount_root)}"
        )
        log_options = [("output", "%x-%j.out")]
    if spec.runtime == "podman":
        prelude = (
            "# podman: a non-root user runs rootless podman; keep-id keeps the experiment's files theirs.\n"
            "# podman's own settings come from the environment (e.g. CONTAINERS_CONF, exported before\n"
            "# submitting: sbatch passes the submitter's environment) or from slurm.setup.\n"
            "podman_user=()\n"
            'if [ "$(id -u)" -ne 0 ]; then podman_user=(--userns=keep-id); fi'
        )
    else:
        prelude = f"# {spec.runtime}: the job's environment (SLURM_*, {CLAIM_TOKEN_VAR}, ...) reaches the container."
    values = {
        "sbatch_options": "\n".join(_options(res, cwd, log_options)),
        "setup": "\n".join(sbatch.script_setup(res)) or "# (none: slurm.setup is empty)",
        "claim": claim,
        "runtime_setup": prelude,
        "srun_options": srun_options,
        "launch_command": launch_command(res, spec, cwd, train, mount_root),
        "signal": shlex.quote(sbatch.SUBMITIT_SIGNAL),
        "exit_requeued": str(EXIT_REQUEUED),
        "slurm_from_script": SLURM_FROM_SCRIPT_VAR,
        "runtime": spec.runtime,
    }
    template, where = sbatch.template_text(TEMPLATE)
    return sbatch.fill(template, values, where)


def _options(res: SlurmResources, cwd: str, log_options: list[tuple[str, str]]) -> list[str]:
    options: list[tuple[str, str | bool | int]] = [
        *sbatch.resource_options(res),
        ("chdir", cwd),
        *log_options,
        # B: signals the batch shell only; its trap forwards the signal to the training step.
        ("signal", f"B:{sbatch.SUBMITIT_SIGNAL}@{res.signal_lead_s}"),
        ("open-mode", "append"),
    ]
    if res.max_requeues > 0:
        options.append(("requeue", True))
    options += sorted(res.extra.items())
    return [sbatch.sbatch_flag(key, value) for key, value in options]
