"""The n-gram head: a ridge regression on the reply alone, blended into the transformer's scores.

The reward model's score is ``(1 - w) * transformer + w * ngram`` per label (overall and every dimension, on the
judge's scale), ``w = train.ngram_weight``. The two read different things: the transformer reads the context, the
student's message and the reply in context; the n-gram ridge reads the reply's surface (its length, its markers of
praise, questions, corrections, its language). On the bundled sample's grouped 5-fold cross-validation
(docs/TRAINING.md, "The n-gram head") the blend beat both its parts on every headline metric, so training fits it by
default; ``w = 0`` gives the transformer alone.

The features and the ridge are exactly the evaluate stage's char TF-IDF baseline (``char_tfidf``: character
2-5-grams within word boundaries, sublinear tf, idf, L2 norm; ``RidgeCV``, strength per label by leave-one-out), fit
on the same training replies; its predictions are then stretched to the targets' spread (``fit_ngram_head``), so
that ``w`` weighs two scores of comparable spread. In a model folder the head is two files:
``ngram_head.safetensors`` (idf, ridge coefficients and intercepts: numbers only, never pickled) and
``ngram_vocabulary.json`` (the n-grams in feature order); their sha256 are in the metadata and checked at load.
Scoring rebuilds the features from the vocabulary with a fixed-vocabulary ``CountVectorizer`` (no fitting), so a
folder scores the same on any machine.

With ``train.ngram_embedding_layer`` set (as params.yaml does), the ridge also reads the reply's **embedding**: the mean
over its tokens of the encoder's hidden states after that layer, the reply encoded alone (L2-normalised, appended to the
n-gram features). The layer must be frozen in training, so the embedding is the backbone's own and the same before
and after training; ``fluent_reward.model.reply_embeddings`` computes it for every scorer. On the sample's CV this
lifted the head from Spearman 0.42 to 0.51 and the blend's pairwise accuracy from 0.75 to 0.78 (layer 6, then the
highest frozen layer; docs/TRAINING.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fluent_reward.errors import FluentRewardError
from fluent_reward.io import file_sha256, write_json

log = logging.getLogger(__name__)

HEAD_FILE = "ngram_head.safetensors"
VOCABULARY_FILE = "ngram_vocabulary.json"
ANALYZER = "char_wb"
NGRAM_RANGE = (2, 5)
MIN_DF = 2  # an n-gram seen in one training reply only is noise
RIDGE_ALPHAS = np.logspace(-2, 3, 11)


class NgramHeadError(FluentRewardError, ValueError):
    """An n-gram head's files are missing, damaged or do not match the model folder's metadata."""


def char_tfidf() -> Any:
    """The character n-gram TF-IDF features, unfitted: the n-gram head's and the char TF-IDF baseline's."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer=ANALYZER, ngram_range=NGRAM_RANGE, sublinear_tf=True, min_df=MIN_DF)


def ridge_per_label(store_cv_results: bool = False) -> Any:
    """A ridge regression per label, its strength chosen by leave-one-out on the fit data (``store_cv_results``:
    keep every fit reply's leave-one-out prediction, per label and strength)."""
    from sklearn.linear_model import RidgeCV

    # With a scorer, the stored values are the leave-one-out predictions (without one, their squared errors); this
    # scorer ranks the strengths exactly as the default does.
    scoring = "neg_mean_squared_error" if store_cv_results else None
    return RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True, scoring=scoring, store_cv_results=store_cv_results)


