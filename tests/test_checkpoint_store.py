"""The on-disk checkpoint protocol, without torch: completeness, discovery, best link, rotation."""

from __future__ import annotations

import json
from pathlib import Path

from tsdia.experiment import checkpoints as store


def make(save_dir: Path, epoch: int, step: int, metrics: dict[str, float] | None = None) -> Path:
    staging = store.begin_checkpoint(save_dir, store.checkpoint_name(epoch, step))
    (staging / "model.safetensors").write_bytes(b"w" * (step + 10))
    return store.commit_checkpoint(
        save_dir, staging, staging.name.removeprefix(".incomplete-"), step, epoch, metrics or {}, {}
    )


def test_manifest_marks_complete(tmp_path: Path) -> None:
    path = make(tmp_path, 0, 5, {"val_loss": 1.0})
    manifest = store.read_manifest(path)
    assert manifest is not None and manifest.step == 5 and manifest.files["model.safetensors"] == 15
    assert "trainer_state.json" in manifest.files
    assert not list((tmp_path / store.STORE_DIR).glob(".incomplete-*"))


def test_torn_or_foreign_directories_are_not_checkpoints(tmp_path: Path) -> None:
    good = make(tmp_path, 0, 5)
    truncated = make(tmp_path, 0, 9)
    (truncated / "model.safetensors").write_bytes(b"short")  # size no longer matches the manifest
    (tmp_path / "checkpoint-epoch1-step20").mkdir()  # no manifest at all
    assert [p for p, _ in store.complete_checkpoints(tmp_path)] == [good]
    assert store.latest_checkpoint(tmp_path) == good


def test_staging_debris_is_cleaned(tmp_path: Path) -> None:
    store.begin_checkpoint(tmp_path, "checkpoint-epoch0-step3")
    (tmp_path / store.STORE_DIR / ".deleting-checkpoint-epoch0-step1-7").mkdir()
    assert sorted(store.clean_staging(tmp_path)) == [
        ".deleting-checkpoint-epoch0-step1-7",
        ".incomplete-checkpoint-epoch0-step3",
    ]
    assert store.latest_checkpoint(tmp_path) is None


def test_best_link_and_rotation_protect_best_newest_and_resumed(tmp_path: Path) -> None:
    losses = {2: 0.5, 4: 0.2, 6: 0.4, 8: 0.3, 10: 0.6}
    paths = {step: make(tmp_path, 0, step, {"val_loss": loss}) for step, loss in losses.items()}
    best = store.update_best_and_rotate(tmp_path, "val_loss", "min", 2, protected=[paths[2]])
    assert best == paths[4]
    link = tmp_path / store.BEST_LINK
    assert link.is_symlink() and str(link.readlink()) == paths[4].name  # relative
    left = {p.name for p, _ in store.complete_checkpoints(tmp_path)}
    # limit 2, but the best (4), the newest (10) and the resumed-from (2) are never deleted
    assert left == {paths[2].name, paths[4].name, paths[10].name}
    index = json.loads((tmp_path / store.STORE_DIR / "index.json").read_text())
    assert index["best"] == paths[4].name and index["latest"] == paths[10].name


def test_max_mode_and_missing_metrics(tmp_path: Path) -> None:
    make(tmp_path, 0, 1)
    high = make(tmp_path, 0, 2, {"val_accuracy": 0.9})
    make(tmp_path, 0, 3, {"val_accuracy": 0.7})
    assert store.update_best_and_rotate(tmp_path, "val_accuracy", "max", None) == high
    assert store.update_best_and_rotate(tmp_path, "val_f1", "max", None) is None
