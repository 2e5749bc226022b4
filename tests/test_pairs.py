"""DPO pairs: within groups only, min-gap, deterministic, both TRL formats, loadable by TRL's DPO data code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fluent_reward.config import load_params
from fluent_reward.pairs import (
    Candidate,
    build_pairs,
    conversational_prompt,
    judged_candidates,
    plain_prompt,
    summary_path,
)
from tests.support import make_records, make_tiny_causal_lm, make_tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = "Tutor: ¡Hola! ¿Qué hiciste ayer?\nStudent: Yo ir al cine.\nTutor: Casi: «fui al cine». ¿Con quién?"
STUDENT = "Con mi hermana. ¿Está bien?"


def cand(id_: str, group: str, overall: float, response: str | None = None) -> Candidate:
    return Candidate(id_, group, CONTEXT, STUDENT, response or f"reply {id_}", overall)


def test_prompt_formats_are_pinned():
    assert plain_prompt(CONTEXT, STUDENT) == (
        "Tutor: ¡Hola! ¿Qué hiciste ayer?\nStudent: Yo ir al cine.\nTutor: Casi: «fui al cine». ¿Con quién?\n"
        "Student: Con mi hermana. ¿Está bien?\nTutor:"
    )
    assert conversational_prompt(CONTEXT, STUDENT, system_prompt="Be kind.") == [
        {"role": "system", "content": "Be kind."},
        {"role": "assistant", "content": "¡Hola! ¿Qué hiciste ayer?"},
        {"role": "user", "content": "Yo ir al cine."},
        {"role": "assistant", "content": "Casi: «fui al cine». ¿Con quién?"},
        {"role": "user", "content": "Con mi hermana. ¿Está bien?"},
    ]
    # consecutive turns of one role merge; an empty context gives just the student's message
    assert conversational_prompt("Student: a\nStudent: b", "c") == [{"role": "user", "content": "a\nb\nc"}]
    assert conversational_prompt("", "hola") == [{"role": "user", "content": "hola"}]


def test_pairs_stay_within_groups_and_respect_min_gap():
    candidates = [cand("a1", "A", 8.0), cand("b1", "B", 2.0), cand("a2", "A", 5.0), cand("a3", "A", 7.5)]
    candidates.append(cand("b2", "B", 9.0))
    rows, summary = build_pairs(candidates, min_gap=1.0, fmt="plain")
    assert [(r["chosen_id"], r["rejected_id"]) for r in rows] == [("a1", "a2"), ("a3", "a2"), ("b2", "b1")]
    assert all(r["score_chosen"] - r["score_rejected"] >= 1.0 for r in rows)
    assert rows[0]["chosen"] == " reply a1" and rows[0]["prompt"].endswith("\nTutor:")
    assert [s.as_dict() for s in summary] == [
        {"group_id": "A", "candidates": 3, "pairs": 2, "skipped_below_min_gap": 1, "mean_gap": 2.75},
        {"group_id": "B", "candidates": 2, "pairs": 1, "skipped_below_min_gap": 0, "mean_gap": 7.0},
    ]
    again, _ = build_pairs(list(candidates), min_gap=1.0, fmt="plain")
    assert again == rows  # deterministic


def test_equal_scores_never_make_a_pair_and_best_vs_rest():
    rows, _ = build_pairs([cand("x", "G", 5.0), cand("y", "G", 5.0)], min_gap=0.0)
    assert rows == []
    candidates = [cand("a", "G", 6.0), cand("b", "G", 9.0), cand("c", "G", 3.0), cand("d", "G", 8.5)]
    rows, summary = build_pairs(candidates, min_gap=1.0, strategy="best-vs-rest")
    assert [(r["chosen_id"], r["rejected_id"]) for r in rows] == [("b", "a"), ("b", "c")]
    assert summary[0].below_gap == 1
    with pytest.raises(ValueError, match="min_gap"):
        build_pairs(candidates, min_gap=-1)


def judged_project(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    params = load_params(ROOT / "params.yaml")
    rows = make_records(n_groups=3, per_group=3, seed=1)
    validated = tmp_path / "validated.jsonl"
    validated.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    judgments = []
    for i, row in enumerate(rows[:-1]):  # the last record was never judged
        value = 2 + (i * 3) % 8
        judgments.append(
            {"id": row["id"], "group_id": row["group_id"], "scores": dict.fromkeys(params.rubric.names, value)}
        )
    judgments[0]["scores"]["accuracy"] = 10  # overall is the rubric's weighted mean, not a plain mean
    doc = {"dimensions": params.rubric.names, "scale": {"min": 1, "max": 10}, "judgments": judgments}
    path = tmp_path / "judgments.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return validated, path, rows


def test_judged_candidates_use_the_rubric_overall_and_skip_unjudged(tmp_path, caplog):
    params = load_params(ROOT / "params.yaml")
    validated, judgments, rows = judged_project(tmp_path)
    candidates = judged_candidates(validated, judgments, params.rubric)
    assert [c.id for c in candidates] == [r["id"] for r in rows[:-1]]
    assert candidates[0].overall == pytest.approx(2 + 8 * params.rubric.weights["accuracy"])
    assert "1 validated records have no judgment" in caplog.text


def run_cli(tmp_path: Path, *args: str) -> int:
    from fluent_reward.cli import main

    return main(["--params", str(ROOT / "params.yaml"), "pairs", "--no-progress", *args])


@pytest.mark.parametrize("fmt", ["plain", "conversational"])
def test_cli_pairs_from_judgments_load_with_trl(tmp_path, fmt):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    validated, judgments, _ = judged_project(tmp_path)
    out = tmp_path / "pairs" / "dpo.jsonl"
    code = run_cli(
        tmp_path, "--validated", str(validated), "--judgments", str(judgments), "--output", str(out), "--format", fmt
    )
    assert code == 0
    summary = json.loads(summary_path(out).read_text())
    assert summary["format"] == fmt and summary["pairs"] > 0 and len(summary["per_group"]) == 3
    assert sum(g["pairs"] for g in summary["per_group"]) == summary["pairs"]

    dataset = load_dataset("json", data_files=str(out), split="train")
    assert len(dataset) == summary["pairs"]
    assert {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
    example = dataset[0]
    assert is_conversational(example) == (fmt == "conversational")
    tokenizer = AutoTokenizer.from_pretrained(make_tiny_causal_lm(tmp_path / "lm"))
    rendered = maybe_apply_chat_template(example, tokenizer)
    assert isinstance(rendered["prompt"], str) and isinstance(rendered["chosen"], str)
    assert example["group_id"] in {r["group_id"] for r in dataset}
    assert all(r["score_chosen"] - r["score_rejected"] >= 1.0 for r in dataset)  # pairs.min_gap in params.yaml


def test_pairs_file_trains_a_dpo_step(tmp_path):
    """TRL's DPOTrainer takes the file as it is (conversational): tokenises it and runs one step."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    validated, judgments, _ = judged_project(tmp_path)
    out = tmp_path / "dpo.jsonl"
    args = ["--validated", str(validated), "--judgments", str(judgments), "--output", str(out)]
    assert run_cli(tmp_path, *args, "--format", "conversational") == 0
    lm = make_tiny_causal_lm(tmp_path / "lm")
    policy = AutoModelForCausalLM.from_pretrained(lm)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer = DPOTrainer(
        model=policy,
        args=DPOConfig(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=2,
            max_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            logging_steps=1,
        ),
        train_dataset=load_dataset("json", data_files=str(out), split="train"),
        processing_class=AutoTokenizer.from_pretrained(lm),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(x) for x in losses)
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p.detach().cpu(), before[n])]
    assert unchanged == [], "trainable parameters that a DPO step left unchanged"  # every one moves, as in TRL's tests


