"""The evaluate stage: how well the reward model agrees with the judge, measured on groups it never saw.

``run_evaluate(params)`` scores every record of every split with the saved model, then writes

- ``data.eval_metrics`` (flat, stable keys for ``dvc metrics diff``): test-split metrics at the top level, the same
  metrics for the validation split under ``validation.``, baselines under ``baseline.``, and the judge's test-retest
  agreement under ``judge.`` when the judge stage measured it;
- ``data.predictions``: one row per record (``id, group_id, language, split, judge_*, pred_*``), and the test
  split's rows alone in ``data.test_predictions`` (the scatter ``dvc plots show`` draws);
- PNG plots in ``data.plots_dir`` and a short ``data.report``.

Every metric is a small pure function of arrays. The metrics are computed from the predictions exactly as written
to the CSV (rounded to ``PRED_DECIMALS``), so anyone can recompute them from ``predictions.csv`` alone.
See docs/TRAINING.md ("Metrics") for the definitions.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fluent_reward.config import EvaluateConfig, Params
from fluent_reward.data import load_judged_records
from fluent_reward.errors import FluentRewardError
from fluent_reward.io import atomic_open, read_json, stable_hash, write_json
from fluent_reward.model import (
    OVERALL,
    TruncationStats,
    predict_scores_with_truncation,
    quiet_transformers,
    target_matrix,
)
from fluent_reward.model_folder import load_model_folder
from fluent_reward.ngram import char_tfidf, ridge_per_label
from fluent_reward.splits import SPLITS, UNKNOWN_LANGUAGE, split_of, training_data_sha256
from fluent_reward.stats import spearman

log = logging.getLogger(__name__)

PRED_DECIMALS = 6
METRIC_DECIMALS = 4
BASELINES = ("length", "tfidf_ridge", "char_tfidf_ridge")  # the keys of baseline_scores
TIE_TOLERANCE = 1e-9
BASELINE_LABELS = {"length": "length", "tfidf_ridge": "word TF-IDF", "char_tfidf_ridge": "char TF-IDF"}


# ----------------------------------------------------------------------------------------------------------------
# Metrics: small pure functions of arrays


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """Pearson, Spearman, Kendall (tau-b), MAE and RMSE; a correlation is NaN when either side is constant."""
    from scipy.stats import kendalltau, pearsonr

    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    out = {"mae": float(np.mean(np.abs(p - t))), "rmse": float(np.sqrt(np.mean((p - t) ** 2)))}
    constant = len(t) < 2 or np.ptp(t) == 0 or np.ptp(p) == 0
    out["pearson"] = math.nan if constant else float(pearsonr(t, p).statistic)
    out["spearman"] = spearman(t, p)
    out["kendall"] = math.nan if constant else float(kendalltau(t, p).statistic)
    return out


def bootstrap_spearman_ci(
    y_true: Sequence[float],
    y_pred: Sequence[float],
    groups: Sequence[str],
    n_samples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of Spearman's rho over a cluster bootstrap that resamples whole groups with replacement
    (replies to one context are not independent, so resampling records would make the interval too narrow)."""
    from scipy.stats import rankdata

    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    index: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        index[g].append(i)
    members = [np.array(v) for v in index.values()]
    if len(members) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_samples):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        a, b = t[idx], p[idx]
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        values.append(np.corrcoef(rankdata(a), rankdata(b))[0, 1])
    if not values:
        return math.nan, math.nan
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def pairwise_accuracy(
    y_true: Sequence[float], y_pred: Sequence[float], groups: Sequence[str], min_gap: float
) -> tuple[float, int]:
    """Over every pair of replies in the same group whose judge scores differ by at least ``min_gap``: the fraction
    the model orders like the judge (a model tie counts 1/2). Returns (accuracy, number of pairs); NaN if none."""
    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    g = np.asarray(groups)
    gap = t[:, None] - t[None, :]
    mask = (g[:, None] == g[None, :]) & (gap >= min_gap) & (gap > 0)
    n = int(mask.sum())
    if n == 0:
        return math.nan, 0
    diff = (p[:, None] - p[None, :])[mask]
    credit = np.where(np.abs(diff) <= TIE_TOLERANCE, 0.5, (diff > 0).astype(float))
    return float(credit.mean()), n


