"""Scoring tutor replies with a trained reward model: ``RewardModelScorer``, its fast CPU path, and file scoring.

Two overall scores exist, and the API keeps them apart:

- the **overall head** (logit 0): the model's own prediction of the judge's overall score (the rubric's weighted
  mean of the judge's dimension scores, learnt as a target of its own). ``score`` / ``score_batch`` return it by
  default;
- the **weighted overall**: the weighted mean of the model's predicted dimension scores, with the rubric weights
  stored in the model folder or with weights the caller supplies. Predictions are cheap to re-weight:
  ``Scores.weighted(weights)`` recomputes it from scores already computed, without running the model again.

With the training weights the two agree closely but not exactly (two heads, two sets of errors); use the head for
the best estimate of the judge's overall, the weighted form when you change the weights.

Speed on CPU: sequences are sorted by length and cut into batches of at most ``batch_size`` sequences and
``max_batch_tokens`` padded tokens, so almost no padding is computed; results come back in input order. The fast
path (``fast=True``) runs the model in bfloat16 on CPUs with native bf16 instructions (AVX512-BF16 / AMX): about
1.8x the fp32 throughput, scores within Spearman 0.999 of fp32. ``fast="int8"`` (dynamic int8 quantisation of the
encoder's linear layers, per-channel weights) can be faster still but is noisier (Spearman 0.88-0.99 against fp32 on
the trained model: activations are quantised per tensor, and BERT's outlier channels cost them precision); it is
what ``fast=True`` falls back to on CPUs without bf16. ``bench/scoring.py`` measures both, and the ONNX export
scored with onnxruntime (``backend="onnx"``, fp32, same scores as torch fp32).

Scores are clipped to the judge's scale by default (``clip=False`` for the raw regression outputs, which can fall
past the scale's ends).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluent_reward.errors import FluentRewardError
from fluent_reward.io import atomic_open
from fluent_reward.model import (
    cpu_has_native_bf16,
    encode_batch,
    head_embeddings,
    reply_embeddings,
    split_turns,
)
from fluent_reward.model_folder import ModelMetadata, classifier_layer, load_model_folder
from fluent_reward.progress import progress

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fluent_reward.config import ValidateConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = "models/reward_model_final"
FAST_MODES = ("int8", "bf16")
BACKENDS = ("torch", "onnx")
_STUDENT_PREFIX = "Student:"


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Scores:
    """The scores of one reply on the judge's scale.

    ``overall`` is the model's overall head; ``dimensions`` the predicted score per rubric dimension (rubric order);
    ``weights`` the rubric weights saved with the model, used by ``weighted()`` when no weights are given.
    """

    overall: float
    dimensions: dict[str, float]
    weights: dict[str, float] = field(repr=False)

    def weighted(self, weights: Mapping[str, float] | None = None) -> float:
        """The weighted mean of the predicted dimension scores (no model call): ``sum(w*s) / sum(w)``."""
        chosen = self.weights if weights is None else check_weights(weights, list(self.dimensions))
        return weighted_mean(self.dimensions, chosen)

    def as_dict(self, weights: Mapping[str, float] | None = None) -> dict[str, Any]:
        return {"overall": self.overall, "weighted_overall": self.weighted(weights), "scores": dict(self.dimensions)}


@dataclass(frozen=True)
class BestOfN:
    """The winner of ``best_of_n``: its index in the candidates, its text and score, and every candidate's score.

    Ties go to the earliest candidate, so the choice is deterministic.
    """

    index: int
    response: str
    score: float
    scores: list[float]


def check_weights(weights: Mapping[str, float], dimensions: Sequence[str]) -> dict[str, float]:
    """Weights for exactly ``dimensions``: non-negative numbers, not all zero; a clear ValueError otherwise."""
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a mapping of dimension -> weight, got {type(weights).__name__}")
    unknown = sorted(set(weights) - set(dimensions))
    missing = [d for d in dimensions if d not in weights]
    if unknown or missing:
        raise ValueError(
            f"weights must name exactly the model's dimensions {list(dimensions)}"
            + (f"; unknown: {unknown}" if unknown else "")
            + (f"; missing: {missing} (give 0 to ignore a dimension)" if missing else "")
        )
    out = {}
    for name in dimensions:
        value = weights[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"weights['{name}'] must be a finite number >= 0, got {value!r}")
        out[name] = float(value)
    if sum(out.values()) <= 0:
        raise ValueError("weights must not all be zero")
    return out


def weighted_mean(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    total = sum(weights.values())
    return sum(weights[name] * scores[name] for name in weights) / total


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def split_student_message(context: str) -> tuple[str, str]:
    """``(earlier turns, student message)`` from a context whose last turn is ``Student: ...``.

    Used when no ``student_message`` is given: the context then holds the whole conversation so far.
    """
    turns = split_turns(context)
    if not turns or not turns[-1].startswith(_STUDENT_PREFIX):
        raise ValueError(
            "student_message is None and the context does not end with a 'Student: ...' turn; "
            "pass student_message, or end the context with the student's latest message"
        )
    return "\n".join(turns[:-1]), turns[-1][len(_STUDENT_PREFIX) :].strip()


def _check_texts(name: str, values: Any, allow_none: bool = False, non_empty: bool = False) -> list[Any]:
    """A list of strings (or None where allowed); non-empty ones with ``non_empty``, as ``validate`` requires of
    the student's message and the reply; never an unpaired surrogate (not text: the tokenizer cannot encode it)."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {type(values).__name__}")
    for i, value in enumerate(values):
        if value is None and allow_none:
            continue
        if not isinstance(value, str):
            kind = "a string or None" if allow_none else "a string"
            raise ValueError(f"{name}[{i}] is {type(value).__name__}, expected {kind}")
        if non_empty and not value.strip():
            raise ValueError(f"{name}[{i}] is empty or whitespace only (validate rejects such records too)")
        surrogate = next((at for at, ch in enumerate(value) if 0xD800 <= ord(ch) <= 0xDFFF), None)
        if surrogate is not None:
            raise ValueError(
                f"{name}[{i}] contains an unpaired surrogate U+{ord(value[surrogate]):04X} at character "
                f"{surrogate + 1}: not valid text (decode your input with errors='replace')"
            )
    return list(values)