def test_cli_pairs_from_model_scores(tmp_path):
    model = make_tiny_model_folder(tmp_path / "model")
    source = tmp_path / "candidates.jsonl"
    rows = [{k: v for k, v in r.items() if k != "group_id"} for r in make_records(n_groups=2, per_group=3)]
    for r in rows:
        r["conversation_id"] = r["id"].split("-")[0]
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "model_pairs.jsonl"
    args = ["--from-model", str(source), "--model", str(model), "--output", str(out), "--min-gap", "0.01"]
    assert run_cli(tmp_path, *args) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs and {p["group_id"] for p in pairs} <= {"r0", "r1"}
    assert all(p["chosen_id"].split("-")[0] == p["rejected_id"].split("-")[0] for p in pairs)
    assert "model scores" in json.loads(summary_path(out).read_text())["source"]


def test_cli_pairs_errors(tmp_path, capsys):
    assert run_cli(tmp_path, "--validated", str(tmp_path / "none.jsonl"), "--judgments", str(tmp_path / "j")) == 2
    assert "not found (run `fluent-reward validate`" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "", "student_message": "hola", "tutor_response": ""}\n', encoding="utf-8")
    model = make_tiny_model_folder(tmp_path / "model")
    assert run_cli(tmp_path, "--from-model", str(bad), "--model", str(model), "--output", str(tmp_path / "o")) == 2
    assert "field 'tutor_response': must not be empty" in capsys.readouterr().err


