"""Grouped K-fold cross-validation and the learning curve (``fluent-reward cv``, ``dvc repro cv/dvc.yaml``).

One train/validation/test split of the bundled sample leaves 13 test contexts: Spearman's 95% interval is about
±0.2 wide, so comparing two commits on it mostly compares noise. ``run_cv(params)`` instead deals the groups into
``cv.folds`` folds (stratified by language) and, for every fold and every fraction in ``cv.fractions``, trains on that
share of the other folds' training groups (early-stopping on an inner validation split of groups,
``cv.validation_share``), predicts the fold's groups, and fits the baselines on the same training groups. Every
record is predicted exactly once per fraction, by a model that never saw its group.

It writes ``data.cv_metrics`` (flat keys: ``<system>.<metric>.mean`` / ``.std`` across folds for the largest
fraction, ``curve.<N>pct.<system>.<metric>.*`` for every fraction) and ``data.plots_dir/learning_curve.png``.
See docs/TRAINING.md ("Cross-validation and the learning curve").
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from fluent_reward.config import CvConfig, Params
from fluent_reward.data import load_judged_records
from fluent_reward.errors import FluentRewardError
from fluent_reward.evaluate import (
    BASELINE_LABELS,
    BASELINES,
    baseline_scores,
    best_of_n_agreement,
    best_of_n_gain,
    clean_metric,
    pairwise_accuracy,
)
from fluent_reward.io import atomic_open, file_sha256, read_json, stable_hash, write_json
from fluent_reward.model import head_embeddings, predict_scores, target_matrix
from fluent_reward.splits import group_languages, share_count, training_data_sha256
from fluent_reward.stats import spearman
from fluent_reward.train import fit

log = logging.getLogger(__name__)

SYSTEMS = ("model", "transformer", *BASELINES)  # transformer: the model without its n-gram head
CURVE_METRICS = ("spearman", "pairwise_accuracy", "best_of_n_gain")
PLOT_NAME = "learning_curve.png"
CHECKPOINT_DIR = "cv"  # under data.logs_dir: one file per finished (fold, fraction) run


# ----------------------------------------------------------------------------------------------------------------
# Folds: whole groups, languages in proportion


def stratified_order(groups: dict[str, str], seed: int, salt: str) -> list[str]:
    """Group ids (``groups``: id -> language) in a seeded order that interleaves the languages, so that cutting the
    order anywhere, or dealing it round-robin, gives every language in proportion."""
    by_language: dict[str, list[str]] = defaultdict(list)
    for gid, language in groups.items():
        by_language[language].append(gid)
    position = {}
    for members in by_language.values():
        members.sort(key=lambda g: stable_hash(seed, salt, g))
        for i, gid in enumerate(members):
            position[gid] = (i + 0.5) / len(members)
    return sorted(groups, key=lambda g: (position[g], stable_hash(seed, salt, "order", g)))


def assign_folds(groups: dict[str, str], folds: int, seed: int) -> dict[str, int]:
    """group_id -> fold (0..folds-1): whole groups, fold sizes within one, each language spread over the folds."""
    if len(groups) < folds:
        raise FluentRewardError(
            f"cv.folds={folds} needs at least {folds} groups (contexts); the data has {len(groups)}"
        )
    return {gid: i % folds for i, gid in enumerate(stratified_order(groups, seed, "fold"))}


@dataclass
class FoldPlan:
    """One fold: the groups it predicts, its inner validation groups, and its training groups per fraction."""

    test: list[str]
    validation: list[str]
    train: dict[float, list[str]]


def plan_fold(groups: dict[str, str], fold_of: dict[str, int], fold: int, cfg: CvConfig) -> FoldPlan:
    """The groups of the other folds, split into inner validation (``cv.validation_share``, at least one; none
    when it is 0) and training groups; each fraction trains on a stratified prefix of the training groups, so the
    subsets are nested (the 25% groups are among the 50% ones)."""
    rest = {g: groups[g] for g, f in fold_of.items() if f != fold}
    order = stratified_order(rest, cfg.seed, f"inner-{fold}")
    n_validation = share_count(len(order), cfg.validation_share)
    train = order[n_validation:]
    if not train:
        raise FluentRewardError(
            f"cv: fold {fold + 1} leaves {len(order)} group(s) for training and early stopping; "
            "lower cv.folds or cv.validation_share"
        )
    return FoldPlan(
        test=sorted(g for g, f in fold_of.items() if f == fold),
        validation=sorted(order[:n_validation]),
        train={fraction: sorted(train[: share_count(len(train), fraction)]) for fraction in cfg.fractions},
    )


# ----------------------------------------------------------------------------------------------------------------
# Metrics: per fold, then mean and std across folds


def fold_metrics(
    judge: np.ndarray, pred: np.ndarray, groups: Sequence[str], dimensions: Sequence[str], min_gap: float
) -> dict[str, float]:
    """The headline metrics of one fold's predictions (shape (n, 1 + n_dims), overall first)."""
    out = {
        "spearman": spearman(judge[:, 0], pred[:, 0]),
        "pairwise_accuracy": pairwise_accuracy(judge[:, 0], pred[:, 0], groups, min_gap)[0],
        "best_of_n_agreement": best_of_n_agreement(judge[:, 0], pred[:, 0], groups)[0],
        "best_of_n_gain": best_of_n_gain(judge[:, 0], pred[:, 0], groups)[0],
    }
    for k, dim in enumerate(dimensions, start=1):
        out[f"dimensions.{dim}.spearman"] = spearman(judge[:, k], pred[:, k])
    return out


