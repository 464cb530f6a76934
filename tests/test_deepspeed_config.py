"""The DeepSpeed JSON tsdia derives from its config, and the agreement check for a user's JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsdia.cluster import ClusterEnvironment
from tsdia.config import load_config
from tsdia.errors import ConfigError
from tsdia.training.distributed import deepspeed_config

EXAMPLE = str(Path(__file__).resolve().parents[1] / "configs" / "example.yml")
TWO_RANKS = ClusterEnvironment(launcher="torchrun", rank=0, world_size=2)


def derived(*overrides: str) -> dict | None:  # type: ignore[type-arg]
    return deepspeed_config(load_config(EXAMPLE, list(overrides)), TWO_RANKS)


def test_off_by_default() -> None:
    assert derived() is None


def test_batch_accumulation_clipping_precision_agree() -> None:
    ds = derived(
        "distributed.deepspeed.zero_stage=2",
        "training.batch_size=8",
        "training.gradient_accumulation_steps=4",
        "training.max_grad_norm=0.5",
        "training.mixed_precision=bf16",
        "distributed.deepspeed.offload_optimizer=cpu",
    )
    assert ds is not None
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 8 * 4 * 2
    assert (
        ds["gradient_clipping"] == 0.5
        and ds["bf16"] == {"enabled": True}
        and ds["fp16"] == {"enabled": False}
    )
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}


def test_zero3_gathers_weights_for_the_final_checkpoint() -> None:
    ds = derived("distributed.deepspeed.zero_stage=3", "distributed.deepspeed.offload_param=cpu")
    assert ds is not None
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu"}


def test_user_json_must_agree_with_the_tsdia_config(tmp_path: Path) -> None:
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}))
    ds = derived(f"distributed.deepspeed.config_file={good}", "training.batch_size=16")
    assert (
        ds is not None
        and ds["train_micro_batch_size_per_gpu"] == 16
        and ds["zero_optimization"]["stage"] == 1
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4 but the tsdia config implies 16"):
        derived(f"distributed.deepspeed.config_file={bad}", "training.batch_size=16")
    with pytest.raises(ConfigError, match="cannot read"):
        derived(f"distributed.deepspeed.config_file={tmp_path / 'missing.json'}")
