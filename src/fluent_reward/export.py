"""``fluent-reward export``: the reward model in the forms serving stacks and trainers load by path.

From a verified model folder (``fluent_reward.model_folder``) it writes, under the output folder:

- ``overall/``: a standard single-logit sequence-classification folder (the overall head only, on the judge's
  scale): what ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)``,
  ``pipeline("text-classification")``, a TEI/vLLM-style server or TRL's ``GRPOTrainer(reward_funcs="<path>")``
  load. Its tokenizer carries a chat template that renders a conversation (``messages``, the last ``user`` turn
  being the student's message and the ``assistant`` turns after it the reply) into this project's input template
  as ONE text with the special tokens written out, which is how TRL feeds conversational prompts to a reward model
  given by path. That text tokenises to exactly the ids of the two-segment input (checked at export:
  ``chat_template_ids_match`` in ``export.json``); what TRL cannot pass is the segment ids (``token_type_ids`` are
  all 0), and it applies no truncation rule: see ``trl_path_exact`` in ``export.json`` (exact for backbones without
  segment embeddings, an approximation otherwise; for exact scores in TRL use
  ``fluent_reward.rlaif.make_reward_function``).
- ``onnx/``: ``model.onnx`` (every label, judge scale; dynamic batch and length), the tokenizer and the metadata,
  scored by ``RewardModelScorer(path, backend="onnx")`` with onnxruntime. Exported with ``torch.onnx.export``
  (TorchScript exporter): Hugging Face ``optimum``'s ONNX exporter (``optimum-onnx`` 0.1.0) requires
  transformers < 4.58, and this project runs transformers 5.

Both are written beside their final place and swapped in, each with a model card ``README.md``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

from fluent_reward.errors import FluentRewardError
from fluent_reward.io import file_sha256, write_json
from fluent_reward.model import OVERALL, format_segments, split_turns
from fluent_reward.model_folder import (
    CARD_FILE,
    CHECK_CONTEXT,
    CHECK_REPLY,
    CHECK_STUDENT,
    ModelFolderError,
    ModelMetadata,
    attach_ngram_head,
    check_encoding,
    check_tokenizer_files,
    classifier_layer,
    load_model_folder,
    load_tokenizer,
    model_card,
    quiet_transformers,
    save_ngram_head,
)

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
REPLY_ONNX_FILE = "reply_embedding.onnx"  # the n-gram head's reply embedding, when it reads one
EXPORT_FILE = "export.json"
ONNX_OPSET = 17


# ----------------------------------------------------------------------------------------------------------------
# The single-logit overall folder


def export_overall(model: Any, tokenizer: Any, meta: ModelMetadata, out: Path, metrics: dict | None = None) -> Path:
    """Write the overall-only folder (see the module docstring); returns it."""
    single = overall_only(model)
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = chat_template(tokenizer)
    exact_ids = template_matches(chat_tokenizer, tokenizer)
    if not exact_ids:
        log.warning(
            "%s: this tokenizer encodes the rendered chat template differently from the two-segment input; TRL's "
            "by-path scores will be approximate (export.json: chat_template_ids_match false)",
            out,
        )
    if meta.ngram_weight > 0:
        log.warning(
            "%s: holds the transformer's overall score only: the model's n-gram head (ngram_weight %g) is applied by "
            "RewardModelScorer, the onnx/ export and make_reward_function, not by a by-path loader such as TRL",
            out,
            meta.ngram_weight,
        )
    with _swap(out) as tmp, quiet_transformers():
        single.save_pretrained(tmp, safe_serialization=True)
        chat_tokenizer.save_pretrained(tmp)
        (tmp / CARD_FILE).write_text(
            model_card(meta, metrics, overall_only=True) + _trl_note() + _ngram_note(meta), encoding="utf-8"
        )
        write_json(
            tmp / EXPORT_FILE,
            {
                "kind": "overall",
                "source_training_data_sha256": meta.training_data_sha256,
                "scale": meta.scale,
                "max_length": meta.max_length,
                "chat_template_ids_match": exact_ids,
                "trl_path_exact": exact_ids and not uses_segment_ids(model, tokenizer) and meta.ngram_weight == 0,
                "ngram_head_applied": False,  # a by-path loader runs the transformer alone
                "source_ngram_weight": meta.ngram_weight,
            },
        )
    return out


def overall_only(model: Any) -> Any:
    """A copy of the (judge-scale) model with only logit 0, the overall head: ``num_labels=1``."""
    import torch

    single = copy.deepcopy(model).cpu()
    head = classifier_layer(single)
    new = torch.nn.Linear(head.in_features, 1, bias=True, dtype=head.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(head.weight[:1])
        new.bias.copy_(head.bias[:1])
    parent = single.classifier if not isinstance(getattr(single, "classifier", None), torch.nn.Linear) else None
    if parent is not None and hasattr(parent, "out_proj"):
        parent.out_proj = new
    elif isinstance(getattr(single, "classifier", None), torch.nn.Linear):
        single.classifier = new
    else:
        single.score = new
    single.config.num_labels = 1
    single.config.id2label = {0: OVERALL}
    single.config.label2id = {OVERALL: 0}
    single.config.problem_type = "regression"
    single.num_labels = 1
    return single


def chat_template(tokenizer: Any) -> str:
    """A Jinja chat template rendering ``messages`` into the model's input as one text, special tokens included.

    The student's message is the last ``user`` turn that has an ``assistant`` turn after it (or the last ``user``
    turn); earlier ``user`` / ``assistant`` turns are the context (``Student: `` / ``Tutor: `` lines), ``system`` is
    skipped; the ``assistant`` turns after the student's message are the reply.
    """
    prefix, middle, suffix = _special_layout(tokenizer)
    marks = {"context": "[context] ", "none": "(none)", "student": "\n[student] ", "tutor": "[tutor] "}
    a, b = format_segments([], "S", "R")
    if a != f"{marks['context']}{marks['none']}{marks['student']}S" or b != f"{marks['tutor']}R":
        raise FluentRewardError("the input template changed: update export.chat_template")  # pinned by a test
    return (
        "{%- set ns = namespace(student=-1) -%}"
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.student = loop.index0 -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set ns2 = namespace(context=[], reply=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if loop.index0 < ns.student and m['role'] == 'user' -%}"
        "{%- set ns2.context = ns2.context + ['Student: ' + m['content'] | trim] -%}"
        "{%- elif loop.index0 < ns.student and m['role'] == 'assistant' -%}"
        "{%- set ns2.context = ns2.context + ['Tutor: ' + m['content'] | trim] -%}"
        "{%- elif loop.index0 > ns.student and m['role'] == 'assistant' -%}"
        "{%- set ns2.reply = ns2.reply + [m['content']] -%}"
        "{%- endif -%}{%- endfor -%}"
        f"{_jinja_str(prefix + marks['context'])}"
        "{{ ns2.context | join('\\n') if ns2.context else " + repr(marks["none"]) + " }}"
        f"{_jinja_str(marks['student'])}"
        "{{ messages[ns.student]['content'] | trim if ns.student >= 0 else '' }}"
        f"{_jinja_str(middle + marks['tutor'])}"
        "{{ ns2.reply | join('\\n') | trim }}"
        f"{_jinja_str(suffix)}"
    )


def _jinja_str(text: str) -> str:
    return "{{ " + json.dumps(text) + " }}" if text else ""


def _special_layout(tokenizer: Any) -> tuple[str, str, str]:
    """The special tokens the tokenizer puts before, between and after a pair of segments, as text."""
    ids = tokenizer("a", "b")["input_ids"]
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    content = [i for i, token_id in enumerate(ids) if token_id not in special]
    if len(content) != 2:
        raise FluentRewardError(f"cannot read the tokenizer's pair layout from {tokens}")
    first, second = content
    return "".join(tokens[:first]), "".join(tokens[first + 1 : second]), "".join(tokens[second + 1 :])


def template_matches(chat_tokenizer: Any, tokenizer: Any) -> bool:
    """Whether the rendered check conversation tokenises (as TRL does) to the model's own input ids."""
    turns = split_turns(CHECK_CONTEXT)
    messages = [
        {"role": "user" if t.startswith("Student:") else "assistant", "content": t.split(":", 1)[1].strip()}
        for t in turns
    ]
    messages += [{"role": "user", "content": CHECK_STUDENT}, {"role": "assistant", "content": CHECK_REPLY}]
    text = chat_tokenizer.apply_chat_template(messages, tokenize=False)
    rendered = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    return rendered == check_encoding(tokenizer)["input_ids"]