def mean_and_std(per_fold: Sequence[dict[str, float]], keys: Sequence[str] | None = None) -> dict[str, float]:
    """``<key>.mean`` and ``<key>.std`` (sample standard deviation, ddof 1) across folds; a fold where a metric is
    undefined (NaN) is left out of that metric; NaN when no fold (or, for std, fewer than two) defines it."""
    out = {}
    for key in keys or list(per_fold[0]):
        values = [v for v in (fold[key] for fold in per_fold) if math.isfinite(v)]
        out[f"{key}.mean"] = float(np.mean(values)) if values else math.nan
        out[f"{key}.std"] = float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan
    return out


def fraction_key(fraction: float) -> str:
    """``0.25`` -> ``25pct`` (a dot would split the flat metric key)."""
    return f"{fraction * 100:g}".replace(".", "_") + "pct"


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class CvResult:
    """What ``run_cv`` computed: the flat metrics, and per fraction and system the out-of-fold predictions."""

    metrics: dict[str, Any]
    fold_of: dict[str, int]
    predictions: dict[float, dict[str, np.ndarray]]  # fraction -> system -> (n, 1 + n_dims), records' order
    train_groups: dict[float, list[list[str]]] = field(default_factory=dict)  # fraction -> per fold


def with_overrides(params: Params, folds: int | None = None, fractions: Sequence[float] | None = None) -> Params:
    """params with ``cv.folds`` / ``cv.fractions`` replaced (validated like params.yaml itself)."""
    updates = {k: v for k, v in (("folds", folds), ("fractions", fractions)) if v is not None}
    if not updates:
        return params
    try:
        cv = CvConfig.model_validate({**params.cv.model_dump(), **updates})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = f"--{err['loc'][0]}" if err["loc"] else "--fractions"
        raise FluentRewardError(f"{name}: {err['msg']}") from None
    return params.model_copy(update={"cv": cv})


def fold_scores(
    params: Params, records: list[dict], judge: np.ndarray, plan: FoldPlan, fraction: float, progress: bool
) -> dict[str, np.ndarray]:
    """Train on ``plan.train[fraction]`` (early stopping on ``plan.validation``), fit the baselines on the same
    groups, and score the fold's test records: system -> (n_test, 1 + n_dims), judge scale."""
    train_groups, test_groups = set(plan.train[fraction]), set(plan.test)
    train_idx = [i for i, r in enumerate(records) if r["group_id"] in train_groups]
    test_idx = [i for i, r in enumerate(records) if r["group_id"] in test_groups]
    test_records = [records[i] for i in test_idx]
    fitted = fit(params, records, {"train": plan.train[fraction], "validation": plan.validation}, progress=progress)
    alone = fitted.metadata.with_ngram_head(None)
    transformer = predict_scores(fitted.model, fitted.tokenizer, alone, test_records, params.evaluate.batch_size)
    head = fitted.metadata.ngram_head
    replies = [r["tutor_response"] for r in test_records]
    embeddings = head_embeddings(fitted.model, fitted.tokenizer, fitted.metadata, replies, params.evaluate.batch_size)
    blended = head.blend(transformer, replies, embeddings) if head is not None else transformer
    out = {"model": blended, "transformer": transformer}
    del fitted
    gc.collect()
    both = [records[i] for i in train_idx] + test_records
    baselines = baseline_scores(both, judge[train_idx + test_idx], range(len(train_idx)))
    out.update({name: scores[len(train_idx) :] for name, scores in baselines.items()})
    return out


