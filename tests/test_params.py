"""Settings: every value survives DVC's rewrite of the params files, and bad values are refused at load, by key."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from fluent_reward.config import Rubric, load_params, read_yaml
from fluent_reward.errors import FluentRewardError

ROOT = Path(__file__).resolve().parents[1]


def copy_params(folder: Path) -> Path:
    """params.yaml, with the bundled sample's rubric as rubric.yaml (tests below pin its texts), in ``folder``."""
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
    shutil.copy(ROOT / "data" / "sample" / "rubric.yaml", folder / "rubric.yaml")
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
        ("train.frozen_cache=false", ("train", "frozen_cache"), False),
        ("train.ngram_embedding_layer=null", ("train", "ngram_embedding_layer"), None),
        ("train.attention_dropout=0", ("train", "attention_dropout"), 0.0),
        ("train.attention_dropout=null", ("train", "attention_dropout"), None),
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
    text = re.sub(r"(?m)^  mixed_precision: .*$", f"  mixed_precision: {spelling}", path.read_text(encoding="utf-8"))
    path.write_text(text, encoding="utf-8")
    assert f"mixed_precision: {spelling}" in path.read_text(encoding="utf-8")
    assert load_params(path).train.mixed_precision == "no"


# --- the rubric in its own file -------------------------------------------------------------------------------


def _flatten(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def test_params_yaml_rows_stay_short_for_dvc_exp_show():
    """The rubric's prose lives in rubric.yaml: every params.yaml value fits a `dvc exp show` column."""
    import yaml

    rows = dict(_flatten(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))))
    assert rows["rubric"] == "rubric.yaml"
    assert max(len(str(value)) for value in rows.values()) < 80


def test_rubric_file_is_loaded_and_its_problems_name_it(tmp_path):
    path = copy_params(tmp_path)
    assert load_params(path).rubric.names[0] == "accuracy"
    dvc_set(tmp_path / "rubric.yaml", "weights.accuracy=-1")
    with pytest.raises(FluentRewardError, match=r"rubric\.yaml: invalid settings: weights must be non-negative"):
        load_params(path)
    (tmp_path / "rubric.yaml").unlink()
    with pytest.raises(FluentRewardError, match=r"params\.yaml: rubric: file .*rubric\.yaml not found"):
        load_params(path)


def test_rubric_values_set_through_dvc_keep_their_meaning(tmp_path):
    path = copy_params(tmp_path)
    dvc_set(tmp_path / "rubric.yaml", "version=2.0", "weights.accuracy=0.3")
    rubric = load_params(path).rubric
    assert rubric.version == "2.0" and rubric.weights["accuracy"] == 0.3
    assert rubric.dimensions == Rubric.model_validate(read_yaml(ROOT / "data" / "sample" / "rubric.yaml")).dimensions


