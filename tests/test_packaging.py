"""tsdia installed the way users and images install it: a wheel in a fresh environment, run from elsewhere.

The wheel test builds the wheel from a copy of the checkout, installs it (without dependencies) into a new
venv whose only link to the test environment is a plain path to its site-packages, for torch and the other
dependencies (a path line in a `.pth` file does not run that directory's own `.pth` files, so the editable
install of the test environment cannot shadow the wheel), and runs the console scripts from a directory
outside the checkout.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import EXAMPLE, REPO, quiet_env
from conftest_slurm import TINY, assert_layout, run_submit

PACKAGED_TEMPLATES = REPO / "src" / "tsdia" / "launch" / "templates"
READABLE_TEMPLATES = REPO / "slurm" / "templates"
PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
# --ignore-installed: a tsdia seen in the linked directories is neither uninstalled nor taken instead.
PIP_INSTALL = ["-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed"]
CONTAINER = ["slurm.container.image=/images/tsdia.sif", "slurm.container.runtime=apptainer"]


def test_readable_templates_are_copies_of_the_packaged_ones() -> None:
    packaged = sorted(p.name for p in PACKAGED_TEMPLATES.glob("*.sbatch"))
    readable = sorted(p.name for p in READABLE_TEMPLATES.glob("*.sbatch"))
    assert packaged == ["container.sbatch", "multi.sbatch", "requeue.sbatch", "single.sbatch"]
    differ = [
        n for n in packaged if (PACKAGED_TEMPLATES / n).read_bytes() != (READABLE_TEMPLATES / n).read_bytes()
    ]
    if readable != packaged or differ:
        pytest.fail(
            "slurm/templates/ must be a byte-equal copy of src/tsdia/launch/templates/ (the source, shipped in "
            f"the package); different: {differ or 'the file lists'}. Edit the packaged templates, then run:\n"
            "    make templates",
            pytrace=False,
        )


def test_templates_env_replaces_the_packaged_templates(tmp_path: Path) -> None:
    own = tmp_path / "templates"
    own.mkdir()
    (own / "single.sbatch").write_text(
        "#!/bin/bash\n# site template\n{{ sbatch_options }}\nsrun {{ train_command }}\n"
    )
    env = {**quiet_env(tmp_path), "TSDIA_SBATCH_TEMPLATES": str(own)}
    save = f"training.checkpoint.save_dir={tmp_path / 'exp'}"
    done = run_submit(str(EXAMPLE), save, "--emit-sbatch", "single", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("#!/bin/bash\n# site template\n#SBATCH --job-name=")
    missing = run_submit(str(EXAMPLE), save, "--emit-sbatch", "requeue", cwd=tmp_path, env=env)
    assert missing.returncode == 2
    assert f"cannot read the sbatch template {own / 'requeue.sbatch'}" in missing.stderr
    assert "TSDIA_SBATCH_TEMPLATES" in missing.stderr and "unset it" in missing.stderr


@dataclass(frozen=True)
class Installed:
    venv: Path
    wheel: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def run(
        self, script: str, *args: str, cwd: Path, env: dict[str, str]
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / script), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )


def _check(done: subprocess.CompletedProcess[str], what: str) -> None:
    assert done.returncode == 0, (
        f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


def outside_env(tmp_path: Path) -> dict[str, str]:
    """A child's environment with nothing pointing into the checkout (no PYTHONPATH)."""
    env = quiet_env(tmp_path)
    env.pop("PYTHONPATH", None)
    env.pop("TSDIA_SBATCH_TEMPLATES", None)
    return env


def dependency_dirs() -> list[str]:
    """The test environment's package directories (torch, pip, ...), also when its venv sits inside the
    checkout (`make test` makes `.venv/` there). Listed in a .pth file they come after the new venv's own
    site-packages on its sys.path, and the .pth files inside them (the editable install's) are not run, so
    neither a tsdia installed in them (in an image) nor the checkout's src/ can shadow the wheel."""
    dirs = [*site.getsitepackages(), *(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))]
    return [p for p in dict.fromkeys(dirs) if Path(p).is_dir()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """`pip wheel` of a copy of the checkout, installed into a fresh venv."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # building in a copy leaves no build/ or *.egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = root / "dist"
    build = subprocess.run(
        [*PIP_WHEEL, "-w", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    _check(build, "pip wheel")
    (wheel,) = dist.glob("tsdia-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = {f"tsdia/launch/templates/{p.name}" for p in PACKAGED_TEMPLATES.glob("*.sbatch")} - names
    assert not missing, f"the wheel lacks package data {sorted(missing)}: see [tool.setuptools.package-data]"

    venv = root / "venv"
    _check(
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)],
            capture_output=True,
            text=True,
            timeout=120,
        ),
        "python -m venv",
    )
    (site_dir,) = venv.glob("lib/python*/site-packages")
    (site_dir / "test-environment.pth").write_text("".join(f"{p}\n" for p in dependency_dirs()))
    env = outside_env(root)
    install = subprocess.run(
        [str(venv / "bin" / "python"), *PIP_INSTALL, str(wheel)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    _check(install, "pip install (the wheel)")
    return Installed(venv, wheel)


@pytest.mark.slow
def test_wheel_installed_elsewhere_trains_and_renders_every_script(
    installed: Installed, tmp_path: Path
) -> None:
    work = tmp_path / "work"  # outside the checkout, and no path into it
    work.mkdir()
    assert REPO not in work.parents
    config = work / "config.yml"
    shutil.copy2(EXAMPLE, config)
    env = outside_env(tmp_path)

    where = subprocess.run(
        [str(installed.python), "-c", "import tsdia, tsdia.launch.sbatch as s; print(tsdia.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    _check(where, "import tsdia")
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where.stdout

    save_dir = work / "runs" / "exp"
    train = installed.run(
        "tsdia-train",
        "--config",
        "config.yml",
        f"training.checkpoint.save_dir={save_dir}",
        *TINY,
        cwd=work,
        env=env,
    )
    _check(train, "tsdia-train --config config.yml")
    assert "Done: 4 steps" in train.stdout
    assert_layout(save_dir, world_size=1)

    fresh = f"training.checkpoint.save_dir={work / 'runs' / 'next'}"
    cases = {
        "--dry-run": ["--dry-run"],
        "single": ["--emit-sbatch", "single"],
        "multi": ["--emit-sbatch", "multi", "slurm.nodes=2"],
        "requeue": ["--emit-sbatch", "requeue", "slurm.max_requeues=2"],
        "container --emit-sbatch": ["--emit-sbatch", *CONTAINER],
        "container --dry-run": ["--dry-run", *CONTAINER],
    }
    for name, args in cases.items():
        wheel_run = installed.run("tsdia-submit", "config.yml", fresh, *args, cwd=work, env=env)
        _check(wheel_run, f"tsdia-submit {name} (installed wheel)")
        assert "#SBATCH --job-name=" in wheel_run.stdout, wheel_run.stdout
        # The checkout's code renders the same script (up to the interpreter's path).
        tree_run = run_submit("config.yml", fresh, *args, cwd=work)
        _check(tree_run, f"tsdia-submit {name} (checkout)")
        assert wheel_run.stdout.replace(str(installed.python), sys.executable) == tree_run.stdout, name
    assert not (work / "runs" / "next").exists()