def run_fingerprint(params: Params) -> str:
    """What one fold's predictions depend on besides the fold and the fraction: the data, the settings that shape
    training and the folds, and the code. A finished run with the same fingerprint is reused, not retrained."""
    package = Path(__file__).parent
    modules = ("cv.py", "train.py", "model.py", "frozen_prefix.py", "evaluate.py", "data.py", "ngram.py")
    code = [file_sha256(package / name) for name in modules]
    return stable_hash(
        training_data_sha256(params.data.judgments, params.data.validated),
        code,
        params.train.model_dump(mode="json"),
        params.cv.model_dump(mode="json", exclude={"fractions"}),  # adding a fraction keeps the finished ones
        params.rubric.model_dump(mode="json"),
        length=64,
    )


def _resumed(path: Path, fingerprint: str, ids: list[str]) -> dict[str, np.ndarray] | None:
    """A finished run's test scores from an earlier, interrupted ``cv`` (None when absent or made otherwise)."""
    if not path.is_file():
        return None
    saved = read_json(path)
    if saved.get("fingerprint") != fingerprint or saved.get("ids") != ids:
        return None
    log.info("cv: reusing the finished run in %s", path)
    return {system: np.asarray(values, dtype=float) for system, values in saved["scores"].items()}


def _save_checkpoint(path: Path, fingerprint: str, ids: list[str], scores: dict[str, np.ndarray]) -> None:
    write_json(path, {"fingerprint": fingerprint, "ids": ids, "scores": {s: v.tolist() for s, v in scores.items()}})


def run_cv(params: Params, progress: bool = True) -> CvResult:
    """Grouped K-fold cross-validation of the reward model and the baselines, for every fraction of the curve.

    Args:
        params: reads ``data.validated`` / ``data.judgments`` (inputs), ``data.cv_metrics`` / ``data.plots_dir``
            (outputs), ``rubric``, ``train`` (the training recipe, unchanged), ``evaluate.min_gap`` /
            ``evaluate.batch_size`` and ``cv``.
        progress: show each training run's progress bar.

    Returns:
        A CvResult; writes ``data.cv_metrics`` and ``data.plots_dir/learning_curve.png``. Each finished training
        run's test scores are kept in ``data.logs_dir/cv/``, so an interrupted run resumes where it stopped.
    """
    cfg, paths, dims = params.cv, params.data, params.rubric.names
    records = load_judged_records(paths.validated, paths.judgments, params.rubric)
    judge = target_matrix(records, dims)
    groups = group_languages(records)
    fold_of = assign_folds(groups, cfg.folds, cfg.seed)
    fractions = sorted(cfg.fractions)
    predictions = {f: {s: np.full(judge.shape, np.nan) for s in SYSTEMS} for f in fractions}
    per_fold: dict[float, dict[str, list[dict[str, float]]]] = {f: defaultdict(list) for f in fractions}
    train_groups: dict[float, list[list[str]]] = {f: [] for f in fractions}
    runs, started = cfg.folds * len(fractions), time.perf_counter()
    fingerprint = run_fingerprint(params)
    log.info("cv: %d groups, %d folds x %d fractions = %d training runs", len(groups), cfg.folds, len(fractions), runs)
    for fold in range(cfg.folds):
        plan = plan_fold(groups, fold_of, fold, cfg)
        test_idx = [i for i, r in enumerate(records) if fold_of[r["group_id"]] == fold]
        test_group_ids = [records[i]["group_id"] for i in test_idx]
        for fraction in fractions:
            checkpoint = Path(paths.logs_dir) / CHECKPOINT_DIR / f"fold{fold + 1}_{fraction_key(fraction)}.json"
            scores = _resumed(checkpoint, fingerprint, [records[i]["id"] for i in test_idx])
            if scores is None:
                scores = fold_scores(params, records, judge, plan, fraction, progress)
                _save_checkpoint(checkpoint, fingerprint, [records[i]["id"] for i in test_idx], scores)
            for system, values in scores.items():
                predictions[fraction][system][test_idx] = values
                per_fold[fraction][system].append(
                    fold_metrics(judge[test_idx], values, test_group_ids, dims, params.evaluate.min_gap)
                )
            train_groups[fraction].append(plan.train[fraction])
            done = sum(len(g) for g in train_groups.values())
            last = {s: per_fold[fraction][s][-1]["spearman"] for s in ("model", "char_tfidf_ridge")}
            _log_run(done, runs, started, f"fold {fold + 1}, {fraction_key(fraction)}", len(plan.train[fraction]), last)
    metrics = cv_metrics(per_fold, train_groups, len(records), len(groups), cfg)
    write_json(paths.cv_metrics, metrics)
    plot = render_learning_curve(Path(paths.plots_dir) / PLOT_NAME, metrics, fractions, cfg.folds)
    log.info("%s -> %s, %s", summary_line(metrics, cfg.folds), paths.cv_metrics, plot)
    return CvResult(metrics, fold_of, predictions, train_groups)


