"""What the n-gram head should read: grouped K-fold CV of the head alone, per feature set, beside the char TF-IDF
ridge baseline (docs/TRAINING.md, "The reply embedding").

    .venv/bin/python bench/head_features.py                                  # sample + all bea2025_dev dialogues
    .venv/bin/python bench/head_features.py --dataset sample --layers 2 4 6 8 10 12

Feature sets: ``char`` (the char n-gram TF-IDF of the reply: the head as it was, the baseline stretched) and
``char+eN`` (the head with ``train.ngram_embedding_layer: N``: also the reply's embedding after encoder layer N).
The embedding is the pipeline's own (``fluent_reward.model.model_reply_embeddings``: the reply encoded alone, its
layer-N hidden states averaged over its tokens) from the backbone before any training, which is what a trained
model's frozen layers give. The head is fit as ``train`` fits it (``fit_ngram_head``: ridge strength per label by
leave-one-out, stretched to the targets' spread) on each fold's training groups and scored on the fold's test
groups: Spearman (overall), pairwise accuracy (judge gap >= 0.5), best-of-N gain, mean per-dimension Spearman, and on
bea the Mistake_Identification 3-class macro-F1 (fixed cuts / prior-matched cuts). Folds as in bench/quality_cv.py.

``--student LAYER`` (docs/TRAINING.md, "Features that see the student's message") adds feature sets that let the head
see the student's message, each beside ``char+eLAYER``: ``+student`` (the message's own embedding),
``+product`` (the element-wise product of the reply's and the message's embeddings: a linear head's only way to
weigh their interaction), ``+cosine`` (their cosine), ``+pairN`` (the reply's tokens averaged after layer N when the
message and the reply are encoded together as a pair, so the reply's states have attended to the message) and
``pairN`` alone in place of the reply's own embedding.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.preprocessing import normalize

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "scripts"), str(ROOT / "src")]

from quality_cv import (  # noqa: E402
    BEA,
    Dataset,
    fold_metrics,
    group_folds,
    load_bea,
    load_classifier,
    load_sample,
    summarise,
)

from fluent_reward.config import load_params  # noqa: E402
from fluent_reward.model import model_reply_embeddings  # noqa: E402
from fluent_reward.ngram import fit_ngram_head  # noqa: E402

log = logging.getLogger("head_features")
COLUMNS = ("spearman", "pairwise", "bon_gain", "dim_spearman", "mi_f1", "mi_f1_prior")


def embeddings_by_layer(data: Dataset, backbone: str, layers: list[int], max_length: int) -> dict[str, np.ndarray]:
    """``char+eN`` -> the replies' layer-N embeddings, for each of ``layers``."""
    model, tokenizer = load_classifier(backbone, 1, 0)
    model.eval()
    return {f"char+e{n}": model_reply_embeddings(model, tokenizer, data.replies, n, max_length, 32) for n in layers}


def pair_reply_embeddings(model: Any, tokenizer: Any, data: Dataset, layers: list[int], max_length: int) -> dict:
    """Layer -> the reply's tokens averaged after that layer, (student message, reply) encoded as one pair."""
    import torch

    pooled: dict[int, list[np.ndarray]] = {n: [] for n in layers}
    with torch.inference_mode():
        for start in range(0, len(data.replies), 32):
            batch = tokenizer(
                data.students[start : start + 32],
                data.replies[start : start + 32],
                truncation="longest_first",
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            reply = torch.tensor([[s == 1 for s in batch.sequence_ids(i)] for i in range(len(batch["input_ids"]))])
            weights = reply.float()[..., None]
            states = model.base_model(**batch, output_hidden_states=True).hidden_states
            for n in layers:
                pooled[n].append(((states[n] * weights).sum(1) / weights.sum(1)).numpy())
    return {n: np.concatenate(parts) for n, parts in pooled.items()}


def student_feature_sets(data: Dataset, backbone: str, layer: int, max_length: int) -> dict[str, np.ndarray]:
    """The ``--student`` feature sets (module docstring), each block L2-normalised before it is joined."""
    model, tokenizer = load_classifier(backbone, 1, 0)
    model.eval()
    reply = normalize(model_reply_embeddings(model, tokenizer, data.replies, layer, max_length, 32))
    student = normalize(model_reply_embeddings(model, tokenizer, data.students, layer, max_length, 32))
    pairs = pair_reply_embeddings(model, tokenizer, data, [6, 9, 12], max_length)
    base = f"char+e{layer}"
    return {
        base: reply,
        f"{base}+student": np.hstack([reply, student]),
        f"{base}+product": np.hstack([reply, normalize(reply * student)]),
        f"{base}+cosine": np.hstack([reply, (reply * student).sum(axis=1, keepdims=True)]),
        **{f"{base}+pair{n}": np.hstack([reply, normalize(pairs[n])]) for n in pairs},
        **{f"char+pair{n}": pairs[n] for n in pairs},
    }


def run(data: Dataset, sets: dict[str, np.ndarray | None], folds: int, seed: int) -> None:
    """Each feature set's head (``char``: n-grams only, else n-grams + that embedding) through the same folds."""
    tests = group_folds(data, folds, seed)
    everything = np.arange(len(data.replies))
    zeros, ones = np.zeros(data.targets.shape[1]), np.ones(data.targets.shape[1])
    print(f"\n{data.name} ({len(data.replies)} replies, {len(set(data.groups))} groups, {folds} folds)")
    for name, emb in sets.items():
        layer = None if emb is None else 0  # any layer number: the head only records it
        per_fold = []
        for test in tests:
            train = np.setdiff1d(everything, test)
            replies = [data.replies[i] for i in train]
            head = fit_ngram_head(replies, data.targets[train], 1.0, emb[train] if emb is not None else None, layer)
            pred = head.predict([data.replies[i] for i in test], emb[test] if emb is not None else None)
            # quality_cv's metrics take standardised predictions: judge-scale ones pass with mean 0, std 1
            per_fold.append(fold_metrics(data, pred, zeros, ones, train, test))
        summary = summarise(per_fold)
        cells = [f"{k} {summary[k][0]:.3f} ± {summary[k][1]:.3f}" for k in COLUMNS if k in summary]
        print(f"| {name:18s} | " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    train = load_params(ROOT / "params.yaml").train
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", choices=["sample", "bea"], default=["sample", "bea"])
    parser.add_argument("--bea-file", type=Path, default=BEA)
    parser.add_argument("--bea-dialogues", type=int, default=0, help="seeded subset of bea dialogues (0: all)")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 8, 10, 12])
    parser.add_argument("--backbone", default=train.backbone)
    parser.add_argument("--max-length", type=int, default=train.max_length)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--student", type=int, metavar="LAYER", help="compare the feature sets that see the student's message"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in args.dataset:
        data = load_sample() if name == "sample" else load_bea(args.bea_file, args.bea_dialogues, args.seed)
        if data is None:
            continue
        if args.student is not None:
            embedded = student_feature_sets(data, args.backbone, args.student, args.max_length)
        else:
            embedded = embeddings_by_layer(data, args.backbone, args.layers, args.max_length)
        run(data, {"char": None, **embedded}, args.folds, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
