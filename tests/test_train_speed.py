"""Training does only the work that changes: the frozen prefix computed once (and checked against the whole model),
its cache in memory or on disk, bf16 where native, threads, and progress that is never silent."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fluent_reward import train
from fluent_reward.errors import FluentRewardError
from fluent_reward.frozen_prefix import FeatureCache, TailForward, build_cache, prefix_hidden, tail_agreement
from fluent_reward.io import file_sha256, read_json
from fluent_reward.model import collate, encode_records, predict_scores
from fluent_reward.progress import progress
from fluent_reward.splits import group_languages, make_splits
from fluent_reward.train import fit, run_train
from tests.support import make_learnable_backbone, make_records, tiny_project


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return make_learnable_backbone(tmp_path_factory.mktemp("speed") / "backbone")


def _model(backbone: Path, labels: int = 3):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=labels)
    return model, AutoTokenizer.from_pretrained(backbone)


# ----------------------------------------------------------------------------------------------------------------
# The frozen prefix and the trainable tail


@pytest.mark.parametrize("start", [0, 1, 2])
@pytest.mark.parametrize("token_types", [True, False])  # multilingual-e5 (XLM-R tokenizer) has no token_type_ids
def test_prefix_then_tail_gives_the_logits_of_the_whole_model(backbone, start, token_types):
    model, tokenizer = _model(backbone)
    encoded = encode_records(tokenizer, make_records(3, 3), 64, 1)[0]
    if not token_types:
        encoded = [{k: v for k, v in e.items() if k != "token_type_ids"} for e in encoded]
    assert len({len(e["input_ids"]) for e in encoded}) > 1  # padding is exercised
    assert tail_agreement(model, start, encoded, tokenizer.pad_token_id) < 1e-5


def test_the_tail_runs_the_last_layer_at_the_cls_position_only(backbone):
    model, tokenizer = _model(backbone)
    encoded = encode_records(tokenizer, make_records(2, 2), 64, 1)[0]
    batch = collate(encoded, tokenizer.pad_token_id)
    widths = {}
    for name, layer in (("lower", model.bert.encoder.layer[0]), ("last", model.bert.encoder.layer[1])):
        layer.intermediate.register_forward_hook(lambda _m, args, _o, name=name: widths.update({name: args[0].shape}))
    hidden = prefix_hidden(model.eval(), 0, batch)
    with torch.inference_mode():
        TailForward(model, 0, []).eval()(hidden, batch["attention_mask"])
    rows, tokens = batch["input_ids"].shape
    assert widths == {"lower": (rows, tokens, 32), "last": (rows, 1, 32)}


def test_feature_cache_in_memory_and_on_disk_hold_the_same_rows(backbone):
    model, tokenizer = _model(backbone)
    encoded = encode_records(tokenizer, make_records(2, 4), 64, 1)[0]
    memory = build_cache(model, 1, encoded, 0, 3, torch.float16, max_bytes=1 << 30)
    disk = build_cache(model, 1, encoded, 0, 3, torch.float16, max_bytes=0)
    assert not memory.on_disk and disk.on_disk and disk.path.is_file()
    assert disk.path.stat().st_size == disk.nbytes == memory.nbytes
    a, b = memory.batch([5, 0, 2], "cpu"), disk.batch([5, 0, 2], "cpu")
    assert torch.equal(a["hidden_states"], b["hidden_states"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    with torch.inference_mode():  # the rows are the prefix's output, rounded to float16
        exact = prefix_hidden(model.eval(), 1, collate([encoded[0]], 0))[0]
    n = len(encoded[0]["input_ids"])
    assert a["attention_mask"][1].sum() == n
    assert torch.allclose(a["hidden_states"][1, :n], exact, atol=1e-2, rtol=1e-3)
    path = disk.path
    disk.close()
    assert not path.exists()


def test_a_value_beyond_float16_is_an_error_naming_the_setting():
    cache = FeatureCache([2], 4, torch.float16, max_bytes=1 << 20)
    with pytest.raises(FluentRewardError, match="frozen_cache_dtype=float16"):
        cache.put(0, torch.full((2, 4), 1e6))


# ----------------------------------------------------------------------------------------------------------------
# Training through the cache


def _weights(params) -> dict[str, torch.Tensor]:
    return load_file(Path(params.data.model_dir) / "model.safetensors")


def test_cached_and_uncached_training_give_the_same_model(tmp_path):
    # without dropout: the cached tail draws its dropout masks for the CLS position of the last layer only, the whole
    # model for every position, so with dropout the two paths train the same function on different random masks
    still = make_learnable_backbone(tmp_path / "still", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    settings = {"epochs": 2, "freeze_embeddings": True, "freeze_layers": 1, "frozen_cache_dtype": "float32"}
    cached = tiny_project(tmp_path / "cached", still, frozen_cache=True, **settings)
    whole = tiny_project(tmp_path / "whole", still, frozen_cache=False, **settings)
    m_cached = run_train(cached, progress=False).metrics
    m_whole = run_train(whole, progress=False).metrics
    assert m_cached["frozen_prefix_cached"] == 1 and m_whole["frozen_prefix_cached"] == 0
    a, b = _weights(cached), _weights(whole)
    assert a.keys() == b.keys()
    for key in a:
        # the last layer's key bias adds the same score to every key of a query, which softmax ignores: its true
        # gradient is 0, and AdamW turns the float noise in it (computed differently by the two paths in that layer
        # alone) into steps of the learning rate
        if key != "bert.encoder.layer.1.attention.self.key.bias":
            assert torch.allclose(a[key], b[key], atol=1e-4), key
    assert m_cached["tokens_useful"] == m_whole["tokens_useful"]


def test_same_seed_same_weights_through_the_cache(backbone, tmp_path):
    settings = {"epochs": 1, "freeze_embeddings": True, "freeze_layers": 1}
    first = tiny_project(tmp_path / "a", backbone, **settings)
    second = tiny_project(tmp_path / "b", backbone, **settings)
    assert run_train(first, progress=False).metrics["frozen_prefix_cached"] == 1
    run_train(second, progress=False)
    assert file_sha256(Path(first.data.model_dir) / "model.safetensors") == file_sha256(
        Path(second.data.model_dir) / "model.safetensors"
    )


def test_fit_writes_nothing_and_predict_scores_keeps_input_order(backbone, tmp_path, monkeypatch):
    from fluent_reward.data import load_judged_records

    params = tiny_project(tmp_path / "p", backbone, epochs=1, freeze_embeddings=True, freeze_layers=1)
    records = load_judged_records(params.data.validated, params.data.judgments, params.rubric)
    splits = make_splits(group_languages(records), params.train.split, params.train.seed)
    before = sorted(p for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    fitted = fit(params, records, splits, progress=False)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert fitted.metadata.labels == ["overall", *params.rubric.names]
    assert [h["epoch"] for h in fitted.history] == [1] and fitted.metrics["n_train"] > 0
    scores = predict_scores(fitted.model, fitted.tokenizer, fitted.metadata, records, batch_size=5)
    assert scores.shape == (len(records), 1 + len(params.rubric.names))
    backwards = predict_scores(fitted.model, fitted.tokenizer, fitted.metadata, records[::-1], batch_size=7)
    np.testing.assert_allclose(backwards[::-1], scores, atol=1e-5)
    good = np.array([r["tutor_response"].startswith(("Great", "Nice")) for r in records])
    assert np.isfinite(scores).all() and scores[:, 0].std() > 0
    assert good.any() and (~good).any()


# ----------------------------------------------------------------------------------------------------------------
# Precision, threads, progress


def test_bf16_where_native_and_a_clean_fallback_elsewhere(monkeypatch, caplog):
    if torch.cuda.is_available():
        pytest.skip("CPU precision rules")
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    assert train.resolve_precision("auto") == "bf16" and train.resolve_precision("bf16") == "bf16"
    assert train.resolve_precision("no") == "no"
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger="fluent_reward.train"):
        assert train.resolve_precision("bf16") == "no"
    assert "no native bf16; training in fp32" in caplog.text
    with pytest.raises(FluentRewardError, match="fp16 needs a CUDA GPU"):
        train.resolve_precision("fp16")


def test_bf16_training_runs_and_says_so(backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    params = tiny_project(tmp_path, backbone, epochs=1, mixed_precision="auto", freeze_embeddings=True)
    metrics = run_train(params, progress=False).metrics
    assert metrics["bf16"] == 1 and read_json(params.data.train_metrics)["bf16"] == 1
    assert np.isfinite(metrics["best_validation_spearman"])


def test_threads_follow_the_setting_the_launcher_and_the_local_processes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert train.choose_threads(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert train.choose_threads(0) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert train.choose_threads(0) == torch.get_num_threads()


def test_progress_without_a_terminal_logs_lines_with_an_eta(caplog):
    now = [0.0]
    with (
        caplog.at_level(logging.INFO, logger="fluent_reward.progress"),
        progress("train", 10, bar=False, log_every_s=30, clock=lambda: now[0]) as advance,
    ):
        for _ in range(10):
            now[0] += 10
            advance(1, "loss 0.5")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "train: 3/10 steps (30%), 0.10 steps/s, elapsed 30s, ETA 1m10s, loss 0.5"
    assert len(lines) == 4 and lines[-1].startswith("train: 10/10 steps (100%)") and "ETA" not in lines[-1]
