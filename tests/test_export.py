"""`fluent-reward export`: the single-logit folder in transformers, pipeline and TRL by path; ONNX vs torch."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from fluent_reward.inference import RewardModelScorer
from fluent_reward.model import encode_batch
from fluent_reward.model_folder import ModelFolderError, load_model_folder, save_model_folder
from tests.support import make_records, make_tiny_causal_lm, make_tiny_model_folder, write_project_params

DIMS = ("accuracy", "feedback")
HAVE_ONNX = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="the [onnx] extra (onnx, onnxruntime) is not installed")
CONTEXT = "Tutor: ¡Hola! ¿Qué hiciste ayer?\nStudent: Yo ir al cine."
STUDENT = "¿Está bien mi frase?"
REPLY = "Casi: se dice «fui al cine». ¿Qué película viste?"


def _messages(context: str, student: str, reply: str) -> list[dict[str, str]]:
    from fluent_reward.rlaif import ROLE_PREFIX

    roles = {prefix.strip(": "): role for role, prefix in ROLE_PREFIX.items()}
    turns = [line.split(": ", 1) for line in context.splitlines()] if context else []
    messages = [{"role": roles[who], "content": text} for who, text in turns]
    return [*messages, {"role": "user", "content": student}, {"role": "assistant", "content": reply}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_folder(tmp_path_factory.mktemp("m") / "model", dimensions=DIMS, seed=4)


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory) -> Path:
    from fluent_reward.cli import main

    out = tmp_path_factory.mktemp("export") / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), *([] if HAVE_ONNX else ["--no-onnx"])]) == 0
    return out


def test_export_writes_both_folders_with_cards(exported):
    assert sorted(p.name for p in exported.iterdir()) == (["onnx", "overall"] if HAVE_ONNX else ["overall"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "export.json"):
        assert (exported / "overall" / name).is_file(), name
    for name in ("model.onnx", "tokenizer.json", "fluent_reward.json", "README.md") if HAVE_ONNX else ():
        assert (exported / "onnx" / name).is_file(), name
    card = (exported / "overall" / "README.md").read_text(encoding="utf-8")
    assert "| 0 | `overall` |" in card and "`accuracy`" not in card and "GRPOTrainer" in card
    # --model is not data.model_dir: the pipeline's test metrics (metrics/metrics.json) are not this model's
    assert "test overall.spearman" not in card


def test_export_of_the_pipeline_model_carries_its_test_metrics(model_dir, tmp_path):
    from fluent_reward.cli import main

    params = write_project_params(tmp_path, data={"model_dir": str(model_dir)})
    (tmp_path / "metrics" / "metrics.json").parent.mkdir()
    (tmp_path / "metrics" / "metrics.json").write_text(json.dumps({"overall.spearman": 0.75, "n_test": 9}))
    out = tmp_path / "out"
    assert main(["export", "--params", str(params), "--output", str(out), "--no-onnx"]) == 0
    card = (out / "overall" / "README.md").read_text(encoding="utf-8")
    assert "| test overall.spearman | 0.75 |" in card and "| test n_test | 9 |" in card


def test_overall_folder_loads_with_num_labels_1_and_scores_on_the_judge_scale(model_dir, exported):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, info = AutoModelForSequenceClassification.from_pretrained(
        exported / "overall", num_labels=1, output_loading_info=True
    )
    assert not any(info.values()), info  # nothing missing, nothing randomly initialised
    tokenizer = AutoTokenizer.from_pretrained(exported / "overall")
    (item,) = encode_batch(tokenizer, [CONTEXT], [STUDENT], [REPLY], 128, keep_first_turns=1)
    with torch.no_grad():
        logit = model(**{k: torch.tensor([v]) for k, v in item.items()}).logits[0, 0].item()
    expected = RewardModelScorer(model_dir, device="cpu", clip=False).score(CONTEXT, REPLY, STUDENT)
    assert logit == pytest.approx(expected, abs=1e-4)
    assert model.config.id2label == {0: "overall"} and model.config.problem_type == "regression"


def test_overall_folder_in_pipeline(model_dir, exported):
    from transformers import pipeline

    from fluent_reward.model import format_segments, split_turns

    a, b = format_segments(split_turns(CONTEXT), STUDENT, REPLY)
    out = pipeline("text-classification", model=str(exported / "overall"), device="cpu")({"text": a, "text_pair": b})
    expected = RewardModelScorer(model_dir, device="cpu", clip=False).score(CONTEXT, REPLY, STUDENT)
    assert out["label"] == "overall"
    assert out["score"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("context", [CONTEXT, ""])
def test_chat_template_renders_the_exact_input_ids(exported, context):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported / "overall")
    text = tokenizer.apply_chat_template(_messages(context, STUDENT, REPLY), tokenize=False)
    (item,) = encode_batch(tokenizer, [context], [STUDENT], [REPLY], 128, keep_first_turns=1)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == item["input_ids"]
    if not context:
        assert text.startswith("[CLS][context] (none)\n[student] ")


@pytest.fixture(scope="module")
def segment_free_export(tmp_path_factory) -> tuple[Path, Path]:
    """A model whose two segment embeddings are equal (like a backbone without token types): TRL's path is exact."""
    import torch

    root = tmp_path_factory.mktemp("free")
    model, tokenizer, meta = load_model_folder(make_tiny_model_folder(root / "src", dimensions=DIMS, seed=5))
    with torch.no_grad():
        table = model.bert.embeddings.token_type_embeddings.weight
        table[1] = table[0]
    save_model_folder(model, tokenizer, meta, root / "model")
    from fluent_reward.export import run_export

    run_export(root / "model", root / "out", onnx=False)
    return root / "model", root / "out" / "overall"


