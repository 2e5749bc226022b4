"""The validate stage: every kind of bad input gets a message naming file, record and field; exit 2; nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fluent_reward.cli import main
from tests.support import write_project_params

GOOD = {
    "context": "Tutor: Hola.\nStudent: Hola, soy Ana.",
    "student_message": "¿Cómo se dice 'cat'?",
    "tutor_response": "«Gato». ¿Tienes un gato?",
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A temporary project: params.yaml from the repo with the stage paths redirected into tmp_path."""
    write_project_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_validate(project: Path, content: str | bytes, *extra: str, name: str = "in.json"):
    source = project / name
    source.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = project / "out.jsonl"
    return main(
        ["--params", str(project / "params.yaml"), "validate", "--input", str(source), "--output", str(out), *extra]
    )


def rec(**changes):
    record = dict(GOOD, **changes)
    return {k: v for k, v in record.items() if v is not ...}


def jsonl(*records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def err(capsys) -> str:
    return capsys.readouterr().err


# --- each kind of problem, with its message -------------------------------------------------------------------


def test_not_json_names_line_and_column(project, capsys):
    assert run_validate(project, '[\n  {"context": "", "student_message": "a" "tutor_response": "b"}\n]') == 2
    assert "in.json: not valid JSON: Expecting ',' delimiter at line 2, column 42" in err(capsys)


def test_empty_file(project, capsys):
    assert run_validate(project, "") == 2
    assert "in.json: file is empty" in err(capsys)


def test_whitespace_only_file_is_empty(project, capsys):
    assert run_validate(project, "  \n\n ") == 2
    assert "file is empty" in err(capsys)


def test_top_level_not_a_list(project, capsys):
    assert run_validate(project, json.dumps({"records": [GOOD]}, indent=1)) == 2
    assert "in.json: top-level value is an object, expected a list of records" in err(capsys)


def test_empty_list(project, capsys):
    assert run_validate(project, "[]") == 2
    assert "the list of records is empty" in err(capsys)


def test_record_not_an_object(project, capsys):
    assert run_validate(project, json.dumps([GOOD, ["a", "b"]])) == 2
    assert "in.json: record 2: record is a list, expected an object" in err(capsys)


def test_missing_field(project, capsys):
    assert run_validate(project, json.dumps([rec(id="x1", tutor_response=...)])) == 2
    assert "in.json: record 1 (id=x1): field 'tutor_response': required field is missing" in err(capsys)


def test_wrong_type(project, capsys):
    assert run_validate(project, json.dumps([rec(id=7, student_message=42)])) == 2
    assert "record 1 (id=7): field 'student_message': expected a string, got an integer" in err(capsys)


def test_wrong_id_type(project, capsys):
    assert run_validate(project, json.dumps([rec(id=1.5)])) == 2
    assert "record 1: field 'id': expected a string or an integer, got a number" in err(capsys)


def test_whitespace_only_required_string(project, capsys):
    assert run_validate(project, json.dumps([rec(id="a", tutor_response=" \n\t ")])) == 2
    assert "record 1 (id=a): field 'tutor_response': must not be empty or whitespace only" in err(capsys)


def test_empty_context_is_allowed(project):
    assert run_validate(project, json.dumps([rec(context="")])) == 0


def test_duplicate_id(project, capsys):
    assert run_validate(project, json.dumps([rec(id="a"), rec(id="a", tutor_response="Otra respuesta.")])) == 2
    assert "record 2 (id=a): field 'id': duplicate id 'a' (first used by record 1)" in err(capsys)


def test_integer_and_string_ids_collide(project, capsys):
    assert run_validate(project, json.dumps([rec(id=1), rec(id="1", tutor_response="Otra.")])) == 2
    assert "duplicate id '1'" in err(capsys)


def test_exact_duplicate_record(project, capsys):
    assert run_validate(project, json.dumps([GOOD, GOOD])) == 2
    assert "in.json: record 2: same context, student_message and tutor_response as record 1" in err(capsys)


def test_string_over_max_length(project, capsys):
    assert run_validate(project, json.dumps([rec(id="long", tutor_response="a" * 20001)])) == 2
    assert "record 1 (id=long): field 'tutor_response': is 20001 characters, over validate.max_chars=20000" in err(
        capsys
    )


def test_control_character(project, capsys):
    assert run_validate(project, json.dumps([rec(id="c", student_message="hola\u0007")])) == 2
    assert "record 1 (id=c): field 'student_message': contains control character U+0007 at 5" in err(capsys)


def test_invalid_utf8_in_jsonl(project, capsys):
    content = jsonl(GOOD).encode() + b'{"context": "", "student_message": "caf\xe9", "tutor_response": "x"}\n'
    assert run_validate(project, content, name="in.jsonl") == 2
    assert "in.jsonl: record 2: invalid UTF-8 at byte" in err(capsys)


def test_invalid_utf8_in_json_array(project, capsys):
    assert run_validate(project, b'[{"context": "\xff"}]') == 2
    assert "in.json: invalid UTF-8 at byte 15 (line 1)" in err(capsys)


def test_lone_surrogate_is_not_utf8_text(project, capsys):
    assert run_validate(project, '[{"context": "", "student_message": "\\ud800", "tutor_response": "x"}]') == 2
    assert "field 'student_message': contains an unpaired surrogate" in err(capsys)


def test_non_object_metadata(project, capsys):
    assert run_validate(project, json.dumps([rec(id="m", metadata=["level", "A1"])])) == 2
    assert "record 1 (id=m): field 'metadata': expected an object, got a list" in err(capsys)


def test_unknown_field_is_a_warning_not_an_error(project, caplog):
    assert run_validate(project, json.dumps([rec(id="u", score=9)])) == 0
    assert "in.json: record 1 (id=u): field 'score': unknown field, ignored" in caplog.text
    metrics = json.loads((project / "metrics" / "validation.json").read_text())
    assert metrics["warnings_by_kind"] == {"unknown_field": 1}


def test_mixed_json_and_jsonl_garbage(project, capsys):
    content = json.dumps(GOOD) + "\n" + json.dumps([GOOD], indent=1) + "\n"
    assert run_validate(project, content) == 2
    text = err(capsys)
    assert "in.json: record 2: not valid JSON" in text and "record 2: record is a list" not in text


def test_jsonl_bad_line_names_line_and_column(project, capsys):
    assert run_validate(project, jsonl(GOOD) + '{"context": "", oops}\n', name="in.jsonl") == 2
    assert "in.jsonl: record 2: not valid JSON: Expecting property name enclosed in double quotes at column 17" in err(
        capsys
    )


def test_pretty_printed_object_is_not_jsonl(project, capsys):
    assert run_validate(project, json.dumps(GOOD, indent=2)) == 2
    assert "top-level value is an object" in err(capsys)


def test_path_does_not_exist(project, capsys):
    code = main(["--params", str(project / "params.yaml"), "validate", "--input", str(project / "nope.json")])
    assert code == 2
    assert "nope.json: input file does not exist" in err(capsys)


def test_directory_as_input(project, capsys):
    (project / "adir").mkdir()
    code = main(["--params", str(project / "params.yaml"), "validate", "--input", str(project / "adir")])
    assert code == 2
    assert "adir: is a directory" in err(capsys)


def test_empty_conversation_id(project, capsys):
    assert run_validate(project, json.dumps([rec(conversation_id=" ")])) == 2
    assert "field 'conversation_id': must not be empty when given" in err(capsys)


# --- behaviour of the stage ------------------------------------------------------------------------------------


def test_at_most_20_problems_listed(project, capsys):
    bad = [rec(id=f"b{i}", tutor_response="") for i in range(30)]
    assert run_validate(project, json.dumps(bad)) == 2
    text = err(capsys)
    assert text.count("must not be empty") == 20
    assert "... and 10 more problems" in text
    assert "30 problems in 30 of 30 records; no valid records; nothing written" in text


def test_failure_leaves_previous_output_untouched(project):
    assert run_validate(project, json.dumps([GOOD])) == 0
    out, metrics = project / "out.jsonl", project / "metrics" / "validation.json"
    before = out.read_bytes(), metrics.read_bytes()
    assert run_validate(project, json.dumps([GOOD, {"context": ""}])) == 2
    assert (out.read_bytes(), metrics.read_bytes()) == before
    assert not [p for p in project.rglob("*.tmp")]


def test_drop_mode_writes_valid_records_and_lists_dropped(project):
    records = [rec(id="ok1"), rec(id="bad", tutor_response=""), rec(id="ok2", tutor_response="Bien.")]
    assert run_validate(project, json.dumps(records), "--on-error", "drop") == 0
    rows = [json.loads(line) for line in (project / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["ok1", "ok2"]
    metrics = json.loads((project / "metrics" / "validation.json").read_text())
    assert metrics["records_read"] == 3 and metrics["records_valid"] == 2 and metrics["records_dropped"] == 1
    assert metrics["dropped"] == [{"record": 2, "id": "bad", "kinds": ["empty_string"]}]
    assert metrics["problems_by_kind"] == {"empty_string": 1}


def test_drop_mode_with_nothing_valid_fails(project, capsys):
    assert run_validate(project, json.dumps([rec(tutor_response="")]), "--on-error", "drop") == 2
    assert "no valid records" in err(capsys)
    assert not (project / "out.jsonl").exists()


def test_normalised_output_ids_groups_and_counts(project):
    records = [
        rec(id=5, language="Spanish"),
        rec(tutor_response="Otra.", language="Spanish"),
        rec(context="", student_message="Bonjour !", tutor_response="Bonjour ! Ça va ?", language="French"),
        rec(conversation_id="c9", tutor_response="Tercera.", metadata={"level": "A1"}),
    ]
    assert run_validate(project, json.dumps(records)) == 0
    rows = [json.loads(line) for line in (project / "out.jsonl").read_text().splitlines()]
    assert rows[0]["id"] == "5"
    assert rows[1]["id"].startswith("r-") and len(rows[1]["id"]) == 18
    assert rows[0]["group_id"] == rows[1]["group_id"] != rows[2]["group_id"]
    assert rows[3]["group_id"] == "c9" and rows[3]["metadata"] == {"level": "A1"}
    metrics = json.loads((project / "metrics" / "validation.json").read_text())
    assert metrics["groups"] == 3
    assert metrics["languages"] == {"French": 1, "Spanish": 2, "unknown": 1}


def test_content_ids_are_stable_across_runs(project):
    assert run_validate(project, json.dumps([rec()])) == 0
    first = (project / "out.jsonl").read_text()
    assert run_validate(project, jsonl(rec()), name="other.txt") == 0
    assert (project / "out.jsonl").read_text() == first


def test_jsonl_detected_by_content_not_extension(project):
    assert run_validate(project, jsonl(rec(id="a"), rec(id="b", tutor_response="B.")), name="data.json") == 0
    assert len((project / "out.jsonl").read_text().splitlines()) == 2


def test_cli_exit_code_and_no_traceback_in_subprocess(project):
    (project / "bad.json").write_text('[{"context": 1}]')
    proc = subprocess.run(
        [sys.executable, "-m", "fluent_reward.cli", "validate", "--input", "bad.json"],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "bad.json: record 1: field 'context': expected a string, got an integer" in proc.stderr


# --- groups: one exchange never lands in two splits -------------------------------------------------------------


def test_duplicate_under_another_conversation_id_says_so_and_offers_grouping_by_content(project, capsys):
    records = [rec(id="a", conversation_id="c1"), rec(id="b", conversation_id="c2")]
    assert run_validate(project, json.dumps(records)) == 2
    assert (
        "record 2 (id=b): same context, student_message and tutor_response as record 1 but another conversation_id "
        "('c1' there, 'c2' here): one exchange in two groups can land in both the train and the test split; "
        "set validate.group_by: content"
    ) in err(capsys)


def test_one_exchange_under_two_conversation_ids_is_a_warning_with_the_fix(project, caplog):
    records = [rec(id="a", conversation_id="c1"), rec(id="b", conversation_id="c2", tutor_response="Otra.")]
    assert run_validate(project, json.dumps(records)) == 0
    assert (
        "record 2 (id=b): field 'conversation_id': same context and student_message as record 1, but in group "
        "'c1' there and 'c2' here: one exchange in two groups"
    ) in caplog.text
    rows = [json.loads(line) for line in (project / "out.jsonl").read_text().splitlines()]
    assert [r["group_id"] for r in rows] == ["c1", "c2"]
    metrics = json.loads((project / "metrics" / "validation.json").read_text())
    assert metrics["warnings_by_kind"] == {"group_conflict": 1} and metrics["groups"] == 2


def test_group_by_content_keeps_one_exchange_in_one_group(project, caplog):
    records = [
        rec(id="a", conversation_id="c1"),
        rec(id="b", conversation_id="c2", tutor_response="Otra."),
        rec(id="c", conversation_id="c2", context="", tutor_response="Otra."),
    ]
    assert run_validate(project, json.dumps(records), "--group-by", "content") == 0
    rows = [json.loads(line) for line in (project / "out.jsonl").read_text().splitlines()]
    assert rows[0]["group_id"] == rows[1]["group_id"] != rows[2]["group_id"]
    assert rows[0]["group_id"].startswith("g-") and rows[0]["conversation_id"] == "c1"  # the id itself is kept
    assert "group_conflict" not in caplog.text and "one exchange in two groups" not in caplog.text


def test_group_by_content_with_drop_keeps_one_copy_of_a_duplicate(project, capsys):
    records = [rec(id="a", conversation_id="c1"), rec(id="b", conversation_id="c2")]
    assert run_validate(project, json.dumps(records), "--group-by", "content", "--on-error", "drop") == 0
    rows = [json.loads(line) for line in (project / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a"]
    assert run_validate(project, json.dumps(records), "--group-by", "content") == 2
    assert "('c1' there, 'c2' here): keep one of them" in err(capsys)