def prepare_inputs(
    contexts: Sequence[str], responses: Sequence[str], student_messages: Sequence[str | None] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """Check the three parallel lists and fill missing student messages from the contexts (ValueError on misuse)."""
    contexts = _check_texts("contexts", contexts)
    responses = _check_texts("responses", responses, non_empty=True)
    if not responses:
        raise ValueError("responses is empty: nothing to score")
    if len(contexts) != len(responses):
        raise ValueError(f"contexts has {len(contexts)} items but responses has {len(responses)}; they must match")
    if student_messages is None:
        student_messages = [None] * len(contexts)
    student_messages = _check_texts("student_messages", student_messages, allow_none=True, non_empty=True)
    if len(student_messages) != len(contexts):
        raise ValueError(
            f"student_messages has {len(student_messages)} items but contexts has {len(contexts)}; they must match"
        )
    out_contexts, out_students = [], []
    for i, (context, student) in enumerate(zip(contexts, student_messages, strict=True)):
        if student is None:
            try:
                context, student = split_student_message(context)
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
            if not student:
                raise ValueError(f"item {i}: the context's last 'Student:' turn is empty")
        out_contexts.append(context)
        out_students.append(student)
    return out_contexts, responses, out_students


def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches, longest first: at most ``batch_size`` sequences and at most ``max_batch_tokens``
    padded tokens (batch size x its longest sequence) per batch, always at least one sequence."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= batch_size or (len(current) + 1) * longest > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# ----------------------------------------------------------------------------------------------------------------
# Device, threads and the fast path


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available (``cuda:LOCAL_RANK`` under ``accelerate launch``), else ``mps``, else
    ``cpu``; anything else must be a torch device that exists here (ValueError otherwise, not a crash later)."""
    import torch

    if device != "auto":
        try:
            kind = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device '{device}' is not a torch device ({exc})") from None
        if kind.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device '{device}': no CUDA GPU is available to this process; use --device cpu (or auto)")
        if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
            raise ValueError(f"device '{device}': only {torch.cuda.device_count()} CUDA device(s) here")
        if kind.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device '{device}': MPS is not available here; use --device cpu (or auto)")
        return device
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) if shard()[1] > 1 else 0
        return f"cuda:{local % torch.cuda.device_count()}" if local else "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def available_cpus() -> int:
    """CPUs this process may really use: the affinity mask, capped by a cgroup CPU quota when there is one."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    return max(1, count)


def configure_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads: ``num_threads`` when given, else never more than the CPUs available (an
    oversubscribed pool is the commonest cause of slow CPU inference in containers). Returns the count in use."""
    import torch

    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        torch.set_num_threads(num_threads)
    elif torch.get_num_threads() > available_cpus():
        torch.set_num_threads(available_cpus())
    return torch.get_num_threads()


def quantize_int8(model: Any) -> Any:
    """A copy of ``model`` whose encoder ``nn.Linear`` layers are int8 dynamically quantised (weights int8 per output
    channel, activations per tensor, quantised on the fly). The pooler and the regression heads stay fp32: they are a
    negligible share of the FLOPs, and keeping them exact keeps the scores closer to fp32. Per-channel weights halve
    the error of per-tensor ones at the same speed (measured on all-MiniLM-L6-v2)."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig

    base = model.base_model_prefix
    names = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(base + ".") and ".pooler" not in name
    }
    if not names:
        raise ValueError("fast='int8': the model has no encoder nn.Linear layers to quantise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice in favour of torchao (not installed)
        spec = dict.fromkeys(names, per_channel_dynamic_qconfig)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), spec)


