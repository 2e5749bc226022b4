"""The model's input format, pinned: changing any of these strings needs a new INPUT_FORMAT_VERSION."""

from __future__ import annotations

import json
import time

import pytest

from fluent_reward.model import (
    INPUT_FORMAT_VERSION,
    encode_batch,
    encode_with_stats,
    format_segments,
    split_turns,
)
from fluent_reward.model_folder import METADATA_FILE, ModelFolderError, ModelMetadata
from tests.support import make_tiny_model_folder, real_tokenizer

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
    return real_tokenizer()


def _decoded(tokenizer, max_length: int, context: str = CONTEXT, keep_first: int = 0) -> tuple[str, dict]:
    item = encode_batch(tokenizer, [context], [STUDENT], [REPLY], max_length, keep_first_turns=keep_first)[0]
    return tokenizer.decode(item["input_ids"]), item


def test_a_model_folder_of_another_input_format_version_is_refused(tmp_path):
    """The version is what keeps a model trained on another input format from scoring text in this one."""
    folder = make_tiny_model_folder(tmp_path / "m", dimensions=("accuracy",))
    path = folder / METADATA_FILE
    meta = json.loads(path.read_text(encoding="utf-8"))
    assert meta["input_format_version"] == INPUT_FORMAT_VERSION  # what train writes
    meta["input_format_version"] = INPUT_FORMAT_VERSION - 1
    path.write_text(json.dumps(meta), encoding="utf-8")
    expected = f"input_format_version={INPUT_FORMAT_VERSION - 1} but this version of fluent-reward needs "
    with pytest.raises(ModelFolderError, match=expected + f"{INPUT_FORMAT_VERSION}; retrain the model"):
        ModelMetadata.load(folder)


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
    assert format_segments(["Student: x"], "hi", "yes", omitted_at=0) == (
        "[context] (earlier turns omitted)\nStudent: x\n[student] hi",
        "[tutor] yes",
    )
    assert format_segments(["Tutor: a", "Student: x"], "hi", "yes", omitted_at=1) == (
        "[context] Tutor: a\n(earlier turns omitted)\nStudent: x\n[student] hi",
        "[tutor] yes",
    )
    assert format_segments([], "hi", "yes", omitted_at=0)[0] == "[context] (earlier turns omitted)\n[student] hi"


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
    item = encode_batch(tokenizer, [""], ["hi"], ["yes"], 64, keep_first_turns=1)[0]
    assert tokenizer.decode(item["input_ids"]) == "[CLS] [ context ] ( none ) [ student ] hi [SEP] [ tutor ] yes [SEP]"


def test_keep_first_turns_keeps_the_problem_statement_and_the_latest_turns(tokenizer):
    text, item = _decoded(tokenizer, 60, keep_first=1)
    assert text == (
        "[CLS] [ context ] tutor : hola, ¿ que hiciste ayer? ( earlier turns omitted ) student : una de terror. "
        "[ student ] ¿ esta bien? [SEP] [ tutor ] casi : ' fui al cine '. ¿ y despues? [SEP]"
    )
    assert len(item["input_ids"]) <= 60
    text, _ = _decoded(tokenizer, 66, keep_first=2)  # the first two turns fit; no latest turn does
    assert "hola" in text and "with my sister ( earlier turns omitted ) [ student ]" in text
    assert _decoded(tokenizer, 256, keep_first=1) == _decoded(tokenizer, 256, keep_first=0)  # fits: nothing cut


def test_first_turns_that_do_not_fit_give_way_to_the_latest(tokenizer):
    context = "Tutor: " + "muy " * 80 + "largo\nStudent: Una de terror."
    text, item = _decoded(tokenizer, 50, context=context, keep_first=1)
    assert "muy" not in text and "( earlier turns omitted ) student : una de terror." in text
    assert len(item["input_ids"]) <= 50


def test_of_the_first_turns_only_those_that_fit_in_order_survive(tokenizer):
    context = "Tutor: Problema corto.\nStudent: " + "muy " * 80 + "largo\nTutor: ¿Y ahora?\nStudent: Una de terror."
    text, item = _decoded(tokenizer, 60, context=context, keep_first=2)
    assert "problema corto. ( earlier turns omitted )" in text and "muy" not in text
    assert "student : una de terror. [ student ]" in text and len(item["input_ids"]) <= 60


def test_truncation_stats_count_cut_inputs_and_dropped_tokens(tokenizer):
    contexts = [CONTEXT, "", CONTEXT]
    full, stats = encode_with_stats(tokenizer, contexts, [STUDENT] * 3, [REPLY] * 3, 256, 1)
    _, cut = encode_with_stats(tokenizer, contexts, [STUDENT] * 3, [REPLY] * 3, 50, 1)
    assert stats.summary()["truncated_examples"] == 0 and stats.summary()["truncated_share"] == 0.0
    assert cut.full_lengths == [len(e["input_ids"]) for e in full] == [76, 37, 76]
    dropped = 76 - cut.kept_lengths[0]
    assert dropped > 0 and cut.kept_lengths[1] == 37
    assert cut.summary() == {
        "truncated_examples": 2,
        "truncated_share": round(2 / 3, 4),
        "truncated_mean_dropped_tokens": float(dropped),
        "truncated_max_dropped_tokens": dropped,
    }
    assert cut.summary([1])["truncated_examples"] == 0


def test_a_950_turn_record_encodes_in_linear_time(tokenizer):
    turns = [f"{'Tutor' if i % 2 == 0 else 'Student'}: turno número {i} de la conversación." for i in range(950)]
    context = "\n".join(["Tutor: Problema: calcula 3 x 7.", *turns[1:-1], "Student: La respuesta final es 21."])
    started = time.perf_counter()
    (item,), stats = encode_with_stats(tokenizer, [context], [STUDENT], [REPLY], 256, 1)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"{elapsed:.2f} s for one long record: truncation is not linear"
    text = tokenizer.decode(item["input_ids"])
    assert text.startswith("[CLS] [ context ] tutor : problema : calcula 3 x 7. ( earlier turns omitted )")
    assert "student : la respuesta final es 21. [ student ] ¿ esta bien? [SEP] [ tutor ] casi" in text
    assert 250 <= len(item["input_ids"]) <= 256
    assert stats.full_lengths[0] > 10_000 and stats.summary()["truncated_examples"] == 1
