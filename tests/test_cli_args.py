"""The command line of tsdia-train, `python -m tsdia.train` and tsdia-submit: CONFIG or --config/-c CONFIG."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLE, REPO, quiet_env
from tsdia.launch.submit import parse
from tsdia.parse_args import build_arg_parser, config_and_overrides, unified_parser

SAVE = "training.checkpoint.save_dir=/tmp/x"


def train_args(argv: list[str]) -> tuple[str, list[str]]:
    parser = build_arg_parser()
    args = config_and_overrides(parser, parser.parse_intermixed_args(argv))
    return args.config, args.overrides


@pytest.mark.parametrize(
    "argv",
    [
        ["cfg.yml", SAVE, "a.b=1"],
        ["--config", "cfg.yml", SAVE, "a.b=1"],
        ["-c", "cfg.yml", SAVE, "a.b=1"],
        ["--config=cfg.yml", SAVE, "a.b=1"],
        [SAVE, "--config", "cfg.yml", "a.b=1"],
        [SAVE, "a.b=1", "-c", "cfg.yml", "--debug"],
    ],
)
def test_config_positional_or_option(argv: list[str]) -> None:
    assert train_args(argv) == ("cfg.yml", [SAVE, "a.b=1"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["a.yml", "--config", "b.yml"], "the config file is given twice: 'a.yml' and --config 'b.yml'"),
        (["--config", "b.yml", "a.yml", SAVE], "the config file is given twice"),
        ([], "a config file is required: CONFIG or --config CONFIG"),
        (["--debug"], "a config file is required"),
    ],
)
def test_config_twice_or_missing_is_a_usage_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(argv)  # tsdia-submit's parser applies the same rule


def test_submit_accepts_config_among_its_options() -> None:
    args = parse(["--dry-run", SAVE, "-c", "cfg.yml"])
    assert (args.config, args.overrides, args.dry_run) == ("cfg.yml", [SAVE], True)
    args = parse([SAVE, "--emit-sbatch", "--config", "cfg.yml"])
    assert (args.config, args.overrides, args.emit_sbatch) == ("cfg.yml", [SAVE], "auto")
    args = parse(["--emit-sbatch", "requeue", "--config", "cfg.yml"])
    assert (args.config, args.overrides, args.emit_sbatch) == ("cfg.yml", [], "requeue")


def test_unified_parser_reads_the_config_given_with_option(tmp_path: Path) -> None:
    config, path = unified_parser(["--config", str(EXAMPLE), f"training.checkpoint.save_dir={tmp_path}"])
    assert path == str(EXAMPLE)
    assert config.training.checkpoint.save_dir == str(tmp_path)


@pytest.mark.parametrize("module", ["tsdia.train", "tsdia.launch.submit"])
def test_entry_points_read_the_file_named_by_config(module: str, tmp_path: Path) -> None:
    # A config with a mistake on a known line: the message proves which file was read, without training.
    bad = tmp_path / "bad.yml"
    bad.write_text(EXAMPLE.read_text().replace("  epochs: 4\n", "  epochz: 4\n"))
    line = bad.read_text().splitlines().index("  epochz: 4") + 1
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            module,
            "--config",
            str(bad),
            f"training.checkpoint.save_dir={tmp_path / 'e'}",
        ],
        cwd=REPO,
        env=quiet_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{bad}:{line}" in done.stderr and "epochz" in done.stderr, done.stderr
    assert not (tmp_path / "e").exists()
