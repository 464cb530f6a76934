"""tsdia-submit without a cluster: golden sbatch text, quoting of hostile values, refusals, the light import path."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest_slurm import EXAMPLE, TINY, assert_golden, assert_layout, normalize, run_submit, submit_env
from tsdia.errors import CheckpointDirectoryExistsError
from tsdia.experiment import claim as claims
from tsdia.launch.submit import main
from tsdia.slurm_commands import wait_for_job

FULL = [
    "slurm.nodes=2",
    "slurm.tasks_per_node=4",
    "slurm.gpus_per_node=4",
    "slurm.cpus_per_task=8",
    "slurm.mem=64G",
    "slurm.partition=gpu,gpu-long",
    "slurm.account=proj_1",
    "slurm.qos=high",
    "slurm.constraint=a100&ib",
    "slurm.time=2-00:00:00",
    "slurm.job_name=my run",
    "slurm.signal_lead_s=300",
    "slurm.max_requeues=3",
    'slurm.setup=["module load cuda/12.1", "source /opt/venv/bin/activate"]',
    'slurm.sbatch_extra={mail-type: END, exclusive: ""}',
]


CONTAINER = [
    "slurm.container.image=/images/tsdia.sif",
    'slurm.container.mounts=["/data/ami:/data:ro", "scratch", "/opt/cache:/cache:rw"]',
]


def render(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run tsdia-submit in-process from tmp_path; return its stdout, normalized for golden files."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main([str(EXAMPLE), f"training.checkpoint.save_dir={tmp_path / 'exp'}", *args])
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    assert code == 0, err
    return normalize(out, tmp_path)


@pytest.mark.parametrize(
    ("golden", "args"),
    [
        ("dry_run_default.sbatch", ["--dry-run"]),
        ("dry_run_full.sbatch", ["--dry-run", *FULL]),
        ("emit_single.sbatch", ["--emit-sbatch", "single", "training.epochs=2"]),
        ("emit_multi.sbatch", ["--emit-sbatch", "multi", *FULL]),
        ("emit_requeue.sbatch", ["--emit-sbatch", "requeue", *FULL]),
        ("dry_run_pyxis.sbatch", ["--dry-run", *FULL, *CONTAINER, "slurm.container.runtime=pyxis"]),
        ("dry_run_apptainer.sbatch", ["--dry-run", *FULL, *CONTAINER, "slurm.container.runtime=apptainer"]),
        ("dry_run_podman.sbatch", ["--dry-run", *CONTAINER, "slurm.container.runtime=podman"]),
        ("emit_pyxis.sbatch", ["--emit-sbatch", "slurm.container.image=nvcr.io#nvidia/pytorch:24.01-py3"]),
    ],
)
def test_rendered_scripts_match_golden(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], golden: str, args: list[str]
) -> None:
    text = render(tmp_path, capsys, *args)
    assert_golden(golden, text)
    assert sorted(os.listdir(tmp_path)) == [], "rendering must write nothing"


def test_emit_sbatch_default_kind_follows_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `--emit-sbatch` without a kind must not swallow the override after it.
    text = render(tmp_path, capsys, "--emit-sbatch", "slurm.nodes=2")
    assert "#SBATCH --nodes=2" in text and "several nodes" in text


def test_scripts_are_valid_bash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runtimes = (
        [mode, *FULL, *CONTAINER, f"slurm.container.runtime={runtime}"]
        for mode in ("--dry-run", "--emit-sbatch")
        for runtime in ("pyxis", "apptainer", "podman")
    )
    for args in (
        ["--dry-run", *FULL],
        *(["--emit-sbatch", k, *FULL] for k in ("multi", "requeue")),
        *runtimes,
    ):
        script = tmp_path / "job.sh"
        script.write_text(render(tmp_path, capsys, *args))
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        script.unlink()


HOSTILE_NAME = "$(touch PWNED_NAME) `touch PWNED_TICK` x'; touch PWNED_QUOTE; echo '"
HOSTILE_OVERRIDE = "training.logging.run_name=$(touch PWNED_OVERRIDE)'\"; touch PWNED_OVERRIDE2"


def fake_srun(tmp_path: Path) -> dict[str, str]:
    """A PATH whose `srun` records its arguments instead of starting anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "srun.args")}


