"""Sweeps without Slurm: values, member names, sweep files, all-or-nothing claims, dry run, --local."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import EXAMPLE, REPO, quiet_env, run_train, tree
from tsdia.errors import CheckpointDirectoryExistsError, ConfigError
from tsdia.launch import sweep

TINY = [
    "dataset.num_train=64",
    "dataset.num_val=32",
    "training.batch_size=16",
    "training.epochs=1",
    "training.logging.wandb=false",
    "training.logging.progress_bar=false",
    "model.num_layers=1",
]


def submit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = quiet_env(cwd)
    env["PATH"] = "/usr/bin:/bin"  # no sbatch: --dry-run and --local need no Slurm
    return subprocess.run(
        [sys.executable, "-m", "tsdia.launch.submit", str(EXAMPLE), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("1e-3,3e-4", ["1e-3", "3e-4"]),
        ("[0.9,0.95],[0.9,0.98]", ["[0.9,0.95]", "[0.9,0.98]"]),
        ("'a,b',c", ["'a,b'", "c"]),
        ('{x: 1, y: 2},"q,r"', ["{x: 1, y: 2}", '"q,r"']),
    ],
)
def test_values_split_on_top_level_commas(text: str, values: list[str]) -> None:
    assert sweep.split_values(text) == values


def test_members_are_the_product_with_readable_unique_names() -> None:
    axes = sweep.parse_axes(
        ["training.optimizer.lr=1e-3,3e-4", "training.seed=1,2", "training.optimizer.betas=[0.9,0.95]"], None
    )
    members = sweep.expand(axes)
    assert [m.name for m in members] == [
        "lr=1e-3,seed=1,betas=0.9,0.95",
        "lr=1e-3,seed=2,betas=0.9,0.95",
        "lr=3e-4,seed=1,betas=0.9,0.95",
        "lr=3e-4,seed=2,betas=0.9,0.95",
    ]
    assert members[3].overrides() == [
        "training.optimizer.lr=3e-4",
        "training.seed=2",
        "training.optimizer.betas=[0.9,0.95]",
    ]
    clash = sweep.expand(sweep.parse_axes(["training.optimizer.lr=1,2", "training.scheduler.lr=3"], None))
    assert [m.name for m in clash] == ["optimizer.lr=1,scheduler.lr=3", "optimizer.lr=2,scheduler.lr=3"]
    odd = sweep.expand(sweep.parse_axes(["model.encoder=a/b,a:b"], None))
    assert [m.name for m in odd] == ["encoder=a_b", "encoder=a_b-2"]  # filesystem-safe and unique


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["training.seed"], "expected KEY=V1,V2"),
        (["training.seed=1,,2"], "an empty value"),
        (["training.seed=1,1"], "listed twice"),
        (["training.seed=1", "training.seed=2"], "swept twice"),
    ],
)
def test_bad_sweep_options(options: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sweep.parse_axes(options, None)


def test_sweep_file(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yml"
    path.write_text(
        "sweep:\n  training.optimizer.lr: [0.001, 0.0003]\n  training.optimizer.betas: [[0.9, 0.95]]\n"
    )
    axes = sweep.parse_axes(["training.seed=1,2"], str(path))
    assert [(a.key, a.values) for a in axes] == [
        ("training.optimizer.lr", ["0.001", "0.0003"]),
        ("training.optimizer.betas", ["[0.9, 0.95]"]),
        ("training.seed", ["1", "2"]),
    ]
    path.write_text("sweep: [1, 2]\n")
    with pytest.raises(ConfigError, match="expected a 'sweep:' mapping"):
        sweep.parse_axes([], str(path))


def test_a_bad_member_names_itself_and_nothing_is_created(tmp_path: Path) -> None:
    done = submit(
        f"training.checkpoint.save_dir={tmp_path / 'sw'}",
        "--sweep",
        "training.optimizer.lr=1e-3,-1",
        "--dry-run",
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "sweep member 1 (lr=-1)" in done.stderr and "training.optimizer.lr" in done.stderr
    assert not (tmp_path / "sw").exists()


def test_dry_run_prints_members_and_the_array_script(tmp_path: Path) -> None:
    done = submit(
        f"training.checkpoint.save_dir={tmp_path / 'sw'}",
        "--sweep",
        "training.optimizer.lr=1e-3,3e-4",
        "--sweep",
        "training.seed=1,2",
        "--parallel",
        "2",
        "--dry-run",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "lr=3e-4,seed=2" in done.stdout and "#SBATCH --array=0-3%2" in done.stdout
    assert "#SBATCH --job-name=sw" in done.stdout
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing


def test_claims_are_all_or_nothing_and_racing_sweeps_have_one_winner(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sw"
    members = sweep.expand(sweep.parse_axes(["training.seed=1,2,3"], None))
    prepared = sweep.prepare(str(EXAMPLE), [], str(sweep_dir), members, "sw")
    (sweep_dir / members[1].name).mkdir(parents=True)  # one member directory is already there
    before = tree(tmp_path)
    with pytest.raises(CheckpointDirectoryExistsError):
        sweep.claim_all(str(sweep_dir), prepared, None, str(EXAMPLE), "slurm", None)
    assert tree(tmp_path) == before
    (sweep_dir / members[1].name).rmdir()
    sweep_dir.rmdir()

    results: list[object] = []

    def race() -> None:
        try:
            results.append(sweep.claim_all(str(sweep_dir), prepared, None, str(EXAMPLE), "slurm", None))
        except CheckpointDirectoryExistsError as err:
            results.append(err)

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, list)]
    assert len(winners) == 1 and len(winners[0]) == 3
    assert sorted(p.name for p in sweep_dir.iterdir()) == sorted(m.name for m in members)


@pytest.mark.slow
def test_local_sweep_members_equal_the_same_runs_alone(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sw"
    done = submit(
        f"training.checkpoint.save_dir={sweep_dir}",
        *TINY,
        "--sweep",
        "training.seed=1,2",
        "--local",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [m["name"] for m in record["members"]] == ["seed=1", "seed=2"]
    assert "seed=2: COMPLETED" in done.stdout
    alone = tmp_path / "alone"
    ref = run_train(tmp_path, *TINY, "training.seed=2", f"training.checkpoint.save_dir={alone}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    final = "checkpoint-epoch0-step4/model.safetensors"
    a, b = load_file(str(alone / final)), load_file(str(sweep_dir / "seed=2" / final))
    assert all(a[k].equal(b[k]) for k in a)

    again = submit(
        f"training.checkpoint.save_dir={sweep_dir}",
        "training.checkpoint.resume=latest",
        *TINY,
        "--sweep",
        "training.seed=1,2,3",
        "--local",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert (
        "sweep member 2 (seed=3)" in again.stderr and "member 0" not in again.stderr
    )  # only the new one ran
    assert not list((sweep_dir / "seed=1" / "logs").glob("training_resume_*"))


def test_readme_documents_sweeps() -> None:
    readme = (REPO / "README.md").read_text()
    assert "## Sweeps" in readme and "--sweep" in readme