@dataclass(frozen=True)
class NgramHead:
    """A fitted n-gram ridge: judge-scale predictions per label from a reply's text, and its share of the blend."""

    vocabulary: list[str]  # n-grams in feature order
    idf: np.ndarray  # (n_features,)
    coef: np.ndarray  # (n_labels, n_features + embedding_size)
    intercept: np.ndarray  # (n_labels,)
    weight: float  # share of the blended score: (1 - weight) * transformer + weight * this head
    embedding_layer: int | None = None  # also reads the reply's mean-pooled hidden states after this encoder layer

    @property
    def embedding_size(self) -> int:
        """Width of the embedding part of the features (0: n-grams only)."""
        return self.coef.shape[1] - len(self.vocabulary)

    def features(self, replies: Sequence[str], embeddings: np.ndarray | None = None) -> Any:
        """The ridge's input rows: TF-IDF (sparse, L2-normalised) of ``replies`` over the fitted vocabulary, as
        ``char_tfidf`` makes, then the L2-normalised ``embeddings`` (n, width) when the head reads them."""
        return with_embeddings(self.ngram_features(replies), embeddings, self.embedding_layer, self.embedding_size)

    def ngram_features(self, replies: Sequence[str]) -> Any:
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.preprocessing import normalize

        counts = CountVectorizer(
            analyzer=ANALYZER, ngram_range=NGRAM_RANGE, vocabulary={g: i for i, g in enumerate(self.vocabulary)}
        ).transform(list(replies))
        counts = counts.astype(np.float64)
        np.log(counts.data, out=counts.data)
        counts.data += 1.0  # sublinear tf: 1 + log(count)
        return normalize(counts.multiply(self.idf[None, :]).tocsr())

    def predict(self, replies: Sequence[str], embeddings: np.ndarray | None = None) -> np.ndarray:
        """Judge-scale predictions, shape (n, n_labels), overall first."""
        return np.asarray(self.features(replies, embeddings) @ self.coef.T) + self.intercept[None, :]

    def blend(self, scores: np.ndarray, replies: Sequence[str], embeddings: np.ndarray | None = None) -> np.ndarray:
        """The reward model's scores: the transformer's ``scores`` (n, n_labels) blended with this head's."""
        if scores.shape != (len(replies), self.coef.shape[0]):
            raise ValueError(f"scores have shape {scores.shape}, expected ({len(replies)}, {self.coef.shape[0]})")
        blended = (1.0 - self.weight) * scores + self.weight * self.predict(replies, embeddings)
        return blended.astype(scores.dtype)

    def save(self, folder: Path) -> dict[str, str]:
        """Write the two files into ``folder``; returns their sha256 by name (for the metadata)."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        # C order: safetensors writes an array's buffer as it lies, and sklearn's coefficients can be Fortran-ordered
        arrays = {"idf": self.idf, "coef": self.coef, "intercept": self.intercept}
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, str(folder / HEAD_FILE))
        write_json(
            folder / VOCABULARY_FILE,
            {
                "analyzer": ANALYZER,
                "ngram_range": list(NGRAM_RANGE),
                "embedding_layer": self.embedding_layer,
                "vocabulary": self.vocabulary,
            },
        )
        return {name: file_sha256(folder / name) for name in (HEAD_FILE, VOCABULARY_FILE)}


def with_embeddings(ngrams: Any, embeddings: np.ndarray | None, layer: int | None, width: int) -> Any:
    """``ngrams`` (sparse rows) followed by the L2-normalised ``embeddings`` when ``layer`` is set (checked to be
    given, one row per reply, ``width`` wide; ``width`` 0: any)."""
    import scipy.sparse as sp

    if layer is None:
        return ngrams
    if embeddings is None:
        raise ValueError(f"this n-gram head reads the replies' layer-{layer} embeddings; none were given")
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or embeddings.shape[0] != ngrams.shape[0] or (width and embeddings.shape[1] != width):
        raise ValueError(f"embeddings have shape {embeddings.shape}, expected ({ngrams.shape[0]}, {width or 'any'})")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return sp.hstack([ngrams, sp.csr_matrix(embeddings / np.where(norms > 0, norms, 1.0))]).tocsr()


def fit_ngram_head(
    replies: Sequence[str],
    targets: np.ndarray,
    weight: float,
    embeddings: np.ndarray | None = None,
    embedding_layer: int | None = None,
) -> NgramHead:
    """Fit the head on training ``replies`` and their judge-scale ``targets`` (n, n_labels); with
    ``embedding_layer``, on the replies' ``embeddings`` from that layer too (``fluent_reward.model.reply_embeddings``).

    The ridge's predictions are then stretched, per label, to the targets' spread: an affine map (same ranking as the
    char TF-IDF baseline) that gives the head's leave-one-out predictions on the training replies the targets' mean
    and standard deviation. Without it ``weight`` would mean little: at a few hundred replies the leave-one-out
    choice of the ridge strength often lands on the strongest one, whose predictions vary by thousandths of a point,
    and the blend would be the transformer's ranking whatever the weight.
    """
    vectorizer = char_tfidf()
    features = with_embeddings(vectorizer.fit_transform(list(replies)), embeddings, embedding_layer, 0)
    targets = np.asarray(targets, dtype=np.float64).reshape(len(replies), -1)
    ridge = ridge_per_label(store_cv_results=True).fit(features, targets)
    coef = np.atleast_2d(np.asarray(ridge.coef_, dtype=np.float64))
    intercept = np.atleast_1d(np.asarray(ridge.intercept_, dtype=np.float64))
    chosen = [list(RIDGE_ALPHAS).index(a) for a in np.atleast_1d(ridge.alpha_)]
    # cv_results_: (n, n_labels, n_alphas) leave-one-out predictions; the chosen strength's, per label
    held_out = np.stack(
        [ridge.cv_results_.reshape(len(replies), len(chosen), -1)[:, k, a] for k, a in enumerate(chosen)], 1
    )
    spread = held_out.std(axis=0)
    scale = np.where(spread > 1e-12, targets.std(axis=0) / np.where(spread > 1e-12, spread, 1.0), 1.0)
    order = sorted(vectorizer.vocabulary_.items(), key=lambda item: item[1])
    head = NgramHead(
        vocabulary=[gram for gram, _ in order],
        idf=np.asarray(vectorizer.idf_, dtype=np.float64),
        coef=coef * scale[:, None],
        intercept=targets.mean(axis=0) + scale * (intercept - held_out.mean(axis=0)),
        weight=float(weight),
        embedding_layer=embedding_layer,
    )
    log.info(
        "n-gram head: %d n-grams%s from %d replies, weight %.2f, stretched x%.3g (overall)",
        len(head.vocabulary),
        f" + a {head.embedding_size}-wide layer-{embedding_layer} embedding" if embedding_layer is not None else "",
        len(replies),
        weight,
        scale[0],
    )
    return head


def load_ngram_head(folder: str | Path, weight: float, files: dict[str, str], n_labels: int) -> NgramHead | None:
    """The folder's n-gram head, verified against the metadata (``files``: sha256 by name); None when weight is 0."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if weight == 0:
        return None
    folder = Path(folder)
    for name in (HEAD_FILE, VOCABULARY_FILE):
        path = folder / name
        if not path.is_file():
            raise NgramHeadError(f"{path}: missing (the metadata's ngram_weight is {weight}); retrain or re-export")
        if files.get(name) != file_sha256(path):
            raise NgramHeadError(f"{path}: not the file saved with this model (sha256 differs from the metadata)")
    try:
        arrays = load_file(str(folder / HEAD_FILE))
        saved = json.loads((folder / VOCABULARY_FILE).read_text(encoding="utf-8"))
        vocabulary, layer = saved["vocabulary"], saved.get("embedding_layer")
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise NgramHeadError(f"{folder}: unreadable n-gram head ({exc})") from None
    if layer is not None and (type(layer) is not int or layer < 0):
        raise NgramHeadError(
            f"{folder / VOCABULARY_FILE}: embedding_layer must be a layer number or null, got {layer!r}"
        )
    head = NgramHead(vocabulary, arrays["idf"], arrays["coef"], arrays["intercept"], float(weight), layer)
    n_features = len(vocabulary)
    if (
        head.idf.shape != (n_features,)
        or head.coef.ndim != 2
        or head.coef.shape[0] != n_labels
        or head.coef.shape[1] < n_features
        or (layer is None) != (head.coef.shape[1] == n_features)
        or head.intercept.shape != (n_labels,)
    ):
        raise NgramHeadError(f"{folder / HEAD_FILE}: shapes do not match {n_features} n-grams and {n_labels} labels")
    if not all(np.isfinite(a).all() for a in (head.idf, head.coef, head.intercept)):
        raise NgramHeadError(f"{folder / HEAD_FILE}: holds NaN or infinite values")
    return head
