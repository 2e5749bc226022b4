"""The n-gram head (fluent_reward.ngram): the char TF-IDF baseline stretched to the targets' spread, it travels
in the model folder (and the ONNX export) verified, and every scorer blends it in with its weight."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fluent_reward.errors import FluentRewardError
from fluent_reward.evaluate import char_tfidf_ridge_baseline
from fluent_reward.inference import RewardModelScorer
from fluent_reward.io import file_sha256, read_json
from fluent_reward.model import model_reply_embeddings, predict_scores
from fluent_reward.model_folder import METADATA_FILE, ModelFolderError, load_model_folder
from fluent_reward.ngram import (
    HEAD_FILE,
    RIDGE_ALPHAS,
    VOCABULARY_FILE,
    char_tfidf,
    fit_ngram_head,
    load_ngram_head,
    ridge_per_label,
)
from tests.support import make_records, make_tiny_model_folder

DIMS = ("accuracy", "feedback")
WEIGHT = 0.4


def _replies(seed: int = 1) -> list[dict]:
    rows = make_records(n_groups=6, per_group=4, seed=seed)
    for i, row in enumerate(rows):
        row["tutor_response"] += " ¡Muy bien!" * (i % 3) + " Voilà, très bien." * (i % 2)
    return rows


@pytest.fixture(scope="module", params=[None, 1], ids=["ngrams", "ngrams+layer1"])
def folder(tmp_path_factory, request) -> Path:
    """A tiny model folder whose head reads the n-grams alone, or also the replies' layer-1 embeddings."""
    return make_tiny_model_folder(
        tmp_path_factory.mktemp("ngram") / "model",
        DIMS,
        seed=3,
        ngram_weight=WEIGHT,
        ngram_embedding_layer=request.param,
    )


def _mean_pooled_states(model, tokenizer, replies: list[str], layer: int, max_length: int) -> np.ndarray:
    """Each reply alone through the whole model (transformers' own forward), its layer-``layer`` states averaged
    over its tokens: what the head's embedding must be, computed independently of ``pooled_prefix``."""
    import torch

    rows = []
    with torch.inference_mode():
        for reply in replies:
            batch = tokenizer(reply, truncation=True, max_length=max_length, return_tensors="pt")
            states = model.base_model(**batch, output_hidden_states=True).hidden_states[layer]
            rows.append(states[0].mean(0).numpy())
    return np.array(rows, dtype=np.float64)


def test_head_is_the_char_tfidf_baseline_stretched_to_the_targets_spread():
    rows = make_records(n_groups=10, per_group=4, seed=0)
    texts = [r["tutor_response"] for r in rows]
    targets = np.random.default_rng(0).uniform(1, 10, size=(len(texts), 3))
    targets[:, 0] += 3 * np.array([len(t) > 40 for t in texts])  # a learnable label beside two noisy ones
    head = fit_ngram_head(texts[:30], targets[:30], 0.5)
    unseen = [*texts[30:], "unseen ñ text 😊", ""]
    baseline = char_tfidf_ridge_baseline(texts[:30], targets[:30], unseen)
    got = head.predict(unseen)
    for k in range(3):  # per label an increasing affine map of the baseline: the same ranking, another spread
        slope, offset = np.polyfit(baseline[:, k], got[:, k], 1)
        assert slope > 0
        np.testing.assert_allclose(got[:, k], slope * baseline[:, k] + offset, atol=1e-8)
    # the stretch gives the leave-one-out predictions the targets' spread: an unregularised-looking head
    ridge = ridge_per_label(store_cv_results=True).fit(char_tfidf().fit_transform(texts[:30]), targets[:30])
    chosen = [list(RIDGE_ALPHAS).index(a) for a in ridge.alpha_]
    held_out = np.stack([ridge.cv_results_[:, k, a] for k, a in enumerate(chosen)], 1)
    slopes = [np.polyfit(baseline[:, k], got[:, k], 1)[0] for k in range(3)]
    np.testing.assert_allclose(np.array(slopes) * held_out.std(0), targets[:30].std(0), rtol=1e-6)


def test_the_embedding_features_change_the_head_and_travel_with_it(tmp_path):
    rows = make_records(n_groups=10, per_group=4, seed=0)
    texts = [r["tutor_response"] for r in rows]
    rng = np.random.default_rng(2)
    targets, embeddings = rng.uniform(1, 10, size=(len(texts), 3)), rng.normal(size=(len(texts), 8))
    targets[:, 0] += 2 * embeddings[:, 0] / np.linalg.norm(embeddings, axis=1)  # a label the embedding explains
    plain = fit_ngram_head(texts, targets, 0.5)
    head = fit_ngram_head(texts, targets, 0.5, embeddings, embedding_layer=3)
    assert head.embedding_size == 8 and plain.embedding_size == 0
    assert (
        np.corrcoef(head.predict(texts, embeddings)[:, 0], targets[:, 0])[0, 1]
        > np.corrcoef(plain.predict(texts)[:, 0], targets[:, 0])[0, 1]
    )
    loaded = load_ngram_head(tmp_path, 0.5, head.save(tmp_path), n_labels=3)
    assert loaded.embedding_layer == 3
    np.testing.assert_array_equal(loaded.predict(texts, embeddings), head.predict(texts, embeddings))
    with pytest.raises(ValueError, match=r"expected \(40, 8\)"):
        loaded.predict(texts, embeddings[:, :4])


def test_an_embedding_layer_beyond_the_backbone_is_a_clear_error(folder):
    model, tokenizer, _ = load_model_folder(folder)
    with pytest.raises(FluentRewardError, match=r"ngram_embedding_layer=5: the backbone has 2 layers"):
        model_reply_embeddings(model, tokenizer, ["Très bien !"], 5, 64, 8)