def _log_run(done: int, runs: int, started: float, what: str, n_train: int, spearmans: dict[str, float]) -> None:
    elapsed = time.perf_counter() - started
    log.info(
        "cv run %d/%d (%s: %d training groups): Spearman model %.3f, char TF-IDF %.3f; %.0f s elapsed, ~%.0f s left",
        done,
        runs,
        what,
        n_train,
        spearmans["model"],
        spearmans["char_tfidf_ridge"],
        elapsed,
        elapsed / done * (runs - done),
    )


def cv_metrics(
    per_fold: dict[float, dict[str, list[dict[str, float]]]],
    train_groups: dict[float, list[list[str]]],
    n_records: int,
    n_groups: int,
    cfg: CvConfig,
) -> dict[str, Any]:
    """The flat metrics file: the largest fraction's full set at the top level, the curve's headline metrics and
    training-group counts for every fraction under ``curve.<N>pct.``; floats rounded, NaN as null."""
    full = max(per_fold)
    out: dict[str, Any] = {"folds": cfg.folds, "n": n_records, "n_groups": n_groups}
    for system in SYSTEMS:
        out.update({f"{system}.{k}": v for k, v in mean_and_std(per_fold[full][system]).items()})
    out["train_groups.mean"] = float(np.mean([len(g) for g in train_groups[full]]))
    for fraction, systems in per_fold.items():
        prefix = f"curve.{fraction_key(fraction)}."
        out[prefix + "fraction"] = fraction
        out[prefix + "train_groups.mean"] = float(np.mean([len(g) for g in train_groups[fraction]]))
        for system in SYSTEMS:
            stats = mean_and_std(systems[system], CURVE_METRICS)
            out.update({f"{prefix}{system}.{k}": v for k, v in stats.items()})
    return {k: clean_metric(v) for k, v in sorted(out.items())}


def summary_line(metrics: dict[str, Any], folds: int) -> str:
    """One line: mean ± std of Spearman and pairwise accuracy for the model and each baseline."""

    def show(system: str) -> str:
        m = metrics.get
        return (
            f"{BASELINE_LABELS.get(system, system)} Spearman {_fmt(m(f'{system}.spearman.mean'))} ± "
            f"{_fmt(m(f'{system}.spearman.std'))}, pairwise {_fmt(m(f'{system}.pairwise_accuracy.mean'))}, "
            f"best-of-N gain {_fmt(m(f'{system}.best_of_n_gain.mean'))}"
        )

    return f"cv ({folds} folds): " + "; ".join(show(s) for s in SYSTEMS)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------------------------------------------
# The learning-curve plot


def render_learning_curve(path: Path, metrics: dict[str, Any], fractions: Sequence[float], folds: int) -> Path:
    """Mean ± std across folds of Spearman and pairwise accuracy against the number of training groups, for the
    model and each baseline (PNG, matplotlib Agg: no browser, no network)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [metrics[f"curve.{fraction_key(f)}.train_groups.mean"] for f in fractions]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in zip(
        axes, ("spearman", "pairwise_accuracy"), ("Spearman", "pairwise accuracy"), strict=True
    ):
        for system in SYSTEMS:
            keys = [f"curve.{fraction_key(f)}.{system}.{metric}" for f in fractions]
            means = [_num(metrics.get(k + ".mean")) for k in keys]
            stds = [_num(metrics.get(k + ".std"), 0.0) for k in keys]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=BASELINE_LABELS.get(system, system))
        ax.set(xlabel="training groups (contexts) per fold", ylabel=f"{label} vs judge (mean ± std)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best")
    fig.suptitle(f"Learning curve: {folds}-fold grouped cross-validation")
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:  # a killed run never leaves half a PNG
        fig.savefig(handle, dpi=110, format="png")
    plt.close(fig)
    return path


def _num(value: Any, missing: float = math.nan) -> float:
    return missing if value is None else float(value)