def test_a_rubric_inline_in_params_yaml_also_loads(tmp_path):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["rubric"] = yaml.safe_load((ROOT / "rubric.yaml").read_text(encoding="utf-8"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert load_params(tmp_path / "params.yaml").rubric == load_params(ROOT / "params.yaml").rubric


# --- settings document themselves ------------------------------------------------------------------------------


def _models(model, seen=None):
    from pydantic import BaseModel

    seen = seen if seen is not None else set()
    if model in seen:
        return seen
    seen.add(model)
    for field in model.model_fields.values():
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                _models(candidate, seen)
    return seen


def test_every_setting_has_a_description():
    from fluent_reward.config import Params

    undocumented = [
        f"{model.__name__}.{name}"
        for model in _models(Params)
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert undocumented == []


def test_settings_tables_in_the_docs_are_generated_from_config():
    from fluent_reward.settings_doc import stale_docs

    training = (ROOT / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    assert "<!-- settings:train -->\n| key | type | meaning |" in training
    assert "| `lr` | number > 0 | AdamW learning rate of the encoder |" in training
    assert stale_docs(sorted((ROOT / "docs").glob("*.md"))) == [], "run `fluent-reward params --write-docs`"


def test_params_command_checks_and_rewrites_a_stale_table(tmp_path, capsys):
    from fluent_reward.cli import main

    doc = tmp_path / "TRAINING.md"
    text = (ROOT / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    doc.write_text(text.replace("AdamW learning rate of the encoder", "hand-edited"), encoding="utf-8")
    params = str(ROOT / "params.yaml")
    assert main(["--params", params, "params", "--check", "--docs", str(doc)]) == 2
    assert "settings tables out of date in" in capsys.readouterr().err
    assert main(["--params", params, "params", "--write-docs", "--docs", str(doc)]) == 0
    assert doc.read_text(encoding="utf-8") == text
    assert main(["--params", params, "params", "--markdown", "evaluate"]) == 0
    assert "| `min_gap` | number ≥ 0 |" in capsys.readouterr().out


# --- bad values are refused at load, naming the key -----------------------------------------------------------


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=inf", r"params\.yaml: invalid settings: train\.lr: Input should be a finite number"),
        ("train.head_lr=nan", r"train\.head_lr: Input should be a finite number"),
        ("evaluate.min_gap=nan", r"evaluate\.min_gap: Input should be a finite number"),
        ("evaluate.min_gap=-1", r"evaluate\.min_gap: Input should be greater than or equal to 0"),
        ("pairs.min_gap=inf", r"pairs\.min_gap: Input should be a finite number"),
        ("train.batch_size=0", r"train\.batch_size: Input should be greater than or equal to 1"),
        ("evaluate.batch_size=0", r"evaluate\.batch_size: Input should be greater than or equal to 1"),
        ("score.batch_size=0", r"score\.batch_size: Input should be greater than or equal to 1"),
        ("judge.max_budget_usd=nan", r"judge\.max_budget_usd: Input should be a finite number"),
        ("train.warmup_ratio=-inf", r"train\.warmup_ratio: Input should be a finite number"),
        ("train.attention_dropout=1", r"train\.attention_dropout: Input should be less than 1"),
        (
            "train.freeze_layers=2",
            r"train\.ngram_embedding_layer=4 must be a frozen layer: at most train\.freeze_layers \(2\)",
        ),
        ("train.freeze_embeddings=false", r"train\.ngram_embedding_layer=4 must be a frozen layer"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(tmp_path, override, message):
    path = copy_params(tmp_path)
    dvc_set(path, override)
    with pytest.raises(FluentRewardError, match=message):
        load_params(path)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "accuracy: 0.25",
            "accuracy: .nan",
            r"rubric\.yaml: invalid settings: weights\.accuracy: Input should be a finite",
        ),
        ("feedback: 0.20", "feedback: .inf", r"rubric\.yaml: invalid settings: weights\.feedback: "),
        (
            "'Curt, dismissive, sarcastic or discouraging.'",
            "''",
            r"rubric\.yaml: invalid settings: dimensions\.encouragement\.anchors: anchor '1' is blank",
        ),
        (
            """'Everything stated is correct and natural; examples and corrections are exactly right.'""",
            "'   '",
            r"dimensions\.accuracy\.anchors: anchor '10' is blank",
        ),
        ("\"7\": 'Friendly and supportive.'", '"11": x', r"anchors: '11' is not an integer score on the"),
        ("\"7\": 'Friendly and supportive.'", '"7.5": x', r"'7\.5' is not an integer score"),
    ],
)
def test_bad_rubric_values_are_refused_naming_the_key(tmp_path, old, new, message):
    path = copy_params(tmp_path)
    _edit(tmp_path / "rubric.yaml", old, new)
    with pytest.raises(FluentRewardError, match=message):
        load_params(path)


def test_blank_description_is_refused(tmp_path):
    path = copy_params(tmp_path)
    text = (tmp_path / "rubric.yaml").read_text(encoding="utf-8")
    start = text.index("    description: >-\n", text.index("\n  clarity:\n"))
    end = text.index("    anchors:", start)
    (tmp_path / "rubric.yaml").write_text(text[:start] + "    description: ' '\n" + text[end:], encoding="utf-8")
    with pytest.raises(FluentRewardError, match=r"dimensions\.clarity\.description: is blank"):
        load_params(path)


def test_anchor_keys_may_be_yaml_integers(tmp_path):
    path = copy_params(tmp_path)
    _edit(tmp_path / "rubric.yaml", "\"7\": 'Friendly and supportive.'", "7: 'Friendly and supportive.'")
    assert load_params(path).rubric.dimensions["encouragement"].anchors["7"] == "Friendly and supportive."


def test_non_utf8_params_file_is_a_message(tmp_path):
    path = copy_params(tmp_path)
    path.write_bytes(path.read_bytes().replace(b"# Every setting", b"# Every s\xe9tting", 1))
    with pytest.raises(
        FluentRewardError, match=r"params\.yaml: not UTF-8: byte 0xe9 at line 1 \(save the file as UTF-8\)"
    ):
        load_params(path)


def test_yaml_syntax_error_is_a_message(tmp_path):
    path = copy_params(tmp_path)
    path.write_text("train: [unclosed\n", encoding="utf-8")
    with pytest.raises(FluentRewardError, match=r"params\.yaml: not valid YAML: .*line 2"):
        load_params(path)


def test_max_length_above_the_backbone_positions_is_refused():
    from transformers import BertConfig, XLMRobertaConfig

    from fluent_reward.config import check_max_length

    train = load_params(ROOT / "params.yaml").train.model_copy(update={"max_length": 600, "backbone": "b"})
    with pytest.raises(FluentRewardError, match=r"train\.max_length=600 is more than the backbone 'b' can take "):
        check_max_length(train, BertConfig(max_position_embeddings=512))
    check_max_length(train, BertConfig(max_position_embeddings=600))
    xlmr = XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1)  # positions start after the padding index
    check_max_length(train.model_copy(update={"max_length": 512}), xlmr)
    with pytest.raises(FluentRewardError, match=r"\(512 positions\); set train\.max_length to at most 512"):
        check_max_length(train.model_copy(update={"max_length": 513}), xlmr)
