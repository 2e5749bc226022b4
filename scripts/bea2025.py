"""Turn the BEA 2025 shared task's tutor-reply data into a project you can run the pipeline on (no API key).

The BEA 2025 data (``dev_partA.json``: math-tutoring dialogues, about 8 candidate tutor replies each, human labels
"Yes" / "To some extent" / "No" on four dimensions) becomes, under OUT:

- ``conversations.json``: one record per reply; ``context`` = the dialogue minus its last turn, which is the
  ``student_message``; the tutor's name (GPT4, Expert, ...) is never part of a record;
- ``reference/bea2025_labels.json``: the human labels as reference judgments (Yes 10, To some extent 5.5, No 1), so
  the judge stage uses them and never calls the API;
- ``rubric.yaml``: the four dimensions, equal weights, no anchors (the judge is never asked);
- ``params.yaml``: this project's params.yaml with every data path moved under OUT and the rubric and reference
  folder above; every other setting (the training recipe included) is the project's default.

Then the pipeline runs on it stage by stage (docs/TRAINING.md, "Real data: BEA 2025"):

    .venv/bin/python scripts/bea2025.py path/to/bea2025_dev/dev_partA.json outputs/bea
    for stage in validate judge train evaluate; do .venv/bin/fluent-reward --params outputs/bea/params.yaml $stage; done

and the shared task's 3-class macro-F1 comes from evaluate's predictions (``--f1``, the test split) or from a finished
``fluent-reward cv`` of the project (``--cv-f1``, every system, mean and spread over the folds; ``--fraction 0.5``
for the runs of a learning-curve point).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fluent_reward.config import load_params, read_yaml
from fluent_reward.cv import CHECKPOINT_DIR, fraction_key
from fluent_reward.data import load_judged_records
from fluent_reward.errors import FluentRewardError
from fluent_reward.io import atomic_open, read_json, write_json
from fluent_reward.model import split_turns, target_matrix

DIMENSIONS = {
    "Mistake_Identification": "Has the tutor identified a mistake in the student's latest response?",
    "Mistake_Location": "Does the tutor's response accurately point to the genuine mistake and its location?",
    "Providing_Guidance": "Does the tutor offer correct and relevant guidance, such as an explanation, an "
    "elaboration, a hint or examples?",
    "Actionability": "Is it clear from the tutor's feedback what the student should do next?",
}
LABEL_SCORES = {"Yes": 10.0, "To some extent": 5.5, "No": 1.0}
LABEL_CUTS = (3.25, 7.75)  # halfway between the label scores: No | To some extent | Yes
STUDENT = "Student:"


def records_and_labels(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Project records and their reference judgments, one per (dialogue, reply), in file order."""
    records, labels = [], []
    for item in items:
        turns = split_turns(item["conversation_history"])
        # The last turn is the student's latest message; in a few dialogues it is mislabelled "Tutor:", and it is
        # still the turn being answered, so it is kept whole (with its label) rather than lost.
        last = turns.pop() if turns else ""
        student = last[len(STUDENT) :].strip() if last.startswith(STUDENT) else last
        # Replies are numbered in the tutors' sorted order; the number, not the tutor's name, goes into the id.
        for number, (_tutor, reply) in enumerate(sorted(item["tutor_responses"].items()), start=1):
            record_id = f"{item['conversation_id']}-{number}"
            records.append(
                {
                    "id": record_id,
                    "conversation_id": item["conversation_id"],
                    "language": "English",
                    "context": "\n".join(turns),
                    "student_message": student,
                    "tutor_response": reply["response"],
                }
            )
            scores = {name: LABEL_SCORES[reply["annotation"][name]] for name in DIMENSIONS}
            labels.append({"id": record_id, "scores": scores, "rationale": "human annotation (BEA 2025)"})
    return records, labels


def rubric() -> dict[str, Any]:
    return {
        "version": "bea2025",
        "scale": {"min": 1, "max": 10},
        "weights": {name: 0.25 for name in DIMENSIONS},
        "dimensions": {name: {"description": text} for name, text in DIMENSIONS.items()},
    }


