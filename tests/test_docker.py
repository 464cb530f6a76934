"""The CPU image of docker/: built with docker/build.sh, run with docker/run.sh (podman here).

Skipped unless root with podman or apt-get (see conftest_docker.skip_reason). Cold, the image build takes
about 4 minutes on 2 cores; with podman's layer cache, seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest_docker import Image, tsdia_image  # noqa: F401 - the session fixture
from conftest_slurm import TINY, assert_layout

pytestmark = [pytest.mark.slow, pytest.mark.container]


def test_image_has_cpu_torch_and_tsdia(tsdia_image: Image) -> None:  # noqa: F811
    code = (
        "import torch, accelerate, deepspeed, submitit, tsdia, tsdia.train; "
        "assert torch.__version__.endswith('+cpu'), torch.__version__; "
        "assert not torch.cuda.is_available(); print('OK', torch.__version__)"
    )
    done = tsdia_image.run("python", "-c", code)
    assert done.returncode == 0 and "OK " in done.stdout, done.stdout + done.stderr


def test_config_tests_pass_inside_the_image(tsdia_image: Image) -> None:  # noqa: F811
    # The entrypoint runs `pytest -q tests/test_config.py` for an argument under tests/.
    done = tsdia_image.run("tests/test_config.py", "-p", "no:cacheprovider")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_training_in_the_container_lands_on_the_host(tsdia_image: Image, tmp_path: Path) -> None:  # noqa: F811
    exp = tmp_path / "experiments"
    args = ["tsdia-train", "configs/example.yml", "training.checkpoint.save_dir=/experiments/run1", *TINY]
    done = tsdia_image.run(*args, exp=exp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run1 = exp / "run1"
    assert_layout(run1, world_size=1)
    assert all(p.stat().st_uid == os.getuid() for p in [run1, *run1.rglob("*")])
    before = sorted(str(p) for p in run1.rglob("*"))
    again = tsdia_image.run(*args, exp=exp)
    assert again.returncode == 2, again.stdout + again.stderr
    assert "Checkpoint directory already exists!" in again.stdout + again.stderr
    assert sorted(str(p) for p in run1.rglob("*")) == before


def test_image_installs_tsdia_as_users_do_and_renders_every_template(tsdia_image: Image) -> None:  # noqa: F811
    # Not editable: the package (and its sbatch templates) live in the venv, and a submit from a directory
    # outside /opt/tsdia renders every kind of script.
    script = (
        "set -e; cd /tmp; cp /opt/tsdia/configs/example.yml config.yml; "
        "python -c 'import tsdia; print(\"FILE\", tsdia.__file__)'; "
        "for args in 'single' 'multi slurm.nodes=2' 'requeue' 'single slurm.container.image=/i.sif'; do "
        "  tsdia-submit --config config.yml training.checkpoint.save_dir=/tmp/exp --emit-sbatch $args >out.sbatch; "
        "  grep -q '^#SBATCH --job-name=' out.sbatch; grep -q '^srun ' out.sbatch; echo \"OK $args\"; "
        "done; test ! -e /tmp/exp"
    )
    done = tsdia_image.run("sh", "-c", script)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FILE /opt/venv/lib/" in done.stdout, done.stdout
    assert done.stdout.count("OK ") == 4, done.stdout


def test_entrypoint_trains_with_config_option(tsdia_image: Image) -> None:  # noqa: F811
    # `IMAGE --config CONFIG ...` is tsdia-train (not pytest's options): a bad key is its usage error.
    done = tsdia_image.run("--config", "configs/example.yml", "training.epochz=1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "tsdia-train: error: invalid config" in done.stderr and "epochz" in done.stderr, done.stderr
