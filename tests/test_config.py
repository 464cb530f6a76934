"""Config loading: schema, defaults, overrides and the messages for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tsdia.config import effective_yaml, load_config
from tsdia.errors import ConfigError

GOOD = """\
model:
  target: tsdia.examples.tsvad:TargetSpeakerVAD
  d_model: 32
dataset:
  target: tsdia.examples.tsvad:build_datasets
training:
  epochs: 2
  optimizer:
    lr: 1e-3
  checkpoint:
    save_dir: runs/a
"""


def write(tmp_path: Path, text: str, name: str = "c.yml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_good_config_defaults_and_types(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.training.epochs == 2
    assert config.training.optimizer.lr == 1e-3  # YAML 1.1 would read "1e-3" as a string
    assert config.training.batch_size == 32
    assert config.training.checkpoint.best_metric == "val_loss"
    assert config.model.kwargs == {"d_model": 32}
    assert config.source.where("training.epochs").endswith("c.yml:7")


def test_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    config = load_config(
        path, ["training.max_steps=12", "training.optimizer.betas=[0.8, 0.9]", "model.d_model=48"]
    )
    assert config.training.max_steps == 12
    assert config.training.optimizer.betas == [0.8, 0.9]
    assert config.model.kwargs["d_model"] == 48
    text = effective_yaml(config)
    assert "training.max_steps=12" in text
    again = load_config(write(tmp_path, text, "again.yml"))
    assert again.training.max_steps == 12 and again.model.kwargs["d_model"] == 48


def test_effective_yaml_is_the_file_without_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "# trailing comment\n")
    assert effective_yaml(load_config(path)) == Path(path).read_text()


BAD_CASES = [
    # (id, config text or None to use GOOD, overrides, expected fragments)
    (
        "unknown-top",
        GOOD + "trainer:\n  x: 1\n",
        [],
        ["c.yml:12", "unknown key 'trainer'", "Did you mean 'training'"],
    ),
    (
        "unknown-nested",
        GOOD.replace("epochs: 2", "epoch: 2"),
        [],
        ["c.yml:7", "'training.epoch'", "'epochs'"],
    ),
    (
        "unknown-deep",
        GOOD.replace("save_dir: runs/a", "save_dir: runs/a\n    intervall: 5"),
        [],
        ["c.yml:12", "training.checkpoint.intervall", "Did you mean 'interval'"],
    ),
    (
        "wrong-type",
        GOOD.replace("epochs: 2", "epochs: two"),
        [],
        ["c.yml:7", "training.epochs", "'two'", "integer"],
    ),
    ("bool-for-int", GOOD.replace("epochs: 2", "epochs: true"), [], ["training.epochs", "True", "integer"]),
    ("negative", GOOD.replace("epochs: 2", "epochs: -1"), [], ["training.epochs", "-1", "greater than 0"]),
    ("zero-interval", GOOD, ["training.checkpoint.interval=0"], ["override", "interval", "greater than 0"]),
    ("bad-choice", GOOD, ["training.mixed_precision=fp8"], ["mixed_precision", "'fp8'", "'bf16'"]),
    ("lr-zero", GOOD.replace("lr: 1e-3", "lr: 0"), [], ["training.optimizer.lr", "greater than 0"]),
    (
        "duplicate",
        GOOD.replace("epochs: 2", "epochs: 2\n  epochs: 3"),
        [],
        ["duplicate key 'training.epochs'", "c.yml:7"],
    ),
    (
        "no-save-dir",
        GOOD.replace("    save_dir: runs/a\n", "    interval: 5\n"),
        [],
        ["save_dir is required"],
    ),
    ("empty", "", [], ["empty"]),
    ("comment-only", "# nothing\n", [], ["empty"]),
    ("top-list", "- a\n- b\n", [], ["top level must be a mapping", "list"]),
    ("section-scalar", GOOD.replace("training:\n", "training: 5\nx:\n", 1), [], ["must be a mapping"]),
    ("malformed", "model: [unclosed\n", [], ["invalid YAML", "c.yml:"]),
    ("python-tag", GOOD + "x: !!python/object/apply:os.system ['echo pwned']\n", [], ["not allowed"]),
    ("python-name", "training: !!python/name:os.system\n", [], ["not allowed"]),
    ("set-tag", GOOD.replace("epochs: 2", "epochs: !!set {a, b}"), [], ["not allowed"]),
    ("override-no-equals", GOOD, ["training.epochs"], ["expected KEY=VALUE"]),
    (
        "override-unknown",
        GOOD,
        ["training.epocs=3"],
        ["override 'training.epocs=3'", "Did you mean 'epochs'"],
    ),
    ("override-below-scalar", GOOD, ["training.epochs.x=3"], ["'training.epochs' is a value", "no key 'x'"]),
    ("override-bad-value", GOOD, ["training.batch_size=abc"], ["training.batch_size", "'abc'"]),
    ("override-empty-part", GOOD, ["training..epochs=3"], ["empty part"]),
    ("betas", GOOD, ["training.optimizer.betas=[0.9]"], ["betas", "two values"]),
    (
        "target-no-colon",
        GOOD.replace("tsdia.examples.tsvad:TargetSpeakerVAD", "tsdia.examples.tsvad"),
        [],
        ["model.target"],
    ),
    ("int-key", GOOD + "1: x\n", [], ["keys must be strings"]),
    ("deepspeed-stage", GOOD, ["distributed.deepspeed.zero_stage=4"], ["zero_stage", "at most 3"]),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_config_messages(tmp_path: Path, case: tuple[str, str, list[str], list[str]]) -> None:
    _, text, overrides, fragments = case
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]  # nothing created


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("epochs: 2", "epochs: 0\n  batch_size: x")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "training.epochs" in str(info.value) and "training.batch_size" in str(info.value)


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(write(tmp_path, "\n".join(lines) + "\n"))


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: str(d / "missing.yml"), "config file not found"),
        (lambda d: str(d), "is a directory"),
        (
            lambda d: (d / "bin.yml").write_bytes(b"training:\n  x: \xff\xfe\n") and str(d / "bin.yml"),
            "not UTF-8",
        ),
        (lambda d: (d / "huge.yml").write_text("#" * (2 << 20)) and str(d / "huge.yml"), r"bytes \(limit"),
    ],
    ids=["missing", "directory", "not-utf8", "huge"],
)
def test_bad_config_paths(tmp_path: Path, make, fragment: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=fragment):
        load_config(make(tmp_path))


def test_example_config_is_valid() -> None:
    config = load_config(str(Path(__file__).parents[1] / "configs" / "example.yml"))
    assert config.training.logging.wandb and config.training.logging.tensorboard
    assert yaml.safe_load(config.source.text)["model"]["encoder"] in ("transformer", "linear_attention")


def test_slurm_time_stays_a_string(tmp_path: Path) -> None:
    """YAML 1.1 would read 4:00:00 as the base-60 integer 14400."""
    config = load_config(write(tmp_path, GOOD + "slurm:\n  time: 4:00:00\n  setup: ['module load cuda']\n"))
    assert config.slurm.time == "4:00:00" and config.slurm.setup == ["module load cuda"]