def half_precision(model: Any, dtype: Any) -> Any:
    """The model in ``dtype`` except its final classifier layer, kept fp32: the logits are judge-scale scores
    (around 5), where bf16's 8-bit mantissa would round them to steps of 0.03; in fp32 the head costs nothing."""
    head = classifier_layer(model)
    exact = {name: tensor.detach().float().clone() for name, tensor in head.state_dict().items()}
    model = model.to(dtype)
    head.float().load_state_dict(exact)  # restored, not round-tripped through bf16
    head.register_forward_pre_hook(lambda _module, args: tuple(a.float() for a in args))
    return model


def fast_mode(fast: bool | str | None, device: str) -> str:
    """The precision mode for ``fast``: ``fp32`` when off; ``True`` picks the device's fast path (CPU: ``bf16``
    where the CPU has native bf16 instructions, else ``int8``; GPU: ``fp16``); or ``"int8"`` / ``"bf16"``."""
    if fast is None or fast is False:
        return "fp32"
    if fast is True:
        if device != "cpu":
            return "fp16"
        if cpu_has_native_bf16():
            return "bf16"
        log.info("fast=True: no native bf16 on this CPU, using int8 (faster, but less close to fp32 than bf16)")
        return "int8"
    if fast not in FAST_MODES:
        raise ValueError(f"fast must be True, False or one of {list(FAST_MODES)}, got {fast!r}")
    if fast == "int8" and device != "cpu":
        raise ValueError(f"fast='int8' (dynamic quantisation) runs on CPU only; the device is '{device}'")
    if fast == "bf16" and device == "cpu" and not cpu_has_native_bf16():
        log.warning("fast='bf16': this CPU has no native bf16 instructions; expect it to be slower than fp32")
    return fast


# ----------------------------------------------------------------------------------------------------------------
# The scorer