def test_a_saved_head_loads_back_identical(tmp_path):
    rows = make_records(n_groups=10, per_group=4, seed=0)
    texts = [r["tutor_response"] for r in rows]
    targets = np.random.default_rng(1).uniform(1, 10, size=(len(texts), 3))
    fitted = fit_ngram_head(texts, targets, 0.3)
    # sklearn hands out coefficients in either memory order; the file must hold the same matrix for both
    head = dataclasses.replace(fitted, coef=np.asfortranarray(fitted.coef))
    files = head.save(tmp_path)
    loaded = load_ngram_head(tmp_path, 0.3, files, n_labels=3)
    assert loaded.vocabulary == head.vocabulary and loaded.weight == 0.3
    np.testing.assert_array_equal(loaded.coef, head.coef)
    np.testing.assert_array_equal(loaded.idf, head.idf)
    np.testing.assert_array_equal(loaded.predict(texts), head.predict(texts))


def test_blend_is_the_weighted_mean_of_transformer_and_head():
    texts = ["good", "bad reply", "very good reply"]
    head = fit_ngram_head(texts * 2, np.arange(12, dtype=float).reshape(6, 2), 0.25)
    transformer = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    np.testing.assert_allclose(head.blend(transformer, texts), 0.75 * transformer + 0.25 * head.predict(texts))
    with pytest.raises(ValueError, match="shape"):
        head.blend(transformer[:2], texts)


def test_folder_holds_the_head_and_every_scorer_blends_it(folder):
    meta = read_json(folder / METADATA_FILE)
    assert meta["ngram_weight"] == WEIGHT and sorted(meta["ngram_files"]) == sorted([HEAD_FILE, VOCABULARY_FILE])
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.joblib"))
    assert "n-gram head" in (folder / "README.md").read_text(encoding="utf-8")
    model, tokenizer, metadata = load_model_folder(folder)
    rows = _replies()
    replies = [r["tutor_response"] for r in rows]
    transformer = predict_scores(model, tokenizer, metadata.with_ngram_head(None), rows, batch_size=8)
    layer = metadata.ngram_head.embedding_layer
    embeddings = None
    if layer is not None:
        embeddings = _mean_pooled_states(model, tokenizer, replies, layer, metadata.max_length)
        assert metadata.ngram_head.embedding_size == embeddings.shape[1]
        with pytest.raises(ValueError, match="embeddings"):
            metadata.ngram_head.predict(replies)
    expected = (1 - WEIGHT) * transformer + WEIGHT * metadata.ngram_head.predict(replies, embeddings)
    # evaluate / cv path and the scorer path give the same blend
    np.testing.assert_allclose(predict_scores(model, tokenizer, metadata, rows, batch_size=8), expected, atol=1e-9)
    scorer = RewardModelScorer(folder, device="cpu", clip=False)
    got = scorer.predict([r["context"] for r in rows], replies, [r["student_message"] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert not np.allclose(got, transformer, atol=1e-3)  # the head really moves the scores


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / VOCABULARY_FILE).unlink(), "ngram_vocabulary.json: missing"),
        (lambda f: (f / HEAD_FILE).write_bytes(b"x" + (f / HEAD_FILE).read_bytes()[1:]), "sha256 differs"),
    ],
)
def test_a_damaged_or_missing_head_refuses_the_folder(folder, tmp_path, damage, message):
    copy = Path(shutil.copytree(folder, tmp_path / "model"))
    damage(copy)
    with pytest.raises(ModelFolderError, match=message):
        RewardModelScorer(copy, device="cpu")


def test_a_head_whose_shapes_disagree_with_the_metadata_is_refused(folder, tmp_path):
    copy = Path(shutil.copytree(folder, tmp_path / "model"))
    doc = json.loads((copy / VOCABULARY_FILE).read_text(encoding="utf-8"))
    doc["vocabulary"] = doc["vocabulary"][:-1]
    (copy / VOCABULARY_FILE).write_text(json.dumps(doc), encoding="utf-8")
    meta = read_json(copy / METADATA_FILE)
    meta["ngram_files"][VOCABULARY_FILE] = file_sha256(copy / VOCABULARY_FILE)
    (copy / METADATA_FILE).write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ModelFolderError, match="shapes do not match"):
        load_model_folder(copy)


@pytest.mark.skipif(
    any(importlib.util.find_spec(n) is None for n in ("onnx", "onnxruntime")), reason="the [onnx] extra is absent"
)
def test_onnx_export_carries_the_head_and_the_overall_folder_says_it_does_not(folder, tmp_path, caplog):
    from fluent_reward.export import run_export

    with caplog.at_level("WARNING"):
        written = run_export(folder, tmp_path / "out")
    assert "n-gram head (ngram_weight 0.4)" in caplog.text
    overall = read_json(written["overall"] / "export.json")
    assert overall["ngram_head_applied"] is False and overall["trl_path_exact"] is False
    assert "The n-gram head is not in this folder" in (written["overall"] / "README.md").read_text(encoding="utf-8")
    rows = _replies(seed=2)
    columns = ([r["context"] for r in rows], [r["tutor_response"] for r in rows], [r["student_message"] for r in rows])
    torch_scores = RewardModelScorer(folder, device="cpu").predict(*columns)
    onnx_scores = RewardModelScorer(written["onnx"], backend="onnx").predict(*columns)
    assert np.abs(torch_scores - onnx_scores).max() < 1e-3