@pytest.mark.parametrize("kind", ["--dry-run", "single", "requeue"])
def test_hostile_values_are_quoted_never_executed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    mode = ["--dry-run"] if kind == "--dry-run" else ["--emit-sbatch", kind]
    setup = 'slurm.setup=["echo \'unbalanced", "touch SETUP_AFTER_BAD_LINE"]'
    text = render(work, capsys, *mode, f"slurm.job_name={json.dumps(HOSTILE_NAME)}", setup, HOSTILE_OVERRIDE)
    assert f"--job-name={shlex.quote(HOSTILE_NAME)}" in text
    script = work / "job.sh"
    script.write_text(text.replace("{TMP}", str(work)).replace("{PYTHON}", shlex.quote(sys.executable)))
    done = subprocess.run(
        ["bash", str(script)], cwd=work, env=fake_srun(work), capture_output=True, text=True
    )
    assert not list(work.glob("PWNED*")), f"a config value was executed:\n{done.stdout}{done.stderr}"
    srun_args = (work / "srun.args").read_text().splitlines() if (work / "srun.args").exists() else []
    if kind == "--dry-run":
        # No `set -e` in submitit's script: the bad line fails alone, the next line and the command still run.
        assert (work / "SETUP_AFTER_BAD_LINE").exists()
        assert srun_args[-3:] == ["-m", "submitit.core._submit", str(work / "exp" / "slurm")]
    else:
        # The templates stop at a failing setup line (set -e) instead of training in a broken environment.
        assert done.returncode != 0 and not srun_args


def test_hostile_override_reaches_the_trainer_verbatim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = render(tmp_path, capsys, "--emit-sbatch", "single", HOSTILE_OVERRIDE)
    (tmp_path / "job.sh").write_text(
        text.replace("{TMP}", str(tmp_path)).replace("{REPO}", str(EXAMPLE.parents[1]))
    )
    subprocess.run(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, env=fake_srun(tmp_path), check=True)
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[-1] == HOSTILE_OVERRIDE and not list(tmp_path.glob("PWNED*"))


HOSTILE_IMAGE = "img$(touch${IFS}PWNED_IMAGE)`touch${IFS}PWNED_TICK`'x'"
HOSTILE_MOUNT = "/data/$(touch PWNED_MOUNT) a'b"


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer", "podman"])
def test_container_values_are_quoted_never_executed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], runtime: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    text = render(
        work,
        capsys,
        "--dry-run",
        f"slurm.container.image={json.dumps(HOSTILE_IMAGE)}",
        f"slurm.container.runtime={runtime}",
        f"slurm.container.mounts=[{json.dumps(HOSTILE_MOUNT)}]",
        HOSTILE_OVERRIDE,
    )
    (work / "exp").mkdir()
    script = work / "job.sh"
    script.write_text(text.replace("{TMP}", str(work)))
    env = {**fake_srun(work), "SLURM_JOB_ID": "7"}
    done = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not list(work.glob("PWNED*")), f"a config value was executed:\n{done.stdout}{done.stderr}"
    args = (work / "srun.args").read_text().splitlines()
    assert args[-1] == HOSTILE_OVERRIDE
    assert f"{HOSTILE_MOUNT}:{HOSTILE_MOUNT}" in "\n".join(args)
    assert HOSTILE_IMAGE in args or f"--container-image={HOSTILE_IMAGE}" in args
    train = args.index("tsdia-train")
    assert args[train + 1] == str(work / "exp" / "slurm" / "config-XXXXXXXX.yml")


