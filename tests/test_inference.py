"""RewardModelScorer: input order, batching, de-standardisation, dimensions and weights, best-of-N, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fluent_reward.inference import (
    BestOfN,
    RewardModelScorer,
    Scores,
    check_weights,
    plan_batches,
    prepare_inputs,
    split_student_message,
)
from tests.support import make_records, make_tiny_model_folder

DIMS = ("accuracy", "feedback", "engagement")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny", dimensions=DIMS, seed=1)


@pytest.fixture(scope="module")
def scorer(model_dir) -> RewardModelScorer:
    return RewardModelScorer(model_dir, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    rows = make_records(n_groups=5, per_group=4, seed=3)
    # vary the lengths a lot, so batches really are sorted and padded
    for i, row in enumerate(rows):
        row["tutor_response"] += " Muy bien." * (i % 7)
    return rows


def columns(rows):
    return [r["context"] for r in rows], [r["tutor_response"] for r in rows], [r["student_message"] for r in rows]


def raw_predictions(scorer: RewardModelScorer, context: str, student: str, response: str) -> list[float]:
    """The model run by hand on one unpadded example, de-standardised with the metadata: the reference."""
    import torch

    from fluent_reward.model import encode_batch

    meta = scorer.metadata
    (item,) = encode_batch(
        scorer.tokenizer, [context], [student], [response], meta.max_length, keep_first_turns=meta.keep_first_turns
    )
    with torch.no_grad():
        logits = scorer.model(**{k: torch.tensor([v]) for k, v in item.items()}).logits[0]
    low, high = scorer.scale
    raw = [float(x) * s + m for x, s, m in zip(logits, scorer.metadata.std, scorer.metadata.mean, strict=True)]
    return [min(max(x, low), high) for x in raw] if scorer.clip else raw


def test_scores_are_destandardised_model_outputs(scorer, records):
    row = records[0]
    expected = raw_predictions(scorer, row["context"], row["student_message"], row["tutor_response"])
    result = scorer.score(row["context"], row["tutor_response"], row["student_message"], return_dimensions=True)
    assert result.overall == pytest.approx(expected[0], abs=1e-5)
    assert list(result.dimensions) == list(DIMS)
    assert list(result.dimensions.values()) == pytest.approx(expected[1:], abs=1e-5)
    assert scorer.score(row["context"], row["tutor_response"], row["student_message"]) == pytest.approx(expected[0])


def test_score_batch_keeps_input_order_across_sorted_padded_batches(model_dir, records):
    scorer = RewardModelScorer(model_dir, device="cpu", batch_size=3, max_batch_tokens=200)
    contexts, responses, students = columns(records)
    batched = scorer.score_batch(contexts, responses, students)
    single = [scorer.score(c, r, s) for c, r, s in zip(contexts, responses, students, strict=True)]
    assert batched == pytest.approx(single, abs=1e-4)
    assert all(isinstance(x, float) for x in batched)
    assert max(batched) - min(batched) > 0.5  # the model does tell replies apart, so order mistakes would show
    # a different batch size gives the same scores: padding is masked, order is restored
    assert scorer.score_batch(contexts, responses, students, batch_size=32) == pytest.approx(batched, abs=1e-4)


def test_model_is_in_eval_mode_and_no_grad_is_tracked(scorer, records):
    import torch

    contexts, responses, students = columns(records[:2])
    assert not scorer.model.training
    assert all(p.requires_grad for p in scorer.model.parameters())  # so only the scorer can keep grads off
    seen = []

    def record(module, args, output):
        seen.append((torch.is_grad_enabled(), output.logits.requires_grad, module.training))

    handle = scorer.model.register_forward_hook(record)
    try:
        assert scorer.predict(contexts, responses, students).shape == (2, 1 + len(DIMS))
    finally:
        handle.remove()
    assert seen and all(entry == (False, False, False) for entry in seen), seen  # no graph built, dropout off
    assert all(p.grad is None for p in scorer.model.parameters())


def test_dimensions_and_reweighting_without_running_the_model_again(model_dir, records, monkeypatch):
    scorer = RewardModelScorer(model_dir, device="cpu")
    contexts, responses, students = columns(records[:6])
    results = scorer.score_dimensions(contexts, responses, students)
    assert all(isinstance(r, Scores) for r in results)

    def no_more_forwards(*args, **kwargs):
        raise AssertionError("re-weighting ran the model")

    monkeypatch.setattr(scorer.model, "forward", no_more_forwards)
    custom = {"accuracy": 3.0, "feedback": 1.0, "engagement": 0.0}
    for r in results:
        expected = (3 * r.dimensions["accuracy"] + r.dimensions["feedback"]) / 4
        assert r.weighted(custom) == pytest.approx(expected)
        assert r.weighted() == pytest.approx(sum(r.dimensions.values()) / 3)  # the model's weights: all 1.0
        assert r.as_dict(custom) == {
            "overall": r.overall,
            "weighted_overall": r.weighted(custom),
            "scores": r.dimensions,
        }
    monkeypatch.undo()
    by_weights = scorer.score_batch(contexts, responses, students, weights=custom)
    assert by_weights == pytest.approx([r.weighted(custom) for r in results], abs=1e-5)
    # the head and the weighted mean are two different estimates
    assert [r.overall for r in results] != pytest.approx([r.weighted() for r in results], abs=1e-3)


def test_best_of_n_returns_the_argmax_and_all_scores(scorer, records):
    row = records[0]
    candidates = [r["tutor_response"] for r in records[:5]]
    best = scorer.best_of_n(row["context"], candidates, row["student_message"])
    assert isinstance(best, BestOfN)
    expected = scorer.score_batch([row["context"]] * 5, candidates, [row["student_message"]] * 5)
    assert best.scores == pytest.approx(expected)
    assert best.index == max(range(5), key=lambda i: expected[i])
    assert best.response == candidates[best.index] and best.score == best.scores[best.index]


def test_best_of_n_ties_go_to_the_first_candidate(scorer, records):
    row = records[0]
    best = scorer.best_of_n(row["context"], ["Same reply.", "Same reply."], row["student_message"])
    assert best.index == 0


def test_student_message_defaults_to_the_contexts_last_student_turn(scorer):
    full = "Tutor: ¿Qué hiciste ayer?\nStudent: Yo ir al cine."
    assert split_student_message(full) == ("Tutor: ¿Qué hiciste ayer?", "Yo ir al cine.")
    explicit = scorer.score("Tutor: ¿Qué hiciste ayer?", "Casi: «fui al cine».", "Yo ir al cine.")
    assert scorer.score(full, "Casi: «fui al cine».") == pytest.approx(explicit)


def test_plan_batches_sorts_by_length_and_caps_sequences_and_tokens():
    lengths = [5, 50, 7, 49, 3, 100, 8]
    batches = plan_batches(lengths, batch_size=3, max_batch_tokens=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 120
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert plan_batches([500], batch_size=4, max_batch_tokens=10) == [[0]]  # always at least one sequence


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.score_batch(["a", "b"], ["x"]), "contexts has 2 items but responses has 1"),
        (lambda s: s.score_batch([], []), "responses is empty"),
        (lambda s: s.score_batch(["Student: hi"], [3]), r"responses\[0\] is int, expected a string"),
        (lambda s: s.score_batch("Student: hi", "hello"), "contexts must be a list of strings, got str"),
        (lambda s: s.score_batch(["c"], ["r"], ["m", "n"]), "student_messages has 2 items"),
        (lambda s: s.score("Student: hi", "  \n"), r"responses\[0\] is empty or whitespace only"),
        (lambda s: s.score_batch(["c", "c"], ["r", "r"], ["m", ""]), r"student_messages\[1\] is empty"),
        (lambda s: s.score("Tutor: hi\nStudent: ", "r"), "item 0: the context's last 'Student:' turn is empty"),
        (lambda s: s.best_of_n("Student: hi", ["ok", ""]), r"candidates\[1\] is empty"),
        (
            lambda s: s.score("", "r\ud800x", "m"),
            r"responses\[0\] contains an unpaired surrogate U\+D800 at character 2",
        ),
        (lambda s: s.score("", "r", "\udfff"), r"student_messages\[0\] contains an unpaired surrogate U\+DFFF"),
        (lambda s: s.score_batch(["c"], ["r"], [None]), "item 0: student_message is None"),
        (lambda s: s.score(None, "r", "m"), "context must be a string"),
        (lambda s: s.best_of_n("Student: hi", []), "candidates is empty"),
        (lambda s: s.best_of_n("Student: hi", ["ok", None]), r"candidates\[1\] is NoneType"),
        (lambda s: s.score_batch(["c"], ["r"], ["m"], batch_size=0), "batch_size must be a positive integer"),
        (lambda s: s.score_batch(["c"], ["r"], ["m"], weights={"accuracy": 1}), "missing: \\['feedback'"),
        (lambda s: s.score_batch(["c"], ["r"], ["m"], weights={**dict.fromkeys(DIMS, 1), "x": 1}), "unknown: \\['x'"),
    ],
)
def test_misuse_is_a_clear_value_error(scorer, call, message):
    with pytest.raises(ValueError, match=message):
        call(scorer)


def test_weights_must_be_non_negative_and_not_all_zero():
    with pytest.raises(ValueError, match="must not all be zero"):
        check_weights(dict.fromkeys(DIMS, 0), DIMS)
    with pytest.raises(ValueError, match=">= 0"):
        check_weights({"accuracy": -1, "feedback": 1, "engagement": 1}, DIMS)


def test_missing_and_incompatible_model_folders(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        RewardModelScorer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"fluent_reward\.json: missing"):
        RewardModelScorer(tmp_path / "empty")
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((model_dir / "fluent_reward.json").read_text())
    (old / "fluent_reward.json").write_text(json.dumps({**meta, "model_format_version": 0}))
    with pytest.raises(ValueError, match="model_format_version=0 but this version of fluent-reward needs 2"):
        RewardModelScorer(old)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "fluent_reward.json").write_text(json.dumps({**meta, "surprise": 1}))
    with pytest.raises(ValueError, match=r"fluent_reward\.json: field 'surprise': Extra inputs are not permitted"):
        RewardModelScorer(odd)


def test_bad_constructor_arguments(model_dir):
    with pytest.raises(ValueError, match="fast must be"):
        RewardModelScorer(model_dir, fast="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        RewardModelScorer(model_dir, batch_size=0)


def test_prepare_inputs_accepts_tuples_and_mixed_student_messages():
    contexts, responses, students = prepare_inputs(("Student: hola", "Tutor: hi"), ("a", "b"), (None, "given"))
    assert contexts == ["", "Tutor: hi"] and students == ["hola", "given"] and responses == ["a", "b"]


def test_importing_the_package_stays_light():
    code = "import sys, fluent_reward; assert 'torch' not in sys.modules; print(fluent_reward.RewardModelScorer)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "RewardModelScorer" in out.stdout


def test_compile_falls_back_to_eager_when_compilation_fails(model_dir, records, monkeypatch, caplog):
    import torch

    def broken(**inputs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: broken)
    contexts, responses, students = columns(records[:5])
    scorer = RewardModelScorer(model_dir, device="cpu", compile=True)
    expected = RewardModelScorer(model_dir, device="cpu").score_batch(contexts, responses, students)
    assert scorer.score_batch(contexts, responses, students) == pytest.approx(expected, abs=1e-5)
    assert "torch.compile failed (RuntimeError: no C++ compiler)" in caplog.text
    assert scorer._compiled is None  # not retried on every batch


@pytest.mark.slow
def test_compiled_model_gives_the_same_scores(model_dir, records):
    contexts, responses, students = columns(records)
    eager = RewardModelScorer(model_dir, device="cpu").score_batch(contexts, responses, students)
    compiled = RewardModelScorer(model_dir, device="cpu", compile=True).score_batch(contexts, responses, students)
    assert compiled == pytest.approx(eager, abs=1e-4)


def test_scores_are_clipped_to_the_scale_unless_asked_raw(model_dir, records):
    contexts, responses, students = columns(records)
    raw = RewardModelScorer(model_dir, device="cpu", clip=False).predict(contexts, responses, students)
    clipped = RewardModelScorer(model_dir, device="cpu").predict(contexts, responses, students)
    assert raw.min() < 1 or raw.max() > 10  # the wide-init tiny model does leave the scale
    assert clipped.min() >= 1 and clipped.max() <= 10
    assert clipped == pytest.approx(raw.clip(1, 10), abs=1e-5)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(model_dir, tmp_path, capsys):
    from fluent_reward.cli import main

    with pytest.raises(ValueError, match="device 'cuda': no CUDA GPU is available to this process; use --device cpu"):
        RewardModelScorer(model_dir, device="cuda")
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"context": "", "student_message": "hola", "tutor_response": "¡Hola!"}) + "\n")
    args = ["score", "--input", str(source), "--output", str(tmp_path / "o.jsonl"), "--model", str(model_dir)]
    assert main([*args, "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: device 'cuda': no CUDA GPU is available" in err and "Traceback" not in err