class RewardModelScorer:
    """Scores tutor replies with a saved reward model on the judge's scale.

    Args:
        path: the model folder written by ``fluent-reward train`` (``models/reward_model_final`` by default).
        device: ``auto`` (CUDA, then MPS, then CPU), or any torch device string.
        batch_size: most sequences per forward pass.
        fast: ``False`` for fp32; ``True`` for the device's fast path (CPU: bf16 where the CPU has native bf16, else
            int8 dynamic quantisation; GPU: fp16); or ``"int8"`` / ``"bf16"`` explicitly.
        max_batch_tokens: most padded tokens (sequences x longest) per forward pass; keeps memory and attention cost
            bounded for long inputs.
        num_threads: torch CPU threads (default: torch's, capped at the CPUs this process may use).
        compile: ``torch.compile`` the model (dynamic shapes, so no recompiles across batch shapes): about 10-20%
            more throughput on CPU from fused bias/GELU/LayerNorm kernels, after a one-off compilation on the first
            call (tens of seconds; cached by torch across processes). Falls back to eager, with a warning, if the
            compilation fails (e.g. no C++ compiler).
        backend: ``"torch"`` (a model folder), or ``"onnx"``: onnxruntime on the CPU, with ``path`` a folder
            written by ``fluent-reward export`` (its ``onnx/``); fp32 only (``fast`` and ``compile`` must be off).
        clip: clip every score to the judge's scale (``scale``, e.g. 1-10; the default). A regression head can
            predict slightly past the scale's ends (on unfamiliar data, well past them); ``clip=False`` returns the
            raw predictions.

    Example::

        scorer = RewardModelScorer("models/reward_model_final", fast=True)
        scorer.score("Tutor: ¿Qué hiciste ayer?", "¡Muy bien! Se dice «fui». ¿Y después?", "Yo ir al cine.")
    """

    def __init__(
        self,
        path: str | Path = DEFAULT_MODEL_DIR,
        device: str = "auto",
        batch_size: int = 32,
        fast: bool | str = False,
        max_batch_tokens: int = 8192,
        num_threads: int | None = None,
        compile: bool = False,
        clip: bool = True,
        backend: str = "torch",
    ) -> None:
        import torch

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.path = Path(path)
        self.backend = backend
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.clip = clip
        self._compiled = None
        self._session = self._reply_session = None
        if backend == "onnx":
            self._init_onnx(device, fast, compile, num_threads)
        else:
            self._init_torch(device, fast, compile, num_threads)
        self._mean = torch.tensor(self.metadata.mean, dtype=torch.float32)
        self._std = torch.tensor(self.metadata.std, dtype=torch.float32)
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        log.info(
            "loaded reward model %s (%s, %d dimensions, device %s, %s%s)",
            self.path,
            self.metadata.backbone,
            len(self.dimensions),
            self.device,
            self.mode
            + (", compiled" if compile else "")
            + (", onnxruntime" if backend == "onnx" else "")
            + (f", n-gram head weight {self.metadata.ngram_weight:g}" if self.metadata.ngram_head else ""),
            f", {self.num_threads} threads" if self.num_threads else "",
        )

    def _init_torch(self, device: str, fast: bool | str, compile: bool, num_threads: int | None) -> None:
        import torch

        self.device = resolve_device(device)
        self.mode = fast_mode(fast, self.device)
        self.num_threads = configure_threads(num_threads) if self.device == "cpu" else None
        model, self.tokenizer, self.metadata = _load_folder(self.path)
        model.eval()
        if self.mode == "int8":
            model = quantize_int8(model)
        elif self.mode in ("bf16", "fp16"):
            model = half_precision(model, torch.bfloat16 if self.mode == "bf16" else torch.float16)
        self.model = model.to(self.device).eval()
        self._compiled = torch.compile(self.model, dynamic=True) if compile else None

    def _init_onnx(self, device: str, fast: bool | str, compile: bool, num_threads: int | None) -> None:
        from fluent_reward.export import load_onnx_folder

        if fast or compile:
            raise ValueError("backend='onnx' runs the exported fp32 graph: fast and compile must be off")
        if device not in ("auto", "cpu"):
            raise ValueError(f"backend='onnx' runs on the CPU (onnxruntime); device '{device}' is not supported")
        self.device, self.mode, self.model = "cpu", "fp32", None
        self.num_threads = configure_threads(num_threads)
        if self.path.exists() and not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: is not a folder; give the onnx/ folder of `fluent-reward export`")
        loaded = load_onnx_folder(self.path)
        self._session, self.tokenizer, self.metadata, self._onnx_inputs, self._reply_session = loaded

    # -- properties --------------------------------------------------------------------------------------------

    @property
    def dimensions(self) -> list[str]:
        """The rubric dimensions the model predicts, in output order."""
        return list(self.metadata.dimensions)

    @property
    def weights(self) -> dict[str, float]:
        """The rubric weights the model was trained with (used by the weighted overall by default)."""
        return {d: float(self.metadata.weights[d]) for d in self.dimensions}

    @property
    def scale(self) -> tuple[int, int]:
        return int(self.metadata.scale["min"]), int(self.metadata.scale["max"])

    # -- scoring -----------------------------------------------------------------------------------------------

    def score(
        self,
        context: str,
        response: str,
        student_message: str | None = None,
        return_dimensions: bool = False,
    ) -> float | Scores:
        """The overall score of one reply (the model's overall head), or its ``Scores`` with ``return_dimensions``.

        ``context`` holds the earlier turns (``Tutor: ...`` / ``Student: ...`` lines, oldest first). Without
        ``student_message`` the context's last turn must be the student's and is used as the message.
        """
        if not isinstance(context, str) or not isinstance(response, str):
            bad = "context" if not isinstance(context, str) else "response"
            raise ValueError(f"{bad} must be a string, got {type(context if bad == 'context' else response).__name__}")
        result = self.score_batch([context], [response], [student_message], return_dimensions=return_dimensions)
        return result[0]

    def score_batch(
        self,
        contexts: Sequence[str],
        responses: Sequence[str],
        student_messages: Sequence[str | None] | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        return_dimensions: bool = False,
        weights: Mapping[str, float] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[float] | list[Scores]:
        """Scores of many replies, in input order.

        Returns the overall head per reply; with ``weights``, the weighted mean of the predicted dimensions with
        those weights instead; with ``return_dimensions``, one ``Scores`` per reply (``weights`` ignored: call
        ``Scores.weighted(weights)``). ``on_batch(n)`` is called after each forward pass of ``n`` replies.
        """
        checked = check_weights(weights, self.dimensions) if weights is not None and not return_dimensions else None
        values = self.predict(contexts, responses, student_messages, batch_size, show_progress, on_batch)
        if return_dimensions:
            return [self._scores(row) for row in values.tolist()]
        if checked is None:
            return [float(v) for v in values[:, 0]]
        return [weighted_mean(self._scores(row).dimensions, checked) for row in values.tolist()]

    def score_dimensions(
        self,
        contexts: Sequence[str],
        responses: Sequence[str],
        student_messages: Sequence[str | None] | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Scores]:
        """One ``Scores`` (overall head + every dimension) per reply, in input order."""
        return self.score_batch(
            contexts, responses, student_messages, batch_size, show_progress, return_dimensions=True, on_batch=on_batch
        )

    def best_of_n(
        self,
        context: str,
        candidates: Sequence[str],
        student_message: str | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> BestOfN:
        """Pick the best of several candidate replies to the same turn (one batched forward pass).

        Ranks by the overall head, or by the weighted overall with ``weights``. Ties go to the earliest candidate.
        """
        if not isinstance(context, str):
            raise ValueError(f"context must be a string, got {type(context).__name__}")
        candidates = _check_texts("candidates", candidates, non_empty=True)
        if not candidates:
            raise ValueError("candidates is empty: best_of_n needs at least one candidate reply")
        n = len(candidates)
        scores = self.score_batch([context] * n, candidates, [student_message] * n, weights=weights)
        best = max(range(n), key=lambda i: (scores[i], -i))
        return BestOfN(index=best, response=candidates[best], score=scores[best], scores=scores)

    def predict(
        self,
        contexts: Sequence[str],
        responses: Sequence[str],
        student_messages: Sequence[str | None] | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Judge-scale predictions, shape ``(n, 1 + n_dims)``: column 0 the overall head, then the dimensions
        (clipped to the scale unless the scorer was made with ``clip=False``)."""
        import numpy as np
        import torch

        batch_size = self.batch_size if batch_size is None else batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        contexts, responses, students = prepare_inputs(contexts, responses, student_messages)
        encoded = encode_batch(
            self.tokenizer,
            contexts,
            students,
            responses,
            self.metadata.max_length,
            keep_first_turns=self.metadata.keep_first_turns,
        )
        lengths = [len(e["input_ids"]) for e in encoded]
        out = np.empty((len(encoded), len(self.metadata.labels)), dtype=np.float32)
        with _progress(show_progress, len(encoded)) as advance, torch.inference_mode():
            for batch in plan_batches(lengths, batch_size, self.max_batch_tokens):
                logits = self._logits(self._collate([encoded[i] for i in batch]))
                out[batch] = (logits * self._std + self._mean).numpy()
                advance(len(batch))
                if on_batch is not None:
                    on_batch(len(batch))
        if self.metadata.ngram_head is not None:
            out = self.metadata.ngram_head.blend(out, responses, self._head_embeddings(responses, batch_size))
        if self.clip:
            np.clip(out, *self.scale, out=out)
        return out

    # -- helpers -----------------------------------------------------------------------------------------------

    def _logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 logits on the CPU, shape (batch, labels)."""
        import torch

        if self._session is not None:
            feed = {name: inputs[name].numpy() for name in self._onnx_inputs}
            return torch.from_numpy(self._session.run(None, feed)[0]).float()
        return self._forward(inputs).logits.float().cpu()

    def _head_embeddings(self, responses: list[str], batch_size: int) -> np.ndarray | None:
        """The reply embeddings the n-gram head reads (None if it reads none): the model's own layers, or the ONNX
        export's reply-embedding graph."""
        if self._reply_session is None:  # torch, or a head without an embedding
            return head_embeddings(self.model, self.tokenizer, self.metadata, responses, batch_size)
        session, names = self._reply_session, self._onnx_inputs

        def pooled(batch: dict[str, torch.Tensor]) -> Any:
            return session.run(None, {name: batch[name].numpy() for name in names})[0]

        return reply_embeddings(pooled, self.tokenizer, responses, self.metadata.max_length, batch_size)

    def _forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        if self._compiled is not None:
            try:
                return self._compiled(**inputs)
            except Exception as exc:  # compilation problems surface on the first call; eager still works
                log.warning("torch.compile failed (%s: %s); running the model uncompiled", type(exc).__name__, exc)
                self._compiled = None
        return self.model(**inputs)

    def _scores(self, row: list[float]) -> Scores:
        return Scores(overall=row[0], dimensions=dict(zip(self.dimensions, row[1:], strict=True)), weights=self.weights)

    def _collate(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        import torch

        longest = max(len(item["input_ids"]) for item in items)
        batch = {}
        for key in items[0]:
            pad = self._pad_id if key == "input_ids" else 0
            tensor = torch.full((len(items), longest), pad, dtype=torch.long)
            for row, item in enumerate(items):
                tensor[row, : len(item[key])] = torch.tensor(item[key], dtype=torch.long)
            batch[key] = tensor.to(self.device)
        return batch

    def __repr__(self) -> str:
        return f"RewardModelScorer(path='{self.path}', device='{self.device}', mode='{self.mode}')"


def _load_folder(path: Path) -> tuple[Any, Any, ModelMetadata]:
    """``load_model_folder``, which verifies the folder: its errors are ModelFolderError (a ValueError and a
    FluentRewardError; ModelFolderNotFound is also a FileNotFoundError), one line naming the faulty file."""
    if path.exists() and not path.is_dir():
        raise FileNotFoundError(f"{path}: is not a folder; give the model folder written by `fluent-reward train`")
    return load_model_folder(path)


@contextlib.contextmanager
def _progress(enabled: bool, total: int | None, description: str = "scoring") -> Iterator[Any]:
    """The project's progress reporter (``progress.progress``) yielding ``advance(n)``; a no-op when disabled."""
    if not enabled:
        yield lambda n=1, info="": None
        return
    with progress(description, total, unit="records") as advance:
        yield advance


# ----------------------------------------------------------------------------------------------------------------
# File scoring (the `fluent-reward score` command)


@dataclass
class ScoreFileReport:
    """What ``score_file`` read, scored and dropped."""

    records_read: int = 0
    records_scored: int = 0
    problems: list[Any] = field(default_factory=list)
    problems_total: int = 0


def check_score_paths(source: Path, output: Path) -> None:
    """Fail fast, before a model is loaded: the input must be a readable, non-empty file; the output not a folder."""
    from fluent_reward.data import _check_path

    _check_path(Path(source))
    if Path(output).is_dir():
        raise FluentRewardError(f"{output}: is a directory; give the path of the JSONL file to write")


def shard() -> tuple[int, int]:
    """``(rank, world size)`` of this process under ``accelerate launch`` / torchrun; ``(0, 1)`` otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


CHUNK_SIZE = 1024  # records read and scored at a time by score_file (memory stays bounded on any file size)


def score_file(
    scorer: RewardModelScorer,
    source: Path,
    output: Path,
    cfg: ValidateConfig,
    chunk_size: int = CHUNK_SIZE,
    show_progress: bool = False,
    with_input: bool = False,
    weights: Mapping[str, float] | None = None,
    max_problems_kept: int = 1000,
) -> ScoreFileReport:
    """Score every record of a JSON/JSONL file of input records into JSONL, streaming in chunks.

    Records are checked as ``validate`` checks them; invalid ones are reported (``FILE: record N (id=...): field
    'X': ...``) and, with ``cfg.on_error == "fail"``, nothing is written; with ``drop`` they are skipped. Each output
    row: ``id``, ``group_id``, ``overall`` (head), ``weighted_overall`` (with ``weights`` or the model's), ``scores``
    (per dimension), plus the normalised record's fields with ``with_input``. Memory stays constant for JSONL input
    (a JSON array is parsed whole). The progress bar advances per scored batch; the run ends with a summary line
    (records, time, records/s).

    Under ``accelerate launch`` (``WORLD_SIZE`` > 1) each process scores every ``WORLD_SIZE``-th valid record
    (round-robin, so the shares are equal) into a part file beside ``output``; process 0 then merges the parts into
    ``output`` in input order.
    """
    from fluent_reward.data import validate_file

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    checked = check_weights(weights, scorer.dimensions) if weights is not None else None
    rank, world = shard()
    rows, checks = validate_file(source, cfg)  # the validator's own stream: same checks, same messages
    report = ScoreFileReport()
    total = _count_lines(source) if _looks_like_jsonl(source) else None
    target = output if world == 1 else _part_path(output, rank, world)
    started = time.perf_counter()
    try:
        with (
            atomic_open(target) as handle,
            _progress(show_progress and rank == 0, _share(total, rank, world), f"scoring {source.name}") as advance,
        ):
            _score_stream(scorer, source, rows, checks, cfg, handle, report, chunk_size, advance, with_input, checked)
    finally:
        report.records_read = checks.records_read
        report.problems = checks.problems[:max_problems_kept]
        report.problems_total = len(checks.problems)
    if world > 1:
        _merge_parts(output, world, rank)
    _log_summary(report, source, output, time.perf_counter() - started, cfg, rank, world)
    return report


def _score_stream(
    scorer: RewardModelScorer,
    source: Path,
    rows: Iterator[dict[str, Any]],
    checks: Any,
    cfg: ValidateConfig,
    handle: Any,
    report: ScoreFileReport,
    chunk_size: int,
    advance: Callable[[int], None],
    with_input: bool,
    weights: dict[str, float] | None,
) -> None:
    """Score this process's share of the valid records in chunks, writing rows to ``handle``; raise (discarding
    the output) when a problem makes the run fail or nothing was scored."""
    from fluent_reward.data import problem_summary

    rank, world = shard()

    def failing() -> bool:
        # With on_error=fail the output will be discarded: keep reading (to report every problem) only.
        return cfg.on_error == "fail" and bool(checks.problems)

    buffer: list[dict[str, Any]] = []
    valid = 0
    for row in rows:
        valid += 1
        if failing() or (valid - 1) % world != rank:
            continue
        buffer.append(row)
        if len(buffer) >= chunk_size:
            _score_chunk(scorer, buffer, handle, advance, with_input, weights)
            report.records_scored += len(buffer)
            buffer = []
    if buffer and not failing():
        _score_chunk(scorer, buffer, handle, advance, with_input, weights)
        report.records_scored += len(buffer)
    if failing() or valid == 0:
        raise FluentRewardError(problem_summary(source, checks, cfg))


def _score_chunk(
    scorer: RewardModelScorer,
    batch: list[dict[str, Any]],
    handle: Any,
    advance: Callable[[int], None],
    with_input: bool,
    weights: dict[str, float] | None,
) -> None:
    scores = scorer.score_dimensions(
        [r["context"] for r in batch],
        [r["tutor_response"] for r in batch],
        [r["student_message"] for r in batch],
        on_batch=advance,
    )
    for row, result in zip(batch, scores, strict=True):
        values = result.as_dict(weights)
        out = {
            "id": row["id"],
            "group_id": row["group_id"],
            "overall": round(values["overall"], 4),
            "weighted_overall": round(values["weighted_overall"], 4),
            "scores": {k: round(v, 4) for k, v in values["scores"].items()},
        }
        if with_input:
            out["input"] = row
        handle.write(json.dumps(out, ensure_ascii=False) + "\n")


def _log_summary(
    report: ScoreFileReport, source: Path, output: Path, seconds: float, cfg: ValidateConfig, rank: int, world: int
) -> None:
    for problem in report.problems[: cfg.max_problems_shown] if rank == 0 else []:
        log.warning("%s (skipped)", problem)
    log.info(
        "scored %d of %d records of %s -> %s in %.1f s (%.1f records/s)%s%s",
        report.records_scored,
        report.records_read,
        source,
        output,
        seconds,
        report.records_scored / max(seconds, 1e-9),
        f" ({report.problems_total} problems, records skipped)" if report.problems_total else "",
        f" [process {rank} of {world}]" if world > 1 else "",
    )


def _share(total: int | None, rank: int, world: int) -> int | None:
    """This process's share of ``total`` lines, for its progress bar (approximate when records are dropped)."""
    return None if total is None else len(range(rank, total, world))


def _part_path(output: Path, rank: int, world: int) -> Path:
    return Path(output).with_name(f".{Path(output).name}.part{rank}-of-{world}")


def _merge_parts(output: Path, world: int, rank: int) -> None:
    """Process 0 interleaves the parts (record i is line i // world of part i % world) into ``output``, atomically,
    once every process has written its part; the others wait for the merge."""
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()
    if rank == 0:
        parts = [open(_part_path(output, r, world), encoding="utf-8") for r in range(world)]  # noqa: SIM115
        try:
            with atomic_open(output) as handle:
                for lines in itertools.zip_longest(*parts):
                    handle.writelines(line for line in lines if line is not None)
        finally:
            for part in parts:
                part.close()
        for r in range(world):
            _part_path(output, r, world).unlink(missing_ok=True)
    state.wait_for_everyone()


def _looks_like_jsonl(path: Path) -> bool:
    from fluent_reward.data import _sniff_format

    with contextlib.suppress(OSError):
        return path.is_file() and _sniff_format(path) == "jsonl"
    return False


def _count_lines(path: Path) -> int:
    """Lines of a file, read in blocks (constant memory): the progress bar's total for JSONL."""
    count = 0
    with open(path, "rb") as handle:
        previous = b"\n"
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
            previous = block[-1:]
    return count + (previous != b"\n")