def test_container_paths_that_mount_lists_cannot_carry_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for save_dir in (tmp_path / "a,b", tmp_path / "a:b"):
        code = main(
            [str(EXAMPLE), f"training.checkpoint.save_dir={save_dir}", "slurm.container.image=x", "--dry-run"]
        )
        out, err = capsys.readouterr()
        assert code == 2 and not out and "slurm.container.image" in err and "':' or ','" in err, err
    # A newline inside a mount (from a config file; on the command line any newline is refused first).
    config = tmp_path / "c.yml"
    config.write_text(EXAMPLE.read_text() + 'slurm:\n  container:\n    image: x\n    mounts: ["/a\\nb:/d"]\n')
    code = main([str(config), f"training.checkpoint.save_dir={tmp_path / 'exp'}", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 2 and not out and "slurm.container.mounts[0]" in err and "c.yml:" in err, err


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("slurm.time=abc", "slurm.time"),
        ("slurm.time=1:75:00", "slurm.time"),
        ("slurm.time=2-25", "slurm.time"),
        ("slurm.mem=lots", "slurm.mem"),
        ('slurm.mem="32 G"', "slurm.mem"),
        ('slurm.partition="gpu; rm -rf ~"', "slurm.partition"),
        ("slurm.constraint=a100 ib", "slurm.constraint"),
        ('slurm.job_name="a\\nb"', "slurm.job_name"),
        ('slurm.job_name=""', "slurm.job_name"),
        ('slurm.setup=["module load x\\nrm -rf ~"]', "slurm.setup[0]"),
        ("slurm.sbatch_extra={output: /tmp/x}", "slurm.sbatch_extra.output"),
        ('slurm.sbatch_extra={"bad key": x}', "slurm.sbatch_extra.bad key"),
        ('slurm.sbatch_extra={mail-type: "END\\n#SBATCH --x"}', "slurm.sbatch_extra.mail-type"),
        ("slurm.signal_lead_s=600", "slurm.signal_lead_s"),
        ('slurm.container.image="foo.sif\nrm -rf ~"', "slurm.container.image"),
        ('slurm.container.image="a b.sif"', "slurm.container.image"),
        ("slurm.container.image=--privileged", "slurm.container.image"),
        ('slurm.container.mounts=["/data,/etc:/etc"]', "slurm.container.mounts[0]"),
        ('slurm.container.mounts=["/data:relative"]', "slurm.container.mounts[0]"),
        ('slurm.container.mounts=["/data:/data:rx"]', "slurm.container.mounts[0]"),
        ('slurm.container.mounts=["/a:/b:ro:x"]', "slurm.container.mounts[0]"),
    ],
)
def test_invalid_sbatch_values_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, key: str
) -> None:
    extra = ['slurm.time="10"'] if "signal_lead_s" in override else []
    if "container.mounts" in override:
        extra.append("slurm.container.image=img.sif")
    for mode in ("--dry-run", "--emit-sbatch"):
        code = main(
            [str(EXAMPLE), f"training.checkpoint.save_dir={tmp_path / 'exp'}", override, *extra, mode]
        )
        out, err = capsys.readouterr()
        assert code == 2 and not out
        assert key in err and "Traceback" not in err, err
    assert not (tmp_path / "exp").exists()


