"""scripts/bea2025.py: BEA 2025 tutor-reply data becomes a project the pipeline runs on without an API key."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from fluent_reward.cli import main as cli
from fluent_reward.config import load_params
from fluent_reward.io import read_json

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bea2025.py"
DIMS = ["Mistake_Identification", "Mistake_Location", "Providing_Guidance", "Actionability"]


def _reply(text: str, *labels: str) -> dict:
    return {"response": text, "annotation": dict(zip(DIMS, labels, strict=True))}


def _bea_file(path: Path) -> Path:
    items = [
        {
            "conversation_id": "d1",
            "conversation_history": "Tutor: What is 3 x 4?\nStudent: 3 x 4 = 7 because I added.\n"
            "Tutor: Check again.\nStudent: Still 7?",
            "tutor_responses": {
                "GPT4": _reply(
                    "You added instead of multiplying: 3 x 4 means three fours.", "Yes", "Yes", "Yes", "Yes"
                ),
                "Novice": _reply("Good job!", "No", "No", "No", "No"),
            },
        },
        {
            # the last turn is labelled "Tutor:" (as in a few real dialogues): it is still the turn answered
            "conversation_id": "d2",
            "conversation_history": "Tutor: Solve x + 2 = 5.\nStudent: x = 7\nTutor: I subtracted 2 and got 7.",
            "tutor_responses": {
                "Expert": _reply("What do you get when you take 2 away from 5?", "Yes", "To some extent", "Yes", "Yes"),
                "Phi3": _reply("x is 3.", "To some extent", "No", "No", "No"),
            },
        },
    ]
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def test_conversion_then_validate_and_judge_run_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    source, out = _bea_file(tmp_path / "dev.json"), tmp_path / "bea"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(source), str(out)], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "4 replies in 2 dialogues" in done.stdout
    records = read_json(out / "conversations.json")
    assert [r["id"] for r in records] == ["d1-1", "d1-2", "d2-1", "d2-2"]
    first = records[0]
    assert first["context"] == "Tutor: What is 3 x 4?\nStudent: 3 x 4 = 7 because I added.\nTutor: Check again."
    assert first["student_message"] == "Still 7?"
    assert records[2]["student_message"] == "Tutor: I subtracted 2 and got 7."
    assert not any(name in json.dumps(records) for name in ("GPT4", "Novice", "Expert", "Phi3"))
    labels = {j["id"]: j["scores"] for j in read_json(out / "reference" / "bea2025_labels.json")["judgments"]}
    assert labels["d2-1"] == {
        "Mistake_Identification": 10.0,
        "Mistake_Location": 5.5,
        "Providing_Guidance": 10.0,
        "Actionability": 10.0,
    }
    params = load_params(out / "params.yaml")
    assert params.rubric.names == DIMS and params.rubric.missing_anchors() == DIMS
    assert params.data.model_dir == out / "reward_model_final" and params.data.backbones == Path("models/backbones")
    assert params.train == load_params(REPO / "params.yaml").train  # the default recipe, unchanged
    monkeypatch.chdir(REPO)  # the generated params name paths relative to the project root
    assert cli(["--params", str(out / "params.yaml"), "validate"]) == 0
    assert cli(["--params", str(out / "params.yaml"), "judge"]) == 0
    judged = read_json(out / "claude_judgments.json")
    assert len(judged["judgments"]) == 4 and read_json(out / "judge.json")["api_calls"] == 0


def test_a_missing_source_is_a_one_line_error(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "absent.json"), str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and done.stderr.strip() == f"error: {tmp_path / 'absent.json'}: not found"
    assert not (tmp_path / "out").exists()


def test_three_class_f1_hand_values(tmp_path):
    header = "id,group_id,language,split," + ",".join(f"judge_{d},pred_{d}" for d in DIMS)
    # train rows: class shares 1/2 Yes, 1/4 To some extent, 1/4 No; test rows: predictions on a shrunken scale
    rows = [("train", 10, 9), ("train", 10, 9), ("train", 5.5, 5), ("train", 1, 2)]
    rows += [("test", 10, 7.0), ("test", 10, 6.9), ("test", 5.5, 6.0), ("test", 1, 5.0)]
    lines = [header] + [f"r{i},g,English,{s}," + ",".join(f"{j},{p}" for _ in DIMS) for i, (s, j, p) in enumerate(rows)]
    path = tmp_path / "predictions.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(path), "--f1"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    f1 = json.loads(done.stdout)
    # fixed cuts (3.25, 7.75): every test prediction is "To some extent" -> F1 of that class 2/5, others 0
    assert f1["Mistake_Identification"]["fixed"] == round((0 + 0.4 + 0) / 3, 4)
    # prior cuts at the 25% and 50% quantiles of the test predictions: No, To some extent, Yes, Yes -> all right
    assert f1["Actionability"]["prior"] == 1.0
    # the best two cuts (5.0 | 6.0 | 6.9, 7.0) sort all four right
    assert f1["Mistake_Identification"]["best"] == 1.0
    misused = subprocess.run(
        [sys.executable, str(SCRIPT), str(path), "--f1", "--fraction", "0.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert misused.returncode == 2 and "--fraction goes with --cv-f1" in misused.stderr


def test_cv_f1_from_the_fold_checkpoints_hand_values(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    out = tmp_path / "bea"
    subprocess.run([sys.executable, str(SCRIPT), str(_bea_file(tmp_path / "dev.json")), str(out)], cwd=REPO, check=True)
    monkeypatch.chdir(REPO)
    params_file = out / "params.yaml"
    assert cli(["--params", str(params_file), "validate"]) == 0
    assert cli(["--params", str(params_file), "judge"]) == 0

    def run_f1(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(SCRIPT), str(params_file), "--cv-f1", *extra]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)

    done = run_f1()
    assert done.returncode == 2 and "no finished cross-validation runs" in done.stderr
    # two folds, one dialogue each; "exact" predicts the labels, "middle" says "To some extent" for everything
    folder = load_params(params_file).data.logs_dir / "cv"
    folder.mkdir(parents=True)
    labels = {j["id"]: j["scores"] for j in read_json(out / "reference" / "bea2025_labels.json")["judgments"]}

    def exact(ids: list[str]) -> list[list[float]]:  # overall 5, then each dimension's label score
        return [[5.0, *(labels[i][d] for d in DIMS)] for i in ids]

    for fold, ids in enumerate((["d1-1", "d1-2"], ["d2-1", "d2-2"]), start=1):
        scores = {"exact": exact(ids), "middle": [[5.5] * 5 for _ in ids]}
        (folder / f"fold{fold}_100pct.json").write_text(json.dumps({"ids": ids, "scores": scores}), encoding="utf-8")
    (folder / "fold1_50pct.json").write_text(json.dumps({"ids": ["nope"], "scores": {}}), encoding="utf-8")
    done = run_f1()
    assert done.returncode == 0, done.stderr
    f1 = json.loads(done.stdout)
    assert f1["folds"] == 2 and f1["fraction"] == 1.0
    mi = f1["systems"]["exact"]["Mistake_Identification"]
    # fold 1 (Yes, No) and fold 2 (Yes, To some extent): two of the three classes right, the third absent -> 2/3
    assert mi["fixed"] == round(2 / 3, 4) and mi["fixed_std"] == 0.0
    middle = f1["systems"]["middle"]["Mistake_Identification"]
    # fold 1: all predicted "To some extent", none is -> 0; fold 2: that class's F1 2/3, the others 0 -> 2/9
    assert middle["fixed"] == round(1 / 9, 4) and middle["fixed_std"] == round((2 / 9) / 2**0.5, 4)
    # a learning-curve point is read only when asked for: its broken run is named, a missing point is said so
    done = run_f1("--fraction", "0.5")
    assert done.returncode == 2 and "fold1_50pct.json: record 'nope' is not in" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_f1("--fraction", "0.25")
    assert done.returncode == 2 and "no finished cross-validation runs on 0.25 of the training groups" in done.stderr
    exact_half = {"ids": ["d1-1", "d1-2"], "scores": {"exact": exact(["d1-1", "d1-2"])}}
    (folder / "fold1_50pct.json").write_text(json.dumps(exact_half), encoding="utf-8")
    half = json.loads(run_f1("--fraction", "0.5").stdout)
    assert half["fraction"] == 0.5 and half["folds"] == 1
    # fixed cuts as in fold 1 above; prior cuts from dialogue 2 (no "No" there) call fold 1's "No" "To some extent"
    assert half["systems"]["exact"]["Mistake_Identification"] == {
        "fixed": round(2 / 3, 4),
        "fixed_std": 0.0,
        "prior": round(1 / 3, 4),
        "prior_std": 0.0,
        "best": round(2 / 3, 4),  # no cut can find the absent "To some extent"
        "best_std": 0.0,
    }


def _load_script():
    spec = importlib.util.spec_from_file_location("bea2025", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_best_cuts_are_the_best_of_every_pair_of_cuts():
    bea = _load_script()
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 14))
        classes = rng.integers(0, 3, n)
        # coarse predictions, so that ties (which no cut can split) are common
        pred = np.round(classes * rng.uniform(0, 2) + rng.normal(0, 1.5, n), int(trial % 2))
        edges = np.r_[pred.min() - 1, np.unique(pred) + 1e-9]
        brute = max(
            f1_score(classes, np.digitize(pred, [a, b]), average="macro", labels=[0, 1, 2], zero_division=0)
            for a, b in itertools.combinations_with_replacement(edges, 2)
        )
        assert bea.best_cut_f1(classes, pred) == pytest.approx(brute, abs=1e-12), (classes, pred)
    # three scores tied: no cut separates them, so one class gets all three
    assert bea.best_cut_f1(np.array([0, 1, 2]), np.array([5.0, 5.0, 5.0])) == pytest.approx((2 / 4) / 3)