def best_of_n_agreement(
    y_true: Sequence[float], y_pred: Sequence[float], groups: Sequence[str]
) -> tuple[float, int, float]:
    """Per group: does the model's top reply equal the judge's? Averaged over groups.

    If the model ties k replies for the top, it is credited with the fraction of them the judge also ranks top
    (1/k for one of k); any of the judge's tied best replies counts as right. Groups with one reply or where the
    judge scores every reply the same are skipped (nothing to choose). Returns (agreement, groups counted, chance),
    where chance is the expected agreement of a uniformly random pick.
    """
    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    index: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        index[g].append(i)
    credits, chances = [], []
    for idx in index.values():
        if len(idx) < 2 or np.ptp(t[idx]) == 0:
            continue
        gt, gp = t[idx], p[idx]
        judge_top = gt >= gt.max() - TIE_TOLERANCE
        model_top = gp >= gp.max() - TIE_TOLERANCE
        credits.append(float((judge_top & model_top).sum() / model_top.sum()))
        chances.append(float(judge_top.sum() / len(idx)))
    if not credits:
        return math.nan, 0, math.nan
    return float(np.mean(credits)), len(credits), float(np.mean(chances))


def best_of_n_gain(y_true: Sequence[float], y_pred: Sequence[float], groups: Sequence[str]) -> tuple[float, int]:
    """The share of the judge's best-of-N benefit that picking by the model delivers, averaged over groups.

    Per group: ``(judge score of the model's pick - the group's mean judge score) / (best - mean)``: 1 = as good as
    asking the judge, 0 = a random pick, negative = worse than random. When the model ties k replies for the top, its
    pick is the mean judge score of those k (a random choice among them). Groups where ``best == mean`` (one reply,
    or every reply scored the same) are skipped. Returns (gain, groups counted); NaN if none.
    """
    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    index: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        index[g].append(i)
    gains = []
    for idx in index.values():
        gt, gp = t[idx], p[idx]
        mean, best = gt.mean(), gt.max()
        if best - mean <= TIE_TOLERANCE:
            continue
        picked = gt[gp >= gp.max() - TIE_TOLERANCE].mean()
        gains.append(float((picked - mean) / (best - mean)))
    if not gains:
        return math.nan, 0
    return float(np.mean(gains)), len(gains)


# ----------------------------------------------------------------------------------------------------------------
# Baselines