def project_params(base: dict[str, Any], out: Path) -> dict[str, Any]:
    """The project's params with the data paths under ``out``; shared locations (the backbones) stay."""
    params = copy.deepcopy(base)
    for key, value in params["data"].items():
        if key != "backbones":  # every other file and folder name is distinct: keep it, under out
            params["data"][key] = str(out / Path(value).name)
    params["rubric"] = "rubric.yaml"
    params["judge"]["reference_dir"] = str(out / "reference")
    # A few replies recur word for word under two dialogue ids: grouping by content keeps them in one split, and
    # the validator drops the exact duplicates instead of stopping.
    params["validate"]["group_by"] = "content"
    params["validate"]["on_error"] = "drop"
    return params


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: keeps the order of the keys (the rubric dimensions are the model's output order)
    yaml.default_flow_style = False
    yaml.width = 120
    with atomic_open(path) as handle:
        yaml.dump(data, handle)


def three_class_scores(truth: np.ndarray, pred: np.ndarray, train_truth: np.ndarray) -> dict[str, float]:
    """Macro-F1 over No / To some extent / Yes of predicted scores ``pred`` against judge-scale labels ``truth``,
    the predictions cut at the fixed ``LABEL_CUTS`` ("fixed"), at the cuts that give the predicted classes the
    class shares of the training labels ``train_truth`` ("prior"), and at the two cuts that maximise this very
    macro-F1 ("best": chosen on the labels scored, so an upper bound no cut rule can reach; it says whether a
    better threshold could close a gap, or only a model that orders the replies better)."""
    from sklearn.metrics import f1_score

    train_classes = np.digitize(train_truth, LABEL_CUTS)
    shares = np.cumsum(np.bincount(train_classes, minlength=3))[:2] / len(train_classes)
    classes = np.digitize(truth, LABEL_CUTS)
    cuts = {"fixed": LABEL_CUTS, "prior": np.quantile(pred, shares)}
    scores = {
        kind: float(f1_score(classes, np.digitize(pred, c), average="macro", labels=[0, 1, 2], zero_division=0))
        for kind, c in cuts.items()
    }
    scores["best"] = best_cut_f1(classes, np.asarray(pred, dtype=float))
    return scores


def best_cut_f1(classes: np.ndarray, pred: np.ndarray) -> float:
    """The highest 3-class macro-F1 of any two cuts of ``pred`` (classes 0 / 1 / 2 below / between / above them),
    exactly: every pair of cut positions between distinct sorted predictions, from per-class running counts (F1 =
    2 TP / (true + predicted), 0 for a class with neither, as sklearn's ``zero_division=0``)."""
    order = np.argsort(pred, kind="stable")
    ordered, sorted_classes = pred[order], classes[order]
    n = len(pred)
    below = np.zeros((3, n + 1))  # below[k, p]: replies of class k among the p lowest predictions
    below[:, 1:] = np.cumsum(sorted_classes[None, :] == np.arange(3)[:, None], axis=1)
    true = below[:, n]
    positions = np.flatnonzero(np.r_[True, ordered[1:] > ordered[:-1], True])  # a cut never splits equal scores

    def f1(tp: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
        total = predicted + true[k]
        return np.divide(2 * tp, total, out=np.zeros_like(tp), where=total > 0)

    best = 0.0
    for low in positions:  # O(n) memory per step: fine for folds of any size
        high = positions[positions >= low]
        macro = (
            f1(np.full(len(high), below[0, low]), np.full(len(high), float(low)), 0)
            + f1(below[1, high] - below[1, low], (high - low).astype(float), 1)
            + f1(true[2] - below[2, high], (n - high).astype(float), 2)
        ) / 3
        best = max(best, float(macro.max()))
    return best


def three_class_f1(predictions: Path, split: str = "test") -> dict[str, dict[str, float]]:
    """The shared task's metric from evaluate's predictions CSV: per dimension, ``three_class_scores`` of the
    ``split`` rows, the "prior" cuts taken from the train rows."""
    import csv

    rows = list(csv.DictReader(predictions.open(encoding="utf-8")))

    def column(kind: str, name: str, wanted: str) -> np.ndarray:
        return np.array([float(r[f"{kind}_{name}"]) for r in rows if r["split"] == wanted])

    return {
        name: {
            k: round(v, 4)
            for k, v in three_class_scores(
                column("judge", name, split), column("pred", name, split), column("judge", name, "train")
            ).items()
        }
        for name in DIMENSIONS
    }


def cv_three_class_f1(params_path: Path, fraction: float = 1.0) -> dict[str, Any]:
    """The shared task's metric from a finished ``fluent-reward cv`` of the project ``params_path``: for every
    system in its fold checkpoints (the reward model, its transformer alone, the baselines) and every dimension, the
    mean and standard deviation over folds of ``three_class_scores`` of the fold's out-of-fold scores, the "prior"
    cuts taken from the records outside the fold. Reads the runs trained on ``fraction`` of each fold's training
    groups (``fold<k>_<pct>.json``; 1.0: the full-data runs, else a learning-curve point of ``cv.fractions``)."""
    params = load_params(params_path)
    folder = params.data.logs_dir / CHECKPOINT_DIR
    files = sorted(folder.glob(f"fold*_{fraction_key(fraction)}.json"))
    if not files:
        raise FluentRewardError(
            f"{folder}: no finished cross-validation runs on {fraction:g} of the training groups "
            "(run `fluent-reward cv` first; its cv.fractions name the shares it trains on)"
        )
    records = load_judged_records(params.data.validated, params.data.judgments, params.rubric)
    names = params.rubric.names
    judge = target_matrix(records, names)  # column 0: overall, then the dimensions in rubric order
    index = {r["id"]: i for i, r in enumerate(records)}
    per_fold: dict[str, dict[str, list[dict[str, float]]]] = {}
    for path in files:
        run = read_json(path)
        unknown = [i for i in run["ids"] if i not in index]
        if unknown:
            raise FluentRewardError(f"{path}: record {unknown[0]!r} is not in {params.data.validated}")
        rows = np.array([index[i] for i in run["ids"]])
        rest = np.setdiff1d(np.arange(len(records)), rows)
        for system, values in run["scores"].items():
            scores = np.asarray(values, dtype=float)
            for d, name in enumerate(names, start=1):
                per_fold.setdefault(system, {}).setdefault(name, []).append(
                    three_class_scores(judge[rows, d], scores[:, d], judge[rest, d])
                )

    def summary(folds: list[dict[str, float]]) -> dict[str, float]:
        out = {}
        for kind in ("fixed", "prior", "best"):
            values = np.array([f[kind] for f in folds])
            out[kind] = round(float(values.mean()), 4)
            out[f"{kind}_std"] = round(float(values.std(ddof=1)), 4) if len(values) > 1 else 0.0
        return out

    return {
        "fraction": fraction,
        "folds": len(files),
        "systems": {s: {name: summary(f) for name, f in dims.items()} for s, dims in per_fold.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source",
        type=Path,
        help="the BEA 2025 JSON file (e.g. dev_partA.json), or with --f1 the "
        "predictions CSV evaluate wrote (data.predictions), or with --cv-f1 the project's params file",
    )
    parser.add_argument("out", type=Path, nargs="?", help="folder for the project files (e.g. outputs/bea)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the settings to start from")
    parser.add_argument("--f1", action="store_true", help="print the test split's 3-class macro-F1 per dimension")
    parser.add_argument(
        "--cv-f1",
        action="store_true",
        help="print the 3-class macro-F1 per system and dimension, mean and std over the folds of the finished "
        "`fluent-reward cv` of the project whose params file is SOURCE (e.g. outputs/bea/params.yaml)",
    )
    parser.add_argument(
        "--fraction",
        type=float,
        default=1.0,
        help="with --cv-f1: the runs trained on this share of each fold's training groups (one of cv.fractions, "
        "e.g. 0.5: a point of the learning curve); default 1.0",
    )
    args = parser.parse_args(argv)
    if args.fraction != 1.0 and not args.cv_f1:
        parser.error("--fraction goes with --cv-f1")
    if not (args.f1 or args.cv_f1) and args.out is None:
        parser.error("the output folder is needed (bea2025.py SOURCE OUT)")
    if not args.source.is_file():
        print(f"error: {args.source}: not found", file=sys.stderr)
        return 2
    if args.cv_f1:
        try:
            print(json.dumps(cv_three_class_f1(args.source, args.fraction), indent=1))
        except FluentRewardError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.f1:
        print(json.dumps(three_class_f1(args.source), indent=1))
        return 0
    records, labels = records_and_labels(json.loads(args.source.read_text(encoding="utf-8")))
    write_json(args.out / "conversations.json", records)
    write_json(
        args.out / "reference" / "bea2025_labels.json",
        {
            "source": "reference",
            "rubric_version": "bea2025",
            "scale": {"min": 1, "max": 10},
            "provenance": {"who": "BEA 2025 shared task annotators", "how": "Yes 10, To some extent 5.5, No 1"},
            "judgments": labels,
        },
    )
    write_yaml(args.out / "rubric.yaml", rubric())
    write_yaml(args.out / "params.yaml", project_params(read_yaml(args.params), args.out))
    print(f"{len(records)} replies in {len({r['conversation_id'] for r in records})} dialogues -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