def test_dry_run_refuses_an_existing_directory_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "exp").mkdir()
    code = main([str(EXAMPLE), f"training.checkpoint.save_dir={tmp_path / 'exp'}", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 2 and not out
    assert str(CheckpointDirectoryExistsError(str(tmp_path / "exp"))) in err
    assert list((tmp_path / "exp").iterdir()) == []


def test_config_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    done = run_submit(str(EXAMPLE), "training.bogus=1", "--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and "unknown key 'training.bogus'" in done.stderr
    assert "Traceback" not in done.stderr
    debug = run_submit(str(EXAMPLE), "training.bogus=1", "--dry-run", "--debug", cwd=tmp_path)
    assert "Traceback" in debug.stderr


def test_submit_path_does_not_import_torch(tmp_path: Path) -> None:
    code = f"""
import sys
from tsdia.launch.submit import main
from submitit import LocalExecutor, SlurmExecutor
args = [{str(EXAMPLE)!r}, "training.checkpoint.save_dir={tmp_path / "exp"}"]
assert main([*args, "--dry-run"]) == 0 and main([*args, "--emit-sbatch", "requeue"]) == 0
assert main([*args, "slurm.container.image=img", "--dry-run"]) == 0
heavy = sorted(m for m in ("torch", "accelerate", "deepspeed", "wandb", "tensorboard") if m in sys.modules)
print("HEAVY", heavy, file=sys.stderr)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stderr, done.stderr


def test_racing_claims_exactly_one_wins(tmp_path: Path) -> None:
    save_dir = str(tmp_path / "exp")
    results: list[object] = []

    def attempt() -> None:
        try:
            results.append(claims.claim_for_submit(save_dir, None, str(EXAMPLE), [], "slurm"))
        except CheckpointDirectoryExistsError as err:
            results.append(err)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, claims.Claim)]
    assert len(winners) == 1 and len(results) == 8
    owner = json.loads((tmp_path / "exp" / ".tsdia-owner.json").read_text())
    assert owner["claim_token"] == winners[0].token and owner["job_id"] is None
    winners[0].record_job("123")
    assert json.loads((tmp_path / "exp" / ".tsdia-owner.json").read_text())["job_id"] == "123"
    winners[0].release()
    assert not (tmp_path / "exp").exists()


def test_resume_submit_checks_target_and_restores_owner(tmp_path: Path) -> None:
    from tsdia.errors import CheckpointError, ExperimentInUseError

    save_dir = tmp_path / "exp"
    with pytest.raises(CheckpointError, match="does not exist"):
        claims.claim_for_submit(str(save_dir), str(tmp_path / "nope"), str(EXAMPLE), [], "slurm")
    assert not save_dir.exists()
    save_dir.mkdir()
    (save_dir / "stray.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a tsdia experiment"):
        claims.claim_for_submit(str(save_dir), "latest", str(EXAMPLE), [], "slurm")
    (save_dir / "logs").mkdir()
    (save_dir / ".tsdia-owner.json").write_text(json.dumps({"claim_token": "old", "job_id": "7"}))
    with pytest.raises(ExperimentInUseError, match="scancel 7"):
        claims.claim_for_submit(
            str(save_dir), "latest", str(EXAMPLE), [], "slurm", job_is_active=lambda job: True
        )
    claim = claims.claim_for_submit(
        str(save_dir), "latest", str(EXAMPLE), [], "slurm", job_is_active=lambda job: False
    )
    assert json.loads((save_dir / ".tsdia-owner.json").read_text())["claim_token"] == claim.token
    claim.release()
    assert json.loads((save_dir / ".tsdia-owner.json").read_text())["claim_token"] == "old"
    assert (save_dir / "stray.txt").exists()


def test_wait_follows_requeues_until_a_final_state() -> None:
    states = iter(["PENDING", "RUNNING", "PENDING", "RUNNING", "COMPLETING", "COMPLETED"])
    seen: list[str] = []

    def scontrol(cmd: list[str]) -> str | None:
        return f"JobId=5 JobName=x JobState={next(states)} Reason=None ExitCode=0:0"

    assert wait_for_job("5", seen.append, poll_s=0, run=scontrol, sleep=lambda s: None) == (
        "COMPLETED",
        "0:0",
    )
    assert seen == ["PENDING", "RUNNING", "PENDING", "RUNNING", "COMPLETING", "COMPLETED"]


@pytest.mark.slow
def test_local_runs_the_same_job_without_slurm(tmp_path: Path) -> None:
    save_dir = tmp_path / "exp"
    done = run_submit(
        str(EXAMPLE),
        f"training.checkpoint.save_dir={save_dir}",
        *TINY,
        "slurm.tasks_per_node=2",
        "--local",
        cwd=tmp_path,
        env=submit_env(tmp_path),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert_layout(save_dir, world_size=2)
    assert json.loads((save_dir / ".tsdia-owner.json").read_text())["executor"] == "local"
    again = run_submit(str(EXAMPLE), f"training.checkpoint.save_dir={save_dir}", "--local", cwd=tmp_path)
    assert again.returncode == 2 and "Checkpoint directory already exists!" in again.stderr
