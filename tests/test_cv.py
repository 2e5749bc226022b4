"""Grouped K-fold cross-validation and the learning curve: fold assignment on hand-checkable data, a tiny end-to-end
run whose metrics are recomputed from its out-of-fold predictions, the CLI's messages, and the separate DVC pipeline."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from fluent_reward.config import CvConfig
from fluent_reward.cv import (
    CURVE_METRICS,
    SYSTEMS,
    assign_folds,
    fold_metrics,
    fraction_key,
    mean_and_std,
    plan_fold,
    run_cv,
)
from fluent_reward.data import load_judged_records
from fluent_reward.io import read_json
from tests.support import make_learnable_backbone, tiny_project

ROOT = Path(__file__).resolve().parents[1]
N_GROUPS = 12  # tiny_project: 4 replies per group


def _cv(folds: int = 3, fractions: tuple[float, ...] = (0.5, 1.0), share: float = 0.15, seed: int = 0) -> CvConfig:
    return CvConfig(folds=folds, fractions=list(fractions), validation_share=share, seed=seed)


# ----------------------------------------------------------------------------------------------------------------
# Folds


def test_folds_keep_groups_whole_balance_sizes_and_spread_languages():
    groups = {f"g{i}": ("French" if i < 14 else "Korean") for i in range(20)}
    fold_of = assign_folds(groups, 4, seed=0)
    assert set(fold_of) == set(groups)  # every group in exactly one fold (a dict: one fold per group)
    assert sorted(Counter(fold_of.values()).values()) == [5, 5, 5, 5]
    for language, total in (("French", 14), ("Korean", 6)):
        per_fold = Counter(fold_of[g] for g, lang in groups.items() if lang == language)
        assert sum(per_fold.values()) == total and max(per_fold.values()) - min(per_fold.values()) <= 1
    assert assign_folds(groups, 4, seed=0) == fold_of  # seeded
    assert assign_folds(groups, 4, seed=1) != fold_of


def test_too_few_groups_for_the_folds():
    with pytest.raises(Exception, match=r"cv.folds=5 needs at least 5 groups .* has 3"):
        assign_folds({"a": "x", "b": "x", "c": "y"}, 5, seed=0)


def test_fold_plan_nested_subsets_and_disjoint_roles():
    groups = {f"g{i}": ("es" if i % 3 else "fr") for i in range(N_GROUPS)}
    cfg = _cv(folds=3, fractions=(0.25, 0.5, 1.0))
    fold_of = assign_folds(groups, 3, seed=0)
    tested: list[str] = []
    for fold in range(3):
        plan = plan_fold(groups, fold_of, fold, cfg)
        tested += plan.test
        # 12 groups / 3 folds: 4 predicted, 8 others -> 1 for early stopping (round(8 * 0.15)), 7 for training
        assert (len(plan.test), len(plan.validation), len(plan.train[1.0])) == (4, 1, 7)
        assert [len(plan.train[f]) for f in (0.25, 0.5)] == [2, 4]  # round(1.75), round(3.5)
        assert set(plan.train[0.25]) <= set(plan.train[0.5]) <= set(plan.train[1.0])
        assert not set(plan.test) & (set(plan.validation) | set(plan.train[1.0]))
        assert not set(plan.validation) & set(plan.train[1.0])
    assert sorted(tested) == sorted(groups)  # each group predicted by exactly one fold


def test_validation_share_zero_trains_on_every_other_group():
    groups = {f"g{i}": ("French", "Korean")[i % 2] for i in range(N_GROUPS)}
    fold_of = assign_folds(groups, 3, seed=0)
    for fold in range(3):
        with_validation, without = (plan_fold(groups, fold_of, fold, _cv(share=s)) for s in (0.15, 0.0))
        assert without.test == with_validation.test and without.validation == []
        assert sorted(without.train[1.0]) == sorted(with_validation.train[1.0] + with_validation.validation)
        assert set(without.train[0.5]) <= set(without.train[1.0]) and len(without.train[0.5]) == 4


def test_fold_with_no_training_group_is_refused():
    groups = {"a": "x", "b": "x"}
    with pytest.raises(Exception, match="leaves 1 group"):
        plan_fold(groups, assign_folds(groups, 2, seed=0), 0, _cv(folds=2))


# ----------------------------------------------------------------------------------------------------------------
# Metrics on hand values


def test_mean_and_std_across_folds_hand_values():
    folds = [{"a": 1.0, "b": math.nan}, {"a": 3.0, "b": 2.0}, {"a": math.nan, "b": math.nan}]
    out = mean_and_std(folds)
    assert out["a.mean"] == pytest.approx(2.0) and out["a.std"] == pytest.approx(math.sqrt(2))  # ddof 1, NaN left out
    assert out["b.mean"] == pytest.approx(2.0) and math.isnan(out["b.std"])  # one defined fold: no spread
    assert list(mean_and_std(folds, ["a"])) == ["a.mean", "a.std"]


def test_fold_metrics_hand_values():
    judge = np.array([[9.0, 1.0], [5.0, 2.0], [1.0, 3.0], [6.0, 4.0], [2.0, 5.0]])
    pred = np.array([[3.0, 5.0], [2.0, 4.0], [1.0, 3.0], [0.0, 2.0], [1.0, 1.0]])
    out = fold_metrics(judge, pred, ["a", "a", "a", "b", "b"], ["dim"], min_gap=0.5)
    assert out["pairwise_accuracy"] == pytest.approx(3 / 4)  # a: 3 right; b: 1 wrong
    assert out["best_of_n_agreement"] == pytest.approx(1 / 2)
    assert out["best_of_n_gain"] == pytest.approx((1.0 + (2 - 4) / 2) / 2)  # a: 1; b: (2 - 4) / (6 - 4) = -1
    assert out["dimensions.dim.spearman"] == pytest.approx(-1.0)  # the dimension in reverse order


def test_fraction_keys_have_no_dots():
    assert [fraction_key(f) for f in (0.25, 0.5, 1.0, 0.125)] == ["25pct", "50pct", "100pct", "12_5pct"]


# ----------------------------------------------------------------------------------------------------------------
# End to end on a tiny random model


def _tiny_params(root: Path, folds: int, fractions: tuple[float, ...]):
    params = tiny_project(root, make_learnable_backbone(root / "backbone"), n_groups=N_GROUPS, epochs=1)
    return params.model_copy(update={"cv": _cv(folds=folds, fractions=fractions)})


@pytest.fixture(scope="module")
def cross_validated(tmp_path_factory):
    params = _tiny_params(tmp_path_factory.mktemp("cv"), folds=3, fractions=(0.5, 1.0))
    return params, run_cv(params, progress=False)


def test_every_record_is_predicted_once_per_fraction_by_a_model_that_never_saw_its_group(cross_validated):
    params, result = cross_validated
    records = [json.loads(line) for line in Path(params.data.validated).read_text(encoding="utf-8").splitlines()]
    assert sorted(Counter(result.fold_of.values()).values()) == [4, 4, 4]
    for fraction in (0.5, 1.0):
        for system in SYSTEMS:
            values = result.predictions[fraction][system]
            assert values.shape == (len(records), 1 + len(params.rubric.names))
            assert np.isfinite(values).all(), f"{system} at {fraction}: a record was never predicted"
        for fold, train in enumerate(result.train_groups[fraction]):
            assert not {g for g, f in result.fold_of.items() if f == fold} & set(train)


def test_cv_metrics_file_keys_and_values_recompute_from_the_predictions(cross_validated):
    params, result = cross_validated
    on_disk = json.loads(Path(params.data.cv_metrics).read_text(), parse_constant=pytest.fail)  # no NaN
    assert on_disk == result.metrics
    dims = params.rubric.names
    metrics = ("spearman", "pairwise_accuracy", "best_of_n_agreement", "best_of_n_gain")
    required = [f"{s}.{m}.{a}" for s in SYSTEMS for m in metrics for a in ("mean", "std")]
    required += [f"{s}.dimensions.{d}.spearman.mean" for s in SYSTEMS for d in dims]
    required += [
        f"curve.{p}.{s}.{m}.{a}"
        for p in ("50pct", "100pct")
        for s in SYSTEMS
        for m in CURVE_METRICS
        for a in ("mean", "std")
    ]
    assert [k for k in required if k not in on_disk] == []
    assert (on_disk["folds"], on_disk["n"], on_disk["n_groups"]) == (3, 4 * N_GROUPS, N_GROUPS)
    # the learning curve's x: 8 other groups per fold, 1 for early stopping, 7 for training, half of them 4
    assert on_disk["curve.100pct.train_groups.mean"] == on_disk["train_groups.mean"] == 7
    assert on_disk["curve.50pct.train_groups.mean"] == 4
    # the means recompute from the out-of-fold predictions
    records = load_judged_records(params.data.validated, params.data.judgments, params.rubric)  # run_cv's order
    judge = np.array([[r["overall"]] for r in records])
    for system in ("model", "char_tfidf_ridge"):
        per_fold = []
        for fold in range(3):
            idx = [i for i, r in enumerate(records) if result.fold_of[r["group_id"]] == fold]
            pred = result.predictions[1.0][system][idx]
            per_fold.append(fold_metrics(judge[idx], pred[:, :1], [records[i]["group_id"] for i in idx], [], 0.5))
        for metric in ("spearman", "pairwise_accuracy"):
            values = [f[metric] for f in per_fold]
            assert on_disk[f"{system}.{metric}.mean"] == pytest.approx(np.mean(values), abs=1e-4)
            assert on_disk[f"{system}.{metric}.std"] == pytest.approx(np.std(values, ddof=1), abs=1e-4)
    png = Path(params.data.plots_dir) / "learning_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_cv_resumes_from_its_finished_runs(cross_validated, monkeypatch):
    import fluent_reward.cv as cv

    params, result = cross_validated
    finished = sorted((Path(params.data.logs_dir) / "cv").glob("fold*.json"))
    assert [p.name for p in finished] == [f"fold{k}_{p}.json" for k in (1, 2, 3) for p in ("100pct", "50pct")]
    finished[0].unlink()  # as if killed during that run
    calls = []
    real_fit = cv.fit
    monkeypatch.setattr(cv, "fit", lambda *a, **kw: calls.append(1) or real_fit(*a, **kw))
    again = run_cv(params, progress=False)
    assert len(calls) == 1  # only the missing run trained again
    assert again.metrics["folds"] == result.metrics["folds"] and finished[0].is_file()
    for fraction in (0.5, 1.0):  # the reused runs' scores are the saved ones, exactly
        np.testing.assert_array_equal(again.predictions[fraction]["length"], result.predictions[fraction]["length"])
    other = params.model_copy(update={"train": params.train.model_copy(update={"lr": 1e-3})})

    def refuse(*args, **kwargs):
        raise RuntimeError("trained again")

    monkeypatch.setattr(cv, "fit", refuse)
    with pytest.raises(RuntimeError, match="trained again"):  # another training setting: nothing is reused
        run_cv(other, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _write_params(params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), allow_unicode=True, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--folds", "1"], "--folds: Input should be greater than or equal to 2"),
        (["--fractions", "0.5,abc"], "--fractions: '0.5,abc' is not a comma-separated list of numbers"),
        (["--fractions", "0,1"], "cv.fractions must be distinct numbers in (0, 1]"),
        (["--folds", "50"], "cv.folds=50 needs at least 50 groups (contexts); the data has 12"),
    ],
)
def test_cli_refuses_bad_settings_with_one_line(cross_validated, tmp_path, capsys, args, message):
    from fluent_reward.cli import main

    params, _ = cross_validated
    path = _write_params(params, tmp_path / "params.yaml")
    assert main(["--params", str(path), "cv", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_runs_and_prints_the_summary(tmp_path, capsys):
    from fluent_reward.cli import main

    params = _tiny_params(tmp_path, folds=2, fractions=(1.0,))
    path = _write_params(params, tmp_path / "params.yaml")
    assert main(["--params", str(path), "cv", "--no-progress", "--folds", "3", "--fractions", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cv (3 folds): model Spearman") and "char TF-IDF Spearman" in out
    assert read_json(params.data.cv_metrics)["folds"] == 3


# ----------------------------------------------------------------------------------------------------------------
# The separate DVC pipeline


def test_cv_pipeline_is_apart_from_dvc_repro_and_reads_params_it_lists(tmp_path):
    stage = yaml.safe_load((ROOT / "cv/dvc.yaml").read_text())["stages"]["cv"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert stage["cmd"] == "fluent-reward cv"
    listed = [(params, key) for key in stage["params"] if isinstance(key, str)]
    for entry in (e for e in stage["params"] if isinstance(e, dict)):  # {other params file: [keys]}
        for file, keys in entry.items():
            listed += [(yaml.safe_load((ROOT / file).read_text()), key) for key in keys]
    for source, key in listed:
        node = source
        for part in key.split("."):
            node = node[part]  # KeyError: cv/dvc.yaml lists a param that its params file lacks
    text = (ROOT / "cv/dvc.yaml").read_text()
    for key, value in params["data"].items():
        assert str(value) not in text, f"cv/dvc.yaml writes {value} instead of ${{data.{key}}}"
    project = tmp_path / "project"
    (project / "cv").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", "rubric.yaml", "cv/dvc.yaml"):
        shutil.copy(ROOT / name, project / name)

    def dvc(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    dvc("init", "--no-scm", "-q")
    default = [line.split()[0] for line in dvc("stage", "list").splitlines()]  # what `dvc repro` runs
    assert "cv" not in default and {"validate", "judge", "train", "evaluate"} <= set(default)
    assert "metrics/cv.json" in dvc("stage", "list", "cv/dvc.yaml")  # `dvc repro cv/dvc.yaml`, paths from params