def uses_segment_ids(model: Any, tokenizer: Any) -> bool:
    """Whether segment B's token type changes the model's input (a text-only caller cannot pass it)."""
    import torch

    if "token_type_ids" not in tokenizer("a", "b"):
        return False
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    table = getattr(embeddings, "token_type_embeddings", None)
    if table is None or table.weight.shape[0] < 2:
        return False
    return not torch.equal(table.weight[0], table.weight[1])


def _trl_note() -> str:
    return (
        "\n## Loading by path (TRL, pipeline)\n\n"
        "`AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)` and "
        '`GRPOTrainer(reward_funcs="<path>")` load this folder as it is. For conversational prompts TRL renders '
        "`prompt + completion` with this tokenizer's chat template, which writes the input template above as one "
        "text (special tokens included): the token ids are exactly the model's. It cannot pass the segment ids "
        "(`token_type_ids` are all 0) nor apply the truncation rule; `export.json` says whether the scores are then "
        "exact (`trl_path_exact`, true for backbones without segment embeddings). Plain-text prompts are read as one "
        "text in a layout the model was not trained on. For exact scores in TRL use "
        "`fluent_reward.rlaif.make_reward_function(RewardModelScorer(...))`.\n"
    )


def _ngram_note(meta: ModelMetadata) -> str:
    if meta.ngram_weight == 0:
        return ""
    return (
        "\n## The n-gram head is not in this folder\n\n"
        f"The reward model's scores blend this transformer ({1 - meta.ngram_weight:g}) with a ridge on the reply's "
        f"character n-grams and embedding ({meta.ngram_weight:g}); this folder holds the transformer alone, so a "
        "by-path loader (transformers, TRL) gets the transformer's score. The blend: `fluent_reward.RewardModelScorer` "
        "on the model folder or on `onnx/`, or `fluent_reward.rlaif.make_reward_function`.\n"
    )


