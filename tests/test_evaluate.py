"""The evaluate stage: metrics on hand-computed values, and a tiny end-to-end run whose metrics are recomputed
from predictions.csv alone."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fluent_reward.errors import FluentRewardError
from fluent_reward.evaluate import (
    baseline_scores,
    best_of_n_agreement,
    best_of_n_gain,
    bootstrap_spearman_ci,
    char_tfidf_ridge_baseline,
    judge_agreement,
    length_baseline,
    pairwise_accuracy,
    regression_metrics,
    run_evaluate,
    tfidf_ridge_baseline,
)
from fluent_reward.io import read_json, write_json
from fluent_reward.train import run_train
from tests.support import make_learnable_backbone, tiny_project

# ----------------------------------------------------------------------------------------------------------------
# Metrics on hand values


def test_regression_metrics_hand_values():
    m = regression_metrics([1, 2, 3, 4], [1, 3, 2, 4])
    assert m["spearman"] == pytest.approx(0.8)  # 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15)
    assert m["pearson"] == pytest.approx(0.8)
    assert m["kendall"] == pytest.approx(4 / 6)  # 5 concordant, 1 discordant of 6 pairs
    assert m["mae"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(math.sqrt(0.5))


def test_correlations_of_a_constant_prediction_are_undefined():
    m = regression_metrics([1, 2, 3], [5, 5, 5])
    assert math.isnan(m["spearman"]) and math.isnan(m["pearson"]) and m["mae"] == pytest.approx(3.0)


def test_pairwise_accuracy_min_gap_ties_and_groups():
    judge = [9.0, 5.0, 4.8, 3.0, 6.0]
    model = [1.0, 2.0, 0.0, 0.5, 0.5]
    groups = ["a", "a", "a", "b", "b"]
    # min_gap 0.5: (9 vs 5) wrong, (9 vs 4.8) right, (5 vs 4.8) too close; b: a model tie -> 1/2; no cross-group pair
    assert pairwise_accuracy(judge, model, groups, 0.5) == (pytest.approx(1.5 / 3), 3)
    # min_gap 0: (5 vs 4.8) counts too and is right
    assert pairwise_accuracy(judge, model, groups, 0.0) == (pytest.approx(2.5 / 4), 4)
    acc, n = pairwise_accuracy([1.0, 1.0], [0.0, 1.0], ["a", "a"], 0.0)  # judge tie: not an ordered pair
    assert n == 0 and math.isnan(acc)


def test_best_of_n_credits_ties_and_skips_uninformative_groups():
    judge = [9, 5, 4, 7, 7, 2, 5, 5, 3, 2, 8]
    model = [3, 3, 1, 1, 5, 0, 1, 2, 9, 9, 1]
    groups = ["A", "A", "A", "B", "B", "B", "C", "C", "D", "E", "E"]
    # A: the model ties 2 for the top, one is the judge's best -> 1/2
    # B: the judge ties 2 for the top; the model's top is one of them -> 1
    # C: the judge scores both the same -> skipped; D: one reply -> skipped; E: wrong -> 0
    score, n, chance = best_of_n_agreement(judge, model, groups)
    assert (score, n) == (pytest.approx(0.5), 3)
    assert chance == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_best_of_n_gain_hand_values():
    judge = [9, 5, 4, 7, 7, 2, 5, 5, 3, 2, 8, 6, 4]
    model = [1, 3, 1, 1, 5, 0, 1, 2, 9, 9, 1, 0, 0]
    groups = ["A", "A", "A", "B", "B", "B", "C", "C", "D", "E", "E", "F", "F"]
    # A: mean 6, best 9, the model picks 5 -> (5 - 6) / 3 = -1/3 (worse than random)
    # B: mean 16/3, best 7, the model picks a 7 -> 1
    # C: every reply 5 (best == mean) and D: one reply -> skipped
    # E: mean 5, best 8, the model picks 2 -> -1
    # F: the model ties both -> its pick is worth their mean, 5 -> 0 (a random pick)
    gain, n = best_of_n_gain(judge, model, groups)
    assert n == 4
    assert gain == pytest.approx((-1 / 3 + 1 - 1 + 0) / 4)
    assert best_of_n_gain(judge, judge, groups) == (pytest.approx(1.0), 4)  # the judge's own pick
    gain, n = best_of_n_gain([5, 5], [1, 2], ["a", "a"])
    assert n == 0 and math.isnan(gain)


def test_bootstrap_ci_resamples_groups_and_is_seeded():
    rng = np.random.default_rng(0)
    judge = rng.normal(size=60)
    model = judge + rng.normal(scale=0.8, size=60)
    groups = [f"g{i // 5}" for i in range(60)]
    low, high = bootstrap_spearman_ci(judge, model, groups, 300, seed=1)
    rho = regression_metrics(judge, model)["spearman"]
    assert -1 <= low < rho < high <= 1
    assert bootstrap_spearman_ci(judge, model, groups, 300, seed=1) == (low, high)
    assert bootstrap_spearman_ci(judge, judge, groups, 100, seed=1) == pytest.approx((1.0, 1.0))
    assert all(math.isnan(x) for x in bootstrap_spearman_ci([1, 2], [1, 2], ["g", "g"], 100, seed=1))


def test_baselines():
    records = [{"tutor_response": "abc"}, {"tutor_response": "a"}]
    assert length_baseline(records).tolist() == [3.0, 1.0]
    good = [f"great job, try again with {w}" for w in ("fui", "vamos", "tengo", "quiero", "puedo", "hablo")]
    bad = [f"wrong, study {w}" for w in ("fui", "vamos", "tengo", "quiero", "puedo", "hablo")]
    targets = np.array([[9.0, 8.0]] * 6 + [[2.0, 3.0]] * 6)
    pred = tfidf_ridge_baseline(good + bad, targets, ["great job, try again with como", "wrong, study como"])
    assert pred.shape == (2, 2) and pred[0, 0] > pred[1, 0] and pred[0, 1] > pred[1, 1]


def test_char_tfidf_baseline_learns_character_ngrams_per_label():
    # the signal is a suffix inside a word ("-ísimo" vs "-ito"): character n-grams see it, whole words never repeat
    good = [f"{w}ísimo" for w in ("buen", "rap", "list", "fac", "clar", "car")]
    bad = [f"{w}ito" for w in ("buen", "rap", "list", "fac", "clar", "car")]
    targets = np.array([[9.0, 2.0]] * 6 + [[2.0, 9.0]] * 6)  # the second label runs the other way
    pred = char_tfidf_ridge_baseline(good + bad, targets, ["lentísimo", "lentito"])
    assert pred.shape == (2, 2)
    assert pred[0, 0] > pred[1, 0] and pred[0, 1] < pred[1, 1]


def test_baseline_scores_fit_on_the_training_rows_only():
    records = [{"tutor_response": f"reply {'great' if i % 2 else 'bad'} {i}"} for i in range(12)]
    targets = np.array([[float(i), float(-i)] for i in range(12)])
    scores = baseline_scores(records, targets, train_idx=list(range(8)))
    assert set(scores) == {"length", "tfidf_ridge", "char_tfidf_ridge"}
    assert all(v.shape == (12, 2) for v in scores.values())
    assert scores["length"][:, 0].tolist() == [len(r["tutor_response"]) for r in records]
    # a target seen only in rows 8-11 cannot move the learnt baselines: fit on rows 0-7 only
    changed = targets.copy()
    changed[8:] = 100.0
    again = baseline_scores(records, changed, train_idx=list(range(8)))
    for name in ("tfidf_ridge", "char_tfidf_ridge"):
        np.testing.assert_allclose(again[name], scores[name])


def test_judge_agreement_is_copied_when_measured(tmp_path):
    assert judge_agreement(tmp_path / "absent.json") == {}
    path = tmp_path / "judge.json"
    write_json(path, {"records": 9, "test_retest": {"overall_spearman": 0.91, "dimensions_spearman": {"a": 0.8}}})
    assert judge_agreement(path) == {
        "judge.test_retest.overall_spearman": 0.91,
        "judge.test_retest.dimensions_spearman.a": 0.8,
    }
    write_json(path, {"records": 9, "samples": 1})
    assert judge_agreement(path) == {}


# ----------------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    params = tiny_project(root, make_learnable_backbone(root / "backbone"), n_groups=24)
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"min_language_records": 8})})
    run_train(params, progress=False)
    write_json(params.data.judge_metrics, {"samples": 2, "test_retest": {"overall_spearman": 0.9}})
    return params, run_evaluate(params)


def test_metrics_file_has_the_stable_flat_keys(evaluated):
    params, metrics = evaluated
    on_disk = json.loads(Path(params.data.eval_metrics).read_text(), parse_constant=pytest.fail)  # no NaN
    assert on_disk == metrics
    required = [
        *(f"overall.{k}" for k in ("pearson", "spearman", "kendall", "mae", "rmse", "spearman_ci_low")),
        "overall.spearman_ci_high",
        "pairwise_accuracy",
        "best_of_n_agreement",
        "best_of_n_gain",
        *(f"dimensions.{d}.{k}" for d in params.rubric.names for k in ("spearman", "mae")),
        *(
            f"baseline.{b}.{k}"
            for b in ("length", "tfidf_ridge", "char_tfidf_ridge")
            for k in ("spearman", "pairwise_accuracy", "best_of_n_agreement", "best_of_n_gain")
        ),
        *(f"baseline.char_tfidf_ridge.dimensions.{d}.spearman" for d in params.rubric.names),
        "n_test",
        "n_groups_test",
        "validation.overall.spearman",
        "validation.pairwise_accuracy",
        "validation.best_of_n_agreement",
        "validation.best_of_n_gain",
        "validation.baseline.char_tfidf_ridge.best_of_n_gain",
        *(f"{s}truncated_{k}" for s in ("", "validation.") for k in ("examples", "share", "mean_dropped_tokens")),
        "judge.test_retest.overall_spearman",
    ]
    assert [k for k in required if k not in metrics] == []
    assert any(k.startswith("languages.") and k.endswith(".spearman") for k in metrics)
    split = read_json(params.data.splits)
    assert metrics["n_groups_test"] == len(split["groups"]["test"])
    assert metrics["n_test"] == 4 * len(split["groups"]["test"])


def test_metrics_recompute_from_predictions_csv(evaluated):
    params, metrics = evaluated
    with open(params.data.predictions, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    dims = params.rubric.names
    assert list(rows[0]) == ["id", "group_id", "language", "split", "judge_overall", "pred_overall"] + [
        f"{kind}_{d}" for d in dims for kind in ("judge", "pred")
    ]
    split = read_json(params.data.splits)
    assert len(rows) == len(Path(params.data.validated).read_text(encoding="utf-8").splitlines())  # all records
    assert all(r["group_id"] in split["groups"][r["split"]] for r in rows)
    test = [r for r in rows if r["split"] == "test"]
    judge = [float(r["judge_overall"]) for r in test]
    pred = [float(r["pred_overall"]) for r in test]
    groups = [r["group_id"] for r in test]
    assert regression_metrics(judge, pred)["spearman"] == pytest.approx(metrics["overall.spearman"], abs=1e-4)
    assert pairwise_accuracy(judge, pred, groups, params.evaluate.min_gap)[0] == pytest.approx(
        metrics["pairwise_accuracy"], abs=1e-4
    )
    assert best_of_n_agreement(judge, pred, groups)[0] == pytest.approx(metrics["best_of_n_agreement"], abs=1e-4)
    assert best_of_n_gain(judge, pred, groups)[0] == pytest.approx(metrics["best_of_n_gain"], abs=1e-4)
    with open(params.data.test_predictions, encoding="utf-8") as handle:
        assert list(csv.DictReader(handle)) == test  # the file `dvc plots show` draws: the test rows, nothing else


def test_plots_and_report_are_written(evaluated):
    params, _ = evaluated
    for name in ("scatter.png", "calibration.png", "dimensions.png"):
        assert (Path(params.data.plots_dir) / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = Path(params.data.report).read_text(encoding="utf-8")
    assert "| reward model |" in report and "plots/scatter.png" in report
    assert "| baseline: char TF-IDF |" in report and "| baseline: word TF-IDF |" in report
    assert "best-of-N gain" in report


def test_refuses_a_model_trained_on_another_split(evaluated, tmp_path):
    params, _ = evaluated
    split = read_json(params.data.splits)
    split["groups"]["train"], split["groups"]["test"] = split["groups"]["test"], split["groups"]["train"]
    moved = params.model_copy(update={"data": params.data.model_copy(update={"splits": tmp_path / "splits.json"})})
    write_json(moved.data.splits, split)
    with pytest.raises(FluentRewardError, match="another split"):
        run_evaluate(moved)


def test_truncation_is_counted_in_train_and_evaluate_metrics(evaluated):
    from transformers import AutoTokenizer

    from fluent_reward.model import format_segments, split_turns

    params, metrics = evaluated
    split = read_json(params.data.splits)
    tokenizer = AutoTokenizer.from_pretrained(params.data.model_dir)
    records = [json.loads(line) for line in Path(params.data.validated).read_text(encoding="utf-8").splitlines()]

    def over(name: str) -> int:  # inputs whose untruncated form exceeds max_length, counted independently
        rows = [r for r in records if r["group_id"] in split["groups"][name]]
        pairs = [format_segments(split_turns(r["context"]), r["student_message"], r["tutor_response"]) for r in rows]
        return sum(len(tokenizer(a, b)["input_ids"]) > params.train.max_length for a, b in pairs)

    assert metrics["truncated_examples"] == over("test") > 0
    assert metrics["validation.truncated_examples"] == over("validation")
    assert metrics["truncated_share"] == pytest.approx(over("test") / metrics["n_test"], abs=1e-4)
    assert metrics["truncated_mean_dropped_tokens"] > 0
    train = read_json(params.data.train_metrics)
    assert train["train.truncated_examples"] == over("train")
    assert train["validation.truncated_examples"] == over("validation")