def length_baseline(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """ "Longer is better": the reply's length in characters."""
    return np.array([len(r["tutor_response"]) for r in records], dtype=float)


def _ridge(features: Any) -> Any:
    """``features`` then a ridge regression per label, its strength chosen by cross-validation on the fit texts."""
    from sklearn.pipeline import make_pipeline

    return make_pipeline(features, ridge_per_label())


def tfidf_ridge_baseline(train_texts: Sequence[str], train_targets: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """Word TF-IDF baseline: word 1-2-grams + character 2-5-grams within words (sublinear tf) of the tutor reply,
    and a ridge regression per label."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    features = FeatureUnion(
        [
            ("word", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)),
            ("char", char_tfidf()),
        ]
    )
    model = _ridge(features).fit(list(train_texts), train_targets)
    return np.asarray(model.predict(list(texts)), dtype=float).reshape(len(texts), -1)


def char_tfidf_ridge_baseline(
    train_texts: Sequence[str], train_targets: np.ndarray, texts: Sequence[str]
) -> np.ndarray:
    """Character n-gram baseline: TF-IDF of character 2-5-grams within word boundaries (``char_wb``, sublinear tf)
    and a ridge regression per label: the surface model the reward model has to beat (issue 9), and the features of
    the model's own n-gram head (``fluent_reward.ngram``)."""
    model = _ridge(char_tfidf()).fit(list(train_texts), train_targets)
    return np.asarray(model.predict(list(texts)), dtype=float).reshape(len(texts), -1)


def baseline_scores(records: Sequence[dict[str, Any]], targets: np.ndarray, train_idx: Sequence[int]) -> dict:
    """Every baseline's scores for every record, shape (n, 1 + n_dims) each, the learnt ones fit on ``train_idx``.

    The TF-IDF baselines read the tutor reply only: on the bundled sample (5 seeded splits, 71 held-out groups
    each) the reply alone beat reply + context and the model's input format for the char baseline (overall
    Spearman 0.33-0.48 vs 0.14-0.39, mean dimension Spearman 0.55-0.62 vs 0.37-0.52): the context is shared by a
    group's replies, so it adds features that cannot rank them.
    """
    texts = [r["tutor_response"] for r in records]
    train_texts, train_targets = [texts[i] for i in train_idx], targets[list(train_idx)]
    length = length_baseline(records)[:, None]
    return {
        "length": np.repeat(length, targets.shape[1], axis=1),
        "tfidf_ridge": tfidf_ridge_baseline(train_texts, train_targets, texts),
        "char_tfidf_ridge": char_tfidf_ridge_baseline(train_texts, train_targets, texts),
    }


# ----------------------------------------------------------------------------------------------------------------
# One split's flat metrics


def split_metrics(
    judge: np.ndarray,
    pred: np.ndarray,
    groups: Sequence[str],
    languages: Sequence[str],
    baselines: dict[str, np.ndarray],
    dimensions: Sequence[str],
    cfg: EvaluateConfig,
) -> dict[str, float | int | None]:
    """The flat metrics of one split. ``judge`` / ``pred`` / each baseline: shape (n, 1 + n_dims), overall first."""
    out: dict[str, Any] = {}
    for key, value in regression_metrics(judge[:, 0], pred[:, 0]).items():
        out[f"overall.{key}"] = value
    low, high = bootstrap_spearman_ci(judge[:, 0], pred[:, 0], groups, cfg.bootstrap_samples, cfg.seed)
    out["overall.spearman_ci_low"], out["overall.spearman_ci_high"] = low, high
    out["pairwise_accuracy"], out["pairwise_pairs"] = pairwise_accuracy(judge[:, 0], pred[:, 0], groups, cfg.min_gap)
    out["best_of_n_agreement"], out["best_of_n_groups"], out["best_of_n_chance"] = best_of_n_agreement(
        judge[:, 0], pred[:, 0], groups
    )
    out["best_of_n_gain"], out["best_of_n_gain_groups"] = best_of_n_gain(judge[:, 0], pred[:, 0], groups)
    for k, dim in enumerate(dimensions, start=1):
        metrics = regression_metrics(judge[:, k], pred[:, k])
        out[f"dimensions.{dim}.spearman"] = metrics["spearman"]
        out[f"dimensions.{dim}.mae"] = metrics["mae"]
    by_language: dict[str, list[int]] = defaultdict(list)
    for i, lang in enumerate(languages):
        by_language[lang].append(i)
    for lang, idx in sorted(by_language.items()):
        if len(idx) >= cfg.min_language_records:
            key = _key(lang)
            out[f"languages.{key}.spearman"] = spearman(judge[idx, 0], pred[idx, 0])
            out[f"languages.{key}.n"] = len(idx)
    for name, scores in baselines.items():
        out[f"baseline.{name}.spearman"] = spearman(judge[:, 0], scores[:, 0])
        out[f"baseline.{name}.pairwise_accuracy"] = pairwise_accuracy(judge[:, 0], scores[:, 0], groups, cfg.min_gap)[0]
        out[f"baseline.{name}.best_of_n_agreement"] = best_of_n_agreement(judge[:, 0], scores[:, 0], groups)[0]
        out[f"baseline.{name}.best_of_n_gain"] = best_of_n_gain(judge[:, 0], scores[:, 0], groups)[0]
        for k, dim in enumerate(dimensions, start=1):
            out[f"baseline.{name}.dimensions.{dim}.spearman"] = spearman(judge[:, k], scores[:, k])
    out["n"] = len(groups)
    out["n_groups"] = len(set(groups))
    return out


def _key(name: str) -> str:
    """A metric-key-safe name (dots and spaces would break the flat key structure)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name.strip()) or "unknown"


def clean_metric(value: Any) -> Any:
    """Round floats for stable, readable diffs; NaN (undefined) becomes null."""
    if isinstance(value, float):
        return round(value, METRIC_DECIMALS) if math.isfinite(value) else None
    return value


def judge_agreement(path: Path) -> dict[str, Any]:
    """The judge's test-retest numbers from ``data.judge_metrics`` (present when it ran with samples >= 2),
    flattened under ``judge.``; empty when the file or the numbers are absent."""
    if not Path(path).is_file():
        return {}
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any, inside: bool) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v, inside or "retest" in str(k).lower())
        elif inside and isinstance(node, int | float) and not isinstance(node, bool):
            out["judge." + prefix.rstrip(".")] = node

    walk("", read_json(path), False)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Plots and report


def render_plots(
    folder: Path, judge: np.ndarray, pred: np.ndarray, metrics: dict[str, Any], dimensions: Sequence[str]
) -> list[Path]:
    """Test-split PNGs that work offline: judge vs model scatter, calibration by decile, per-dimension Spearman."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    t, p = judge[:, 0], pred[:, 0]
    lo, hi = float(min(t.min(), p.min())) - 0.3, float(max(t.max(), p.max())) + 0.3

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(t, p, s=18, alpha=0.7)
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="identity")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="judge overall", ylabel="model overall")
    ax.set_title(f"Test split: Spearman {_fmt(metrics.get('overall.spearman'))} (n={len(t)})")
    ax.legend(loc="upper left")
    written.append(_save(fig, folder / "scatter.png"))

    bins = min(10, max(1, len(p) // 3))
    edges = np.quantile(p, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    xs = [p[which == b].mean() for b in range(bins) if (which == b).any()]
    ys = [t[which == b].mean() for b in range(bins) if (which == b).any()]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    ax.plot(xs, ys, marker="o", label="mean per prediction decile")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="model overall (bin mean)", ylabel="judge overall (bin mean)")
    ax.set_title("Calibration by decile (test split)")
    ax.legend(loc="upper left")
    written.append(_save(fig, folder / "calibration.png"))

    names = [OVERALL, *dimensions]
    series = {
        "model": [metrics.get("overall.spearman")] + [metrics.get(f"dimensions.{d}.spearman") for d in dimensions],
        **{
            b: [metrics.get(f"baseline.{b}.spearman")]
            + [metrics.get(f"baseline.{b}.dimensions.{d}.spearman") for d in dimensions]
            for b in BASELINES
        },
    }
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        xs = np.arange(len(names)) + (k - (len(series) - 1) / 2) * width
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label)
    ax.set_xticks(np.arange(len(names)), names, rotation=20)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(ylabel="Spearman vs judge", ylim=(min(-0.2, ax.get_ylim()[0]), 1.0))
    ax.set_title("Per-dimension agreement (test split)")
    ax.legend()
    written.append(_save(fig, folder / "dimensions.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def has_validation(metrics: dict[str, Any]) -> bool:
    """Whether ``metrics`` hold a validation split's figures (none when ``train.split.validation`` is 0)."""
    return metrics.get("validation.n") is not None


def validation_summary(metrics: dict[str, Any]) -> str:
    """The report's line on the validation split (which early stopping used), or that there was none."""
    m = metrics.get
    if not has_validation(metrics):
        return "No validation split (`train.split.validation: 0`): training ran its planned epochs and kept the last."
    return (
        f"Validation split: Spearman {_fmt(m('validation.overall.spearman'))}, pairwise accuracy "
        f"{_fmt(m('validation.pairwise_accuracy'))}, best-of-N {_fmt(m('validation.best_of_n_agreement'))}, "
        f"best-of-N gain {_fmt(m('validation.best_of_n_gain'))}."
    )


def render_report(metrics: dict[str, Any], dimensions: Sequence[str], plots: Sequence[Path], report: Path) -> str:
    """A short Markdown summary of ``metrics`` (test split unless noted)."""
    m = metrics.get
    lines = [
        "# Reward model evaluation",
        "",
        f"Test split: {m('n_test')} replies in {m('n_groups_test')} groups never seen in training"
        + (
            f" or early stopping (validation: {m('validation.n')} replies in {m('validation.n_groups')} groups)."
            if has_validation(metrics)
            else " (no validation split)."
        ),
        "",
        "| | Spearman | pairwise accuracy | best-of-N | best-of-N gain |",
        "|---|---|---|---|---|",
        f"| reward model | {_fmt(m('overall.spearman'))} [{_fmt(m('overall.spearman_ci_low'))}, "
        f"{_fmt(m('overall.spearman_ci_high'))}] | {_fmt(m('pairwise_accuracy'))} | {_fmt(m('best_of_n_agreement'))} |"
        f" {_fmt(m('best_of_n_gain'))} |",
    ]
    for b in BASELINES:
        lines.append(
            f"| baseline: {BASELINE_LABELS[b]} | {_fmt(m(f'baseline.{b}.spearman'))} |"
            f" {_fmt(m(f'baseline.{b}.pairwise_accuracy'))} | {_fmt(m(f'baseline.{b}.best_of_n_agreement'))} |"
            f" {_fmt(m(f'baseline.{b}.best_of_n_gain'))} |"
        )
    lines += [
        f"| chance | 0 | 0.5 | {_fmt(m('best_of_n_chance'))} | 0 |",
        "",
        f"Overall on the judge's scale: Pearson {_fmt(m('overall.pearson'))}, Kendall {_fmt(m('overall.kendall'))}, "
        f"MAE {_fmt(m('overall.mae'))}, RMSE {_fmt(m('overall.rmse'))}. Pairwise accuracy counts "
        f"{m('pairwise_pairs')} same-group pairs whose judge scores differ by at least the minimum gap; best-of-N "
        f"counts {m('best_of_n_groups')} groups; best-of-N gain is the share of the judge's benefit over a random "
        "pick that the model's pick delivers (1: as good as the judge, 0: random).",
        "",
        validation_summary(metrics),
        "",
        f"Inputs longer than the model's max_length: {m('truncated_examples')} of {m('n_test')} test inputs "
        f"({_fmt(m('truncated_share'))}) lost context turns, {m('truncated_mean_dropped_tokens')} tokens on "
        "average.",
        "",
        "| dimension | Spearman | MAE | " + " | ".join(BASELINE_LABELS[b] for b in BASELINES) + " |",
        "|---|---|---|" + "---|" * len(BASELINES),
    ]
    for d in dimensions:
        lines.append(
            f"| {d} | {_fmt(m(f'dimensions.{d}.spearman'))} | {_fmt(m(f'dimensions.{d}.mae'))} | "
            + " | ".join(_fmt(m(f"baseline.{b}.dimensions.{d}.spearman")) for b in BASELINES)
            + " |"
        )
    languages = sorted(k.split(".")[1] for k in metrics if k.startswith("languages.") and k.endswith(".spearman"))
    if languages:
        lines += ["", "| language | replies | Spearman |", "|---|---|---|"]
        lines += [
            f"| {lang} | {m(f'languages.{lang}.n')} | {_fmt(m(f'languages.{lang}.spearman'))} |" for lang in languages
        ]
    retest = {k: v for k, v in metrics.items() if k.startswith("judge.")}
    if retest:
        lines += ["", "Judge test-retest: " + ", ".join(f"{k[6:]} {_fmt(v)}" for k, v in sorted(retest.items())) + "."]
    if plots:
        lines += [""] + [f"![{p.stem}]({os.path.relpath(p, report.parent)})" for p in plots]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The stage


def write_predictions(
    path: Path, records: Sequence[dict[str, Any]], splits: Sequence[str], judge: np.ndarray, pred: np.ndarray, dims
) -> None:
    """``id, group_id, language, split, judge_overall, pred_overall, judge_<dim>, pred_<dim>`` for every record."""
    labels = [OVERALL, *dims]
    header = ["id", "group_id", "language", "split"] + [
        f"{kind}_{name}" for name in labels for kind in ("judge", "pred")
    ]
    with atomic_open(path) as handle:  # lineterminator "\n": same bytes on every OS
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for i, r in enumerate(records):
            values = [v for k in range(len(labels)) for v in (_num(judge[i, k]), _num(pred[i, k]))]
            writer.writerow([r["id"], r["group_id"], r.get("language", ""), splits[i], *values])


def _num(x: float) -> str:
    return repr(round(float(x), PRED_DECIMALS))


def load_checked(params: Params) -> tuple[Any, Any, Any, list[dict[str, Any]], list[str]]:
    """(model, tokenizer, metadata, judged records, each record's split), after refusing a model trained on another
    split (its test groups could have been trained on) or for other rubric weights."""
    paths, rubric = params.data, params.rubric
    if not Path(paths.splits).is_file():
        raise FluentRewardError(f"{paths.splits}: not found (run `fluent-reward train` first)")
    try:
        with quiet_transformers():
            model, tokenizer, meta = load_model_folder(paths.model_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise FluentRewardError(str(exc)) from None
    split_doc = read_json(paths.splits)
    if meta.split_sha256 != stable_hash(split_doc, length=64):
        raise FluentRewardError(
            f"{paths.model_dir} was trained on another split than {paths.splits}; its test groups may have been "
            "seen in training. Rerun `fluent-reward train`"
        )
    if meta.dimensions != rubric.names or meta.weights != dict(rubric.weights):
        raise FluentRewardError(
            f"{paths.model_dir} was trained for rubric dimensions/weights {meta.weights} but params.yaml has "
            f"{dict(rubric.weights)}; rerun `fluent-reward train`"
        )
    records = load_judged_records(paths.validated, paths.judgments, rubric)
    if meta.training_data_sha256 != training_data_sha256(paths.judgments, paths.validated):
        log.warning("%s: the judgments or records changed since this model was trained", paths.model_dir)
    where = split_of(split_doc)
    unknown = sorted({r["group_id"] for r in records} - set(where))
    if unknown:
        raise FluentRewardError(
            f"{len(unknown)} group(s) are in no split (first: {unknown[:3]}); rerun `fluent-reward train`"
        )
    return model, tokenizer, meta, records, [where[r["group_id"]] for r in records]


def predict_with_truncation(
    model: Any, tokenizer: Any, meta: Any, records: Sequence[dict[str, Any]], batch_size: int
) -> tuple[np.ndarray, TruncationStats]:
    """Judge-scale predictions rounded to ``PRED_DECIMALS`` (as written to the CSV), and how much input was cut."""
    import torch

    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    scores, truncation = predict_scores_with_truncation(model, tokenizer, meta, records, batch_size)
    return np.round(scores, PRED_DECIMALS), truncation


def all_metrics(
    params: Params,
    records: Sequence[dict[str, Any]],
    split_idx: dict[str, list[int]],
    judge: np.ndarray,
    pred: np.ndarray,
    truncation: TruncationStats,
) -> dict[str, Any]:
    """The flat, rounded metrics file: test split at the top level, validation under ``validation.``, the baselines
    (fit on the train split) beside the model, truncation counts, the judge's test-retest agreement."""
    baselines = baseline_scores(records, judge, split_idx["train"])
    metrics: dict[str, Any] = {}
    for name, prefix in (("test", ""), ("validation", "validation.")):
        idx = split_idx[name]
        if not idx:
            continue
        values = split_metrics(
            judge[idx],
            pred[idx],
            [records[i]["group_id"] for i in idx],
            [records[i].get("language") or UNKNOWN_LANGUAGE for i in idx],
            {name: scores[idx] for name, scores in baselines.items()},
            params.rubric.names,
            params.evaluate,
        )
        values.update(truncation.summary(idx))
        if name == "test":
            values["n_test"], values["n_groups_test"] = values.pop("n"), values.pop("n_groups")
        metrics.update({prefix + k: v for k, v in values.items()})
    metrics["n_train"] = len(split_idx["train"])
    metrics.update(judge_agreement(params.data.judge_metrics))
    return {k: clean_metric(v) for k, v in sorted(metrics.items())}


def run_evaluate(params: Params) -> dict[str, Any]:
    """Evaluate the saved model on the test split (and, separately, validation) against the judge.

    Args:
        params: reads ``data.*`` paths, ``rubric`` and ``evaluate``.

    Returns:
        The flat metrics written to ``data.eval_metrics``; also writes ``data.predictions``,
        ``data.test_predictions``, the PNGs in ``data.plots_dir`` and ``data.report``.
    """
    paths, dims = params.data, params.rubric.names
    model, tokenizer, meta, records, record_split = load_checked(params)
    pred, truncation = predict_with_truncation(model, tokenizer, meta, records, params.evaluate.batch_size)
    judge = np.round(target_matrix(records, dims), PRED_DECIMALS)
    split_idx = {name: [i for i, s in enumerate(record_split) if s == name] for name in SPLITS}
    test = split_idx["test"]
    write_predictions(paths.predictions, records, record_split, judge, pred, dims)
    # the test rows alone: what `dvc plots show` draws (dvc.yaml)
    write_predictions(
        paths.test_predictions, [records[i] for i in test], ["test"] * len(test), judge[test], pred[test], dims
    )
    metrics = all_metrics(params, records, split_idx, judge, pred, truncation)
    write_json(paths.eval_metrics, metrics)
    plots = render_plots(Path(paths.plots_dir), judge[test], pred[test], metrics, dims) if test else []
    with atomic_open(paths.report) as handle:
        handle.write(render_report(metrics, dims, plots, Path(paths.report)))
    headline = ("overall.spearman", "pairwise_accuracy", "best_of_n_gain", "baseline.char_tfidf_ridge.spearman")
    log.info(
        "test: Spearman %s, pairwise accuracy %s, best-of-N gain %s (char TF-IDF Spearman %s) -> %s",
        *(_fmt(metrics.get(k)) for k in headline),
        paths.eval_metrics,
    )
    return metrics