# ----------------------------------------------------------------------------------------------------------------
# ONNX


def export_onnx(model: Any, tokenizer: Any, meta: ModelMetadata, out: Path, metrics: dict | None = None) -> Path:
    """Write ``model.onnx`` (all labels, judge scale) + tokenizer + metadata + card; returns the folder. When the
    n-gram head reads reply embeddings, ``reply_embedding.onnx`` computes them."""
    import torch

    from fluent_reward.frozen_prefix import PooledPrefix

    names = list(tokenizer("a", "b").keys())
    model = copy.deepcopy(model).float().cpu().eval()
    wrapper = _logits_module(model, names)
    example = tokenizer(["a b", "c"], ["d", "e f g"], padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}
    with _swap(out) as tmp, quiet_transformers(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on data-dependent branches it records as constants
        torch.onnx.export(
            wrapper,
            tuple(example[name] for name in names),
            str(tmp / ONNX_FILE),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
        head = meta.ngram_head
        if head is not None and head.embedding_layer is not None:
            torch.onnx.export(
                PooledPrefix(model, head.embedding_layer, names).eval(),
                tuple(example[name] for name in names),
                str(tmp / REPLY_ONNX_FILE),
                input_names=names,
                output_names=["embedding"],
                dynamic_axes={name: {0: "batch", 1: "sequence"} for name in names} | {"embedding": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        written = tokenizer.save_pretrained(tmp)
        saved = meta.model_copy(
            update={
                "tokenizer_files": {Path(p).name: file_sha256(p) for p in written if Path(p).is_file()},
                "ngram_files": save_ngram_head(meta, tmp),  # scored with the graph's logits, as in the model folder
            }
        )
        card = model_card(saved, metrics).replace("## Outputs", "Format: ONNX (`model.onnx`), fp32.\n\n## Outputs")
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        write_json(tmp / EXPORT_FILE, {"kind": "onnx", "inputs": names, "opset": ONNX_OPSET})
        saved.save(tmp)
    return out


def _logits_module(model: Any, names: list[str]) -> Any:
    """The model with positional tensor inputs (in ``names`` order) and the logits as its one output."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model(**dict(zip(names, tensors, strict=True))).logits

    return LogitsOnly().eval()


def load_onnx_folder(folder: str | Path) -> tuple[Any, Any, ModelMetadata, list[str], Any]:
    """``(onnxruntime session, tokenizer, metadata, input names, reply-embedding session or None)`` from a verified
    ONNX export folder (the second graph exists when the n-gram head reads reply embeddings)."""
    folder = Path(folder)
    meta = attach_ngram_head(folder, ModelMetadata.load(folder))
    path = folder / ONNX_FILE
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing; export one with `fluent-reward export --onnx`")
    check_tokenizer_files(folder, meta)
    with quiet_transformers():
        tokenizer = load_tokenizer(folder, meta)
    try:
        import onnxruntime
    except ImportError:
        raise ModelFolderError("backend='onnx' needs onnxruntime: pip install -e '.[onnx]'") from None
    session = _onnx_session(onnxruntime, path)
    names = [i.name for i in session.get_inputs()]
    outputs = session.get_outputs()
    if len(outputs) != 1 or outputs[0].shape[-1] != len(meta.labels):
        raise ModelFolderError(
            f"{path}: its output is {outputs[0].shape}, the metadata lists {len(meta.labels)} labels"
        )
    reply_session = None
    if meta.ngram_head is not None and meta.ngram_head.embedding_layer is not None:
        reply_path = folder / REPLY_ONNX_FILE
        if not reply_path.is_file():
            raise ModelFolderError(f"{reply_path}: missing (the n-gram head reads reply embeddings); re-export")
        reply_session = _onnx_session(onnxruntime, reply_path)
    return session, tokenizer, meta, names, reply_session


def _onnx_session(onnxruntime: Any, path: Path) -> Any:
    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for damaged or foreign files
        raise ModelFolderError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None


# ----------------------------------------------------------------------------------------------------------------
# The command


def run_export(
    model_dir: Path, output: Path, onnx: bool = True, overall: bool = True, metrics_path: Path | None = None
) -> dict[str, Path]:
    """Export a verified model folder; returns ``{"overall": path, "onnx": path}`` for what was written."""
    missing = [name for name in ("onnx", "onnxruntime") if onnx and importlib.util.find_spec(name) is None]
    if missing:
        raise FluentRewardError(f"ONNX export needs {' and '.join(missing)}: pip install -e '.[onnx]' (or --no-onnx)")
    model, tokenizer, meta = load_model_folder(model_dir)
    metrics = _headline_metrics(metrics_path)
    written = {}
    if overall:
        written["overall"] = export_overall(model, tokenizer, meta, Path(output) / "overall", metrics)
    if onnx:
        written["onnx"] = export_onnx(model, tokenizer, meta, Path(output) / "onnx", metrics)
    for kind, path in written.items():
        log.info("exported %s -> %s", kind, path)
    return written


def _headline_metrics(path: Path | None) -> dict[str, Any]:
    """The test-split metrics for the model card, when the evaluate stage has written them."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s: unreadable, the model cards get no test metrics", path)
        return {}
    keys = ("overall.spearman", "overall.mae", "pairwise_accuracy", "best_of_n_agreement", "n_test")
    return {f"test {k}": metrics[k] for k in keys if isinstance(metrics.get(k), int | float)}


class _swap:
    """Write into ``.NAME.tmp`` beside ``out``; on success replace ``out`` with it; on failure remove it."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.out.with_name(f".{self.out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.out.exists():
            self.out.rename(old)
        self.tmp.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)
