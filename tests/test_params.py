"""Settings: every value survives DVC's rewrite of the params files, and bad values are refused at load, by key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fluent_reward.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def copy_params(folder: Path) -> Path:
    """params.yaml (and the files it names beside it) copied into ``folder``; returns the params path."""
    for name in ("params.yaml", "rubric.yaml"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, folder / name)
    return folder / "params.yaml"


def dvc_set(path: Path, *overrides: str) -> None:
    """What `dvc exp run -S KEY=VALUE` does to a params file: DVC's own Hydra override and YAML dumper."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(path, list(overrides))


# --- DVC's YAML round-trip -------------------------------------------------------------------------------------


def test_every_setting_survives_dvc_exp_run_set_param(tmp_path):
    path = copy_params(tmp_path)
    before = load_params(path).model_dump()
    dvc_set(path, "evaluate.min_gap=1.0")
    after = load_params(path).model_dump()  # used to fail: train.mixed_precision came back as the boolean `no`
    assert after["evaluate"]["min_gap"] == 1.0
    after["evaluate"]["min_gap"] = before["evaluate"]["min_gap"]
    assert after == before


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.mixed_precision=no", ("train", "mixed_precision"), "no"),
        ("train.mixed_precision=bf16", ("train", "mixed_precision"), "bf16"),
        ("train.lr=1e-4", ("train", "lr"), 1e-4),
        ("score.fast=true", ("score", "fast"), True),
        ("train.freeze_embeddings=false", ("train", "freeze_embeddings"), False),
        ("judge.prompt_cache_ttl=1h", ("judge", "prompt_cache_ttl"), "1h"),
        ("score.device=cuda:1", ("score", "device"), "cuda:1"),
        ("judge.max_budget_usd=null", ("judge", "max_budget_usd"), None),
        ("judge.max_budget_usd=12.5", ("judge", "max_budget_usd"), 12.5),
    ],
)
def test_values_set_through_dvc_keep_their_meaning(tmp_path, override, key, expected):
    path = copy_params(tmp_path)
    dvc_set(path, override)
    section, name = key
    assert getattr(getattr(load_params(path), section.replace("validate", "validate_")), name) == expected


@pytest.mark.parametrize("spelling", ["no", "false", "'no'"])
def test_mixed_precision_no_in_any_yaml_spelling(tmp_path, spelling):
    path = copy_params(tmp_path)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('mixed_precision: "no"', f"mixed_precision: {spelling}"), encoding="utf-8")
    assert f"mixed_precision: {spelling}" in path.read_text(encoding="utf-8")
    assert load_params(path).train.mixed_precision == "no"