def test_export_json_says_whether_the_trl_path_is_exact(exported, segment_free_export):
    info = json.loads((exported / "overall" / "export.json").read_text())
    assert info["chat_template_ids_match"] is True and info["trl_path_exact"] is False
    assert json.loads((segment_free_export[1] / "export.json").read_text())["trl_path_exact"] is True


def test_grpo_trainer_loads_the_overall_folder_by_path(tmp_path, segment_free_export):
    """TRL's own path loading: GRPOTrainer(reward_funcs="<path>") scores completions as the scorer does."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    model_dir, overall_dir = segment_free_export
    scorer = RewardModelScorer(model_dir, device="cpu", clip=False)
    policy_dir = make_tiny_causal_lm(tmp_path / "policy")
    seen: list[tuple] = []

    def capture(prompts, completions, **kwargs):
        from fluent_reward.rlaif import completion_text, from_messages

        for prompt, completion in zip(prompts, completions, strict=True):
            seen.append((*from_messages(prompt), completion_text(completion)))
        return [0.0] * len(completions)

    prompts = [
        [{"role": "assistant", "content": "¡Hola! ¿Qué hiciste ayer?"}, {"role": "user", "content": f"Yo ir {i}."}]
        for i in range(4)
    ]
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
        max_steps=1, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir),
        reward_funcs=[str(overall_dir), capture],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=AutoTokenizer.from_pretrained(policy_dir),
    )
    assert trainer.reward_funcs[0].config.num_labels == 1
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "rewards/overall/mean" in e)
    expected = scorer.score_batch([c for c, _, _ in seen], [r for _, _, r in seen], [s for _, s, _ in seen])
    assert seen and logged["rewards/overall/mean"] == pytest.approx(float(np.mean(expected)), abs=1e-3)


# ---- ONNX ------------------------------------------------------------------------------------------------------


@needs_onnx
def test_onnx_backend_agrees_with_torch(model_dir, exported):
    rows = make_records(n_groups=8, per_group=4, seed=1)
    for i, row in enumerate(rows):
        row["tutor_response"] += " ¡Muy bien!" * (i % 5)
    columns = ([r["context"] for r in rows], [r["tutor_response"] for r in rows], [r["student_message"] for r in rows])
    torch_scores = RewardModelScorer(model_dir, device="cpu", batch_size=8).predict(*columns)
    onnx = RewardModelScorer(exported / "onnx", backend="onnx", batch_size=8)
    onnx_scores = onnx.predict(*columns)
    assert onnx.dimensions == list(DIMS) and onnx.model is None
    for k in range(torch_scores.shape[1]):
        assert spearmanr(torch_scores[:, k], onnx_scores[:, k]).statistic >= 0.999
    assert np.abs(torch_scores - onnx_scores).max() < 1e-3


@needs_onnx
def test_onnx_backend_refuses_damage_and_misuse(exported, tmp_path):
    folder = Path(shutil.copytree(exported / "onnx", tmp_path / "onnx"))
    with pytest.raises(ValueError, match="fast and compile must be off"):
        RewardModelScorer(folder, backend="onnx", fast=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        RewardModelScorer(folder, backend="tensorrt")
    (folder / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelFolderError, match=r"model\.onnx: not a loadable ONNX model"):
        RewardModelScorer(folder, backend="onnx")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match=r"tokenizer\.json: missing"):
        RewardModelScorer(folder, backend="onnx")
