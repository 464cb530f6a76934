"""The distributed start-up check and `distributed.env`: config errors, job scripts, a rank that never joins."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLE, REPO, quiet_env
from test_submit_render import render
from tsdia.config import load_config
from tsdia.errors import EXIT_USAGE, ConfigError

ENV = 'distributed.env={NCCL_SOCKET_IFNAME: "ib0", NCCL_IB_DISABLE: 1, NCCL_DEBUG: WARN}'


def test_env_values_become_strings(tmp_path: Path) -> None:
    config = load_config(str(EXAMPLE), ["training.checkpoint.save_dir=x", ENV])
    assert config.distributed.env == {
        "NCCL_SOCKET_IFNAME": "ib0",
        "NCCL_IB_DISABLE": "1",
        "NCCL_DEBUG": "WARN",
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distributed.env=[NCCL_DEBUG]", "expected a mapping of variable names"),
        ("distributed.env={NCCL-DEBUG: x}", "'NCCL-DEBUG' is not an environment variable name"),
        (
            "distributed.env={NCCL_IB_DISABLE: true}",
            "NCCL_IB_DISABLE: got True (a boolean); expected a string",
        ),
        ("distributed.env={NCCL_DEBUG: null}", "NCCL_DEBUG: got None (null)"),
        ("distributed.env={MASTER_PORT: 1234}", "MASTER_PORT is set by tsdia from the launcher"),
        ("training.watchdog.timeout_s=0", "training.watchdog.timeout_s: got 0.0; must be greater than 0"),
        ("training.watchdog.min_timeout_s=-5", "training.watchdog.min_timeout_s: got -5.0; must be greater"),
        ("training.watchdog.enabled=maybe", "training.watchdog.enabled: got 'maybe' (a string)"),
        ("training.watchdog.timeout=5", "unknown key 'training.watchdog.timeout'. Did you mean 'timeout_s'?"),
    ],
)
def test_bad_values_name_the_key_and_where(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(str(EXAMPLE), ["training.checkpoint.save_dir=x", override])
    text = str(err.value)
    assert message in text, text
    assert f"override '{override}'" in text  # where the value came from (file:line for a file)


def test_bad_env_in_a_file_points_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text(
        "training:\n  checkpoint:\n    save_dir: x\ndistributed:\n  env:\n    NCCL_DEBUG: WARN\n    OK: [1]\n"
    )
    with pytest.raises(ConfigError, match=rf"{path}:5: distributed.env: OK: got \[1\] \(a list\)"):
        load_config(str(path))


@pytest.mark.parametrize(
    "mode", [["--dry-run"], ["--emit-sbatch", "requeue"], ["--dry-run", "slurm.container.image=img"]]
)
def test_env_is_exported_by_the_job_script(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: list[str]
) -> None:
    text = render(tmp_path, capsys, *mode, ENV, 'slurm.setup=["module load nccl"]')
    exports = "export NCCL_SOCKET_IFNAME=ib0\nexport NCCL_IB_DISABLE=1\nexport NCCL_DEBUG=WARN\n"
    assert exports in text
    assert text.index("export NCCL_DEBUG=WARN") < text.index("module load nccl")  # before the user's setup


def test_podman_passes_env_into_the_container(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = render(
        tmp_path, capsys, "--dry-run", ENV, "slurm.container.image=img", "slurm.container.runtime=podman"
    )
    assert "-e NCCL_SOCKET_IFNAME" in text and "-e NCCL_DEBUG" in text


TIMEOUT = ["distributed.timeout_s=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_rank(tmp_path: Path, rank: int, port: int, save_dir: Path) -> subprocess.CompletedProcess[str]:
    """Rank `rank` of a 2-rank run, started alone: the other rank never comes."""
    env = quiet_env(tmp_path)
    env.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tsdia.train",
            str(EXAMPLE),
            f"training.checkpoint.save_dir={save_dir}",
            *TIMEOUT,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # far below torch's own 10-minute default: the 4 s timeout is what ends it
    )


@pytest.mark.slow
def test_rank_zero_names_the_rank_that_did_not_arrive(tmp_path: Path) -> None:
    port = free_port()
    save_dir = tmp_path / "exp"
    done = one_rank(tmp_path, 0, port, save_dir)
    assert done.returncode == EXIT_USAGE, done.stderr[-3000:]
    assert (
        f"rank(s) 1 of 2 did not arrive at the rendezvous 127.0.0.1:{port} within distributed.timeout_s=4 s"
        in done.stderr
    )
    assert "Traceback" not in done.stderr
    assert not save_dir.exists()  # nothing half-made: the check comes before the experiment directory


@pytest.mark.slow
def test_a_rank_that_cannot_reach_rank_zero_says_where_it_tried(tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    done = one_rank(tmp_path, 1, port, tmp_path / "exp")
    assert done.returncode == EXIT_USAGE, done.stderr[-3000:]
    assert (
        "rank 1 " in done.stderr and f"could not reach rank 0's rendezvous at 127.0.0.1:{port}" in done.stderr
    )
    assert "within distributed.timeout_s=4 s" in done.stderr and "Traceback" not in done.stderr
    assert "c10d" not in done.stderr  # torch's own retry noise never starts: we probe the port first


def test_hyperparameters_record_the_env() -> None:
    from tsdia.training.artifacts import hyperparameters

    config = load_config(str(EXAMPLE), ["training.checkpoint.save_dir=x", ENV])
    data = hyperparameters(
        config,
        world_size=1,
        steps_per_epoch=1,
        total_steps=1,
        zero_stage=None,
        num_parameters=1,
        code_path=REPO,
    )
    assert json.loads(json.dumps(data))["distributed_env"]["NCCL_IB_DISABLE"] == "1"