# A chat template as strict as some instruct models' templates: roles must alternate user/assistant after an optional
# system message, starting with the user.
STRICT_TEMPLATE = (
    "{% set rest = messages %}{% if messages[0]['role'] == 'system' %}{% set rest = messages[1:] %}"
    "<|system|>{{ messages[0]['content'] }}<|end|>\n{% endif %}"
    "{% for m in rest %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_user_first_prompts_fold_the_leading_tutor_turns():
    earlier = "Earlier in this conversation, the tutor said:\n¡Hola! ¿Qué hiciste ayer?"
    assert conversational_prompt(CONTEXT, STUDENT, user_first="system") == [
        {"role": "system", "content": earlier},
        {"role": "user", "content": "Yo ir al cine."},
        {"role": "assistant", "content": "Casi: «fui al cine». ¿Con quién?"},
        {"role": "user", "content": "Con mi hermana. ¿Está bien?"},
    ]
    assert conversational_prompt(CONTEXT, STUDENT, system_prompt="Be kind.", user_first="system")[0] == {
        "role": "system",
        "content": f"Be kind.\n\n{earlier}",
    }
    assert conversational_prompt(CONTEXT, STUDENT, system_prompt="Be kind.", user_first="user")[:2] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": f"{earlier}\n\nYo ir al cine."},
    ]
    # a prompt that already starts with the student is unchanged
    assert conversational_prompt("Student: a", "b", user_first="user") == [{"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize("user_first", ["system", "user"])
def test_user_first_pairs_pass_a_strict_chat_template(tmp_path, user_first, caplog, capsys):
    from datasets import load_dataset
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer
    from trl.data_utils import maybe_apply_chat_template

    validated, judgments, _ = judged_project(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(make_tiny_causal_lm(tmp_path / "lm"))
    tokenizer.chat_template = STRICT_TEMPLATE
    common = ["--validated", str(validated), "--judgments", str(judgments), "--format", "conversational"]
    caplog.set_level("INFO", logger="fluent_reward.pairs")
    assert run_cli(tmp_path, *common, "--output", str(tmp_path / "as_is.jsonl")) == 0
    as_is = load_dataset("json", data_files=str(tmp_path / "as_is.jsonl"), split="train")
    with pytest.raises(TemplateError, match="must alternate"):  # the data starts with the tutor: rejected as is
        maybe_apply_chat_template(next(r for r in as_is if r["prompt"][0]["role"] == "assistant"), tokenizer)
    out = tmp_path / "user_first.jsonl"
    assert run_cli(tmp_path, *common, "--output", str(out), "--user-first", user_first) == 0
    dataset = load_dataset("json", data_files=str(out), split="train")
    for row in dataset:
        assert row["prompt"][0]["role"] in ("system", "user")
        rendered = maybe_apply_chat_template(row, tokenizer)
        assert "Earlier in this conversation, the tutor said:" in rendered["prompt"]
        assert row["margin"] == pytest.approx(row["score_chosen"] - row["score_rejected"], abs=1e-4)
        assert row["margin"] >= 1.0
    # the summary: one log line per run, nothing printed besides
    assert sum("DPO pairs" in r.message for r in caplog.records) == 2  # the two runs above
    assert "pairs from" not in capsys.readouterr().out


def test_pairs_from_model_read_through_the_validator(tmp_path, caplog):
    model = make_tiny_model_folder(tmp_path / "model")
    rows = [{k: v for k, v in r.items() if k != "group_id"} for r in make_records(n_groups=2, per_group=3)]
    rows[1]["tutor_response"] = "   "
    rows.append(dict(rows[0]))  # a duplicate: the validator's own check
    source = tmp_path / "candidates.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    common = ["--from-model", str(source), "--model", str(model), "--output", str(out), "--min-gap", "0.01"]
    assert run_cli(tmp_path, *common) == 2  # validate.on_error: fail
    assert not out.exists()
    assert run_cli(tmp_path, *common, "--on-error", "drop") == 0
    assert "record 2 (id=r0-1): field 'tutor_response'" in caplog.text and "(skipped)" in caplog.text
    assert "record 7" in caplog.text  # the duplicate
    summary = json.loads(summary_path(out).read_text())
    assert summary["candidates"] == 5
