"""The train stage, in named steps (in the spirit of nanoGPT's train.py):

    run_train  load the judged records -> make the split (written to ``data.splits``) -> fit -> save -> metrics
    fit        build the model -> build the data -> plan every epoch -> (one epoch -> validate) x epochs
               -> restore the best epoch's weights; writes nothing to disk (cross-validation calls it per fold)

The model is ``AutoModelForSequenceClassification(num_labels=1 + n_dims)`` on standardised targets, trained with a
pointwise loss plus a Bradley–Terry term between replies of the same group, early-stopping on the validation
Spearman of the overall score. Work that does not change is done once: with the embeddings and the lowest layers
frozen, their output is computed once per example (``fluent_reward.frozen_prefix``) and each epoch runs only the
trainable layers; batches hold whole groups of similar lengths (little padding); bf16 autocast where the CPU or GPU
has native bf16 (``train.mixed_precision: auto``).

The same code runs on one CPU and, unchanged, under ``accelerate launch`` / ``torchrun`` on several processes: every
process builds the same epoch plans of whole-group batches and takes every ``world_size``-th batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fluent_reward.config import Params, Rubric, TrainConfig
from fluent_reward.data import load_judged_records
from fluent_reward.errors import FluentRewardError
from fluent_reward.io import stable_hash, write_json
from fluent_reward.model import (
    OVERALL,
    collate,
    cpu_has_native_bf16,
    encode_records,
    model_reply_embeddings,
    pad_id,
    predict_in_batches,
    quiet_transformers,
    resolve_backbone,
    target_matrix,
)
from fluent_reward.model_folder import ModelMetadata, save_model_folder
from fluent_reward.ngram import NgramHead, fit_ngram_head
from fluent_reward.progress import format_duration
from fluent_reward.progress import progress as report_progress
from fluent_reward.splits import (
    SPLITS,
    group_languages,
    make_splits,
    split_document,
    split_of,
    training_data_sha256,
)
from fluent_reward.stats import spearman

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LOG_FILE = "train.jsonl"
TAIL_TOLERANCE = 1e-3  # largest |logit difference| allowed between the whole model and prefix + tail (fp32)


# ----------------------------------------------------------------------------------------------------------------
# Targets


def fit_normalisation(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-label mean and standard deviation (a constant label gets std 1, so standardising never divides by 0)."""
    mean = targets.mean(axis=0)
    std = targets.std(axis=0)
    return mean, np.where(std > 1e-8, std, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Batches: whole groups, similar lengths together


def group_batches(
    group_indices: Sequence[Sequence[int]],
    lengths: Sequence[int],
    batch_size: int,
    rng: random.Random,
    bucket_batches: int = 8,
) -> list[list[int]]:
    """One epoch of batches of example indices that keep every group whole (so the pairwise loss sees its pairs).

    Groups are shuffled, then taken ``bucket_batches`` batches' worth at a time and sorted by their longest example,
    so a batch holds groups of similar length and dynamic padding wastes little; the batch order is shuffled again.
    Groups are packed greedily up to ``batch_size`` examples; a group larger than ``batch_size`` is cut into pieces.
    """
    pieces: list[list[int]] = []
    for members in group_indices:
        members = list(members)
        pieces += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(pieces)
    per_bucket = max(1, bucket_batches * batch_size)
    batches: list[list[int]] = []
    start = 0
    while start < len(pieces):
        bucket, size = [], 0
        while start < len(pieces) and (size < per_bucket or not bucket):
            bucket.append(pieces[start])
            size += len(pieces[start])
            start += 1
        bucket.sort(key=lambda piece: max(lengths[i] for i in piece), reverse=True)
        current: list[int] = []
        for piece in bucket:
            if current and len(current) + len(piece) > batch_size:
                batches.append(current)
                current = []
            current = current + piece
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches


def shard_batches(batches: Sequence[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This process's batches: every ``world_size``-th one, the plan padded by repeating its first batches so that
    every process runs the same number of steps (as accelerate's ``even_batches``)."""
    plan = list(batches)
    if world_size > 1 and plan:
        short = -len(plan) % world_size
        plan += [plan[i % len(plan)] for i in range(short)]
    return plan[rank::world_size]


def plan_epochs(
    group_members: Sequence[Sequence[int]], lengths: Sequence[int], cfg: TrainConfig, rank: int, world: int
) -> list[list[list[int]]]:
    """Every epoch's batches for this process, built up front (each epoch its own seeded shuffle), so the learning
    rate schedule is sized from the steps that will really run: ``cfg.epochs`` epochs, or with ``cfg.target_steps``
    the fewest of them whose optimizer steps reach it."""
    plans = [
        shard_batches(
            group_batches(
                group_members, lengths, cfg.batch_size, random.Random(f"{cfg.seed}-{epoch}"), cfg.bucket_batches
            ),
            rank,
            world,
        )
        for epoch in range(1, cfg.epochs + 1)
    ]
    if cfg.target_steps is None:
        return plans
    # every process has the same number of batches per epoch (shard_batches pads), so they all cut at the same epoch
    for n in range(1, len(plans) + 1):
        if optimizer_steps(plans[:n], cfg.grad_accum_steps) >= cfg.target_steps:
            return plans[:n]
    return plans


def optimizer_steps(plans: Sequence[Sequence[list[int]]], grad_accum_steps: int) -> int:
    """Optimizer steps the plans take: each epoch's last window may be shorter than ``grad_accum_steps``."""
    return sum(math.ceil(len(plan) / grad_accum_steps) for plan in plans)


# ----------------------------------------------------------------------------------------------------------------
# Losses


def pointwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_delta: float) -> torch.Tensor:
    """Mean MSE or Huber over every example and label (standardised units)."""
    import torch.nn.functional as F

    if kind == "mse":
        return F.mse_loss(pred, target)
    return F.huber_loss(pred, target, delta=huber_delta)


def pairwise_loss(
    scores: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, margin_scale: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Bradley–Terry loss between replies of the same group: mean of ``-log σ(s_i - s_j - m_ij)`` over every pair
    with ``t_i > t_j``, where ``m_ij = margin_scale * (t_i - t_j)`` (targets in standard units).

    Returns the loss (0 with a graph when the batch has no ordered pair) and the number of pairs.
    """
    import torch.nn.functional as F

    gap = targets[:, None] - targets[None, :]
    mask = (groups[:, None] == groups[None, :]) & (gap > 0)
    n_pairs = int(mask.sum())
    if n_pairs == 0:
        return scores.sum() * 0.0, 0
    diff = (scores[:, None] - scores[None, :])[mask]
    return -F.logsigmoid(diff - margin_scale * gap[mask]).mean(), n_pairs


# ----------------------------------------------------------------------------------------------------------------
# Model


def load_backbone_model(
    backbone: str, labels: Sequence[str], backbones_dir: Path | None = None, attention_dropout: float | None = None
) -> tuple[Any, Any, list[str]]:
    """(model, tokenizer, names of newly initialised parameters) for a regression model with one logit per label;
    ``attention_dropout``: the dropout on its attention probabilities (None: the backbone's own).

    Safetensors weights only, never remote code. A local folder, a packaged or converted backbone (converted ones
    live in ``backbones_dir``) or a hub id (needs a hub).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_backbone(backbone, backbones_dir)
    try:
        with quiet_transformers():  # its load report lists the new head as "missing": expected, not news
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            overrides = attention_dropout_override(path, attention_dropout)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
                **overrides,
                num_labels=len(labels),
                problem_type="regression",
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                use_safetensors=True,
                trust_remote_code=False,
                output_loading_info=True,
            )
    except (OSError, ValueError) as exc:
        raise FluentRewardError(
            f"train.backbone '{backbone}' ({path}): cannot load it as a safetensors model + tokenizer: {exc}"
        ) from None
    return model, tokenizer, sorted(info.get("missing_keys", []))


# The config keys that set attention-probability dropout, by architecture family (BERT, XLM-R, MPNet, DeBERTa...;
# DistilBERT and others)
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def attention_dropout_override(path: str, attention_dropout: float | None) -> dict[str, float]:
    """``from_pretrained`` keyword setting the backbone's attention dropout to ``attention_dropout`` (None: none)."""
    from transformers import AutoConfig

    if attention_dropout is None:
        return {}
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    for key in ATTENTION_DROPOUT_KEYS:
        if hasattr(config, key):
            return {key: attention_dropout}
    raise FluentRewardError(
        f"train.attention_dropout={attention_dropout}: backbone {path} ({config.model_type}) has no attention "
        f"dropout setting ({' or '.join(ATTENTION_DROPOUT_KEYS)}); set train.attention_dropout to null"
    )


def freeze(model: Any, embeddings: bool, layers: int) -> list[Any]:
    """Freeze the embeddings and/or the lowest ``layers`` transformer layers; return the frozen modules."""
    from fluent_reward.frozen_prefix import frozen_modules

    modules = frozen_modules(model, embeddings, layers)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)
    return modules


def param_groups(model: Any, new_params: Sequence[str], cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: encoder vs new head (their own learning rates), weight decay off for biases and LayerNorms."""
    new = set(new_params)
    groups: dict[tuple[bool, bool], list[Any]] = defaultdict(list)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or p.ndim == 1
        groups[(name in new, no_decay)].append(p)
    return [
        {
            "params": ps,
            "lr": cfg.head_lr if is_head else cfg.lr,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "name": ("head" if is_head else "encoder") + ("_no_decay" if no_decay else ""),
        }
        for (is_head, no_decay), ps in sorted(groups.items())
    ]


# ----------------------------------------------------------------------------------------------------------------
# Runtime: threads, precision, processes


def choose_threads(requested: int) -> int:
    """``requested`` if set; else what a launcher set (``OMP_NUM_THREADS``); else the CPUs this process may use,
    shared among the processes of this machine (``LOCAL_WORLD_SIZE``)."""
    import torch

    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch threads; a library call leaves the process as it found it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_precision(requested: str) -> str:
    """The precision this machine will train in: ``auto`` is bf16 where it is native (CUDA with bf16, or a CPU with
    AVX512-BF16/AMX), else fp32; an explicit ``bf16`` without native support falls back to fp32, with a log line."""
    import torch

    if requested in ("no", "fp16"):
        if requested == "fp16" and not torch.cuda.is_available():
            raise FluentRewardError("train.mixed_precision=fp16 needs a CUDA GPU; use 'no', 'bf16' or 'auto' on CPU")
        return requested
    if torch.cuda.is_available():
        native, where = torch.cuda.is_bf16_supported(), "this GPU"
    else:
        native, where = cpu_has_native_bf16(), "this CPU"
    if native:
        return "bf16"
    log_ = log.warning if requested == "bf16" else log.info
    log_("train.mixed_precision=%s: %s has no native bf16; training in fp32", requested, where)
    return "no"


def make_accelerator(precision: str) -> Any:
    """accelerate's Accelerator for this run. In a single process, a precision other than the process-wide state's
    (an earlier ``fit`` in the same process, e.g. a benchmark) resets that state instead of failing."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state()
    # accelerate picks gloo on CPU-only machines only when asked for the CPU: several processes with no GPU.
    cpu = world > 1 and not torch.accelerator.is_available()
    return Accelerator(mixed_precision=precision, cpu=cpu)


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class TrainData:
    """The train and validation examples, tokenised, with standardised targets (the test split is never here)."""

    records: dict[str, list[dict[str, Any]]]
    encoded: dict[str, list[dict[str, list[int]]]]
    targets: dict[str, np.ndarray]  # standard units, (n, 1 + n_dims)
    mean: np.ndarray
    std: np.ndarray
    group_members: list[list[int]]  # train example indices per train group
    group_number: np.ndarray  # per train example: its group's number (for the pairwise loss)
    truncation: dict[str, Any]  # per split: how many inputs were cut to max_length, and by how much

    def lengths(self, split: str) -> list[int]:
        return [len(e["input_ids"]) for e in self.encoded[split]]


def build_data(
    records: Sequence[dict[str, Any]], splits: dict[str, list[str]], rubric: Rubric, tokenizer: Any, cfg: TrainConfig
) -> TrainData:
    """Select the train and validation records (by group), standardise their targets with the train split's
    statistics, tokenise them, and index the train groups."""
    where = {gid: name for name in ("train", "validation") for gid in splits[name]}
    chosen = {name: [r for r in records if where.get(r["group_id"]) == name] for name in ("train", "validation")}
    for name, rows in chosen.items():
        if not rows and (name == "train" or splits[name]):  # no validation split at all is allowed
            raise FluentRewardError(f"the {name} split has no records (groups: {len(splits[name])})")
    labels = 1 + len(rubric.names)  # overall first; the shape holds for an empty validation split too
    raw = {name: target_matrix(rows, rubric.names).reshape(len(rows), labels) for name, rows in chosen.items()}
    mean, std = fit_normalisation(raw["train"])
    group_ids = sorted({r["group_id"] for r in chosen["train"]})
    number = {g: i for i, g in enumerate(group_ids)}
    members: list[list[int]] = [[] for _ in group_ids]
    for i, r in enumerate(chosen["train"]):
        members[number[r["group_id"]]].append(i)
    encoded, truncation = {}, {}
    for name, rows in chosen.items():
        encoded[name], stats = encode_records(tokenizer, rows, cfg.max_length, cfg.keep_first_turns)
        truncation.update({f"{name}.{k}": v for k, v in stats.summary().items()})
    log.info(
        "inputs over max_length=%d: %d of %d training inputs cut (mean %.0f tokens dropped; keep_first_turns=%d)",
        cfg.max_length,
        truncation["train.truncated_examples"],
        len(chosen["train"]),
        truncation["train.truncated_mean_dropped_tokens"],
        cfg.keep_first_turns,
    )
    return TrainData(
        records=chosen,
        encoded=encoded,
        truncation=truncation,
        targets={name: (t - mean) / std for name, t in raw.items()},
        mean=mean,
        std=std,
        group_members=members,
        group_number=np.array([number[r["group_id"]] for r in chosen["train"]]),
    )


# ----------------------------------------------------------------------------------------------------------------
# What each step feeds the trainable module: token ids, or the cached output of the frozen prefix


@dataclass
class TokenInputs:
    """Batches of token ids for ``FullForward`` (the whole model runs every step)."""

    encoded: dict[str, list[dict[str, list[int]]]]
    pad: int
    description: str = "whole model every step"

    def batch(self, split: str, indices: Sequence[int], device: Any) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in collate([self.encoded[split][i] for i in indices], self.pad).items()}

    def close(self) -> None:
        pass


@dataclass
class CachedInputs:
    """Batches of cached frozen-prefix outputs for ``TailForward`` (train examples first, then validation)."""

    cache: Any  # frozen_prefix.FeatureCache
    offset: dict[str, int]
    description: str = ""

    def batch(self, split: str, indices: Sequence[int], device: Any) -> dict[str, torch.Tensor]:
        return self.cache.batch([self.offset[split] + i for i in indices], device)

    def close(self) -> None:
        self.cache.close()


def build_trainable(model: Any, data: TrainData, cfg: TrainConfig, frozen: list[Any], pad: int) -> tuple[Any, Any]:
    """(module to train, its inputs): ``TailForward`` on a frozen-prefix cache when the embeddings are frozen, the
    cache is on and the architecture is known and checked to agree; else ``FullForward`` on token ids."""
    from fluent_reward.frozen_prefix import (
        CACHE_DTYPES,
        FullForward,
        TailForward,
        build_cache,
        supports_tail,
        tail_agreement,
    )

    full = (FullForward(model, frozen), TokenInputs(data.encoded, pad))
    if not (cfg.frozen_cache and cfg.freeze_embeddings):
        return full
    if not supports_tail(model):
        log.info(
            "frozen-prefix cache: %s is not a BERT-style classifier; running the whole model", type(model).__name__
        )
        return full
    diff = tail_agreement(model, cfg.freeze_layers, data.encoded["train"][:4], pad)
    if diff > TAIL_TOLERANCE:
        log.warning("frozen-prefix cache: prefix + tail differ from the model by %.2g; running the whole model", diff)
        return full
    started = time.perf_counter()
    everything = data.encoded["train"] + data.encoded["validation"]
    cache = build_cache(
        model,
        cfg.freeze_layers,
        everything,
        pad,
        2 * cfg.batch_size,
        CACHE_DTYPES[cfg.frozen_cache_dtype],
        cfg.frozen_cache_max_mb * 2**20,
    )
    where = f"on disk ({cache.path})" if cache.on_disk else "in memory"
    description = (
        f"embeddings + {cfg.freeze_layers} layer(s) run once: {len(everything)} examples, "
        f"{cache.nbytes / 2**20:.0f} MB {cfg.frozen_cache_dtype} {where}, {time.perf_counter() - started:.1f} s"
    )
    log.info("frozen-prefix cache: %s", description)
    offset = {"train": 0, "validation": len(data.encoded["train"])}
    return TailForward(model, cfg.freeze_layers, frozen), CachedInputs(cache, offset, description)


# ----------------------------------------------------------------------------------------------------------------
# The loop: one epoch, one optimizer step, validation


@dataclass
class Loop:
    """Everything the epochs share (built by ``start_loop``), and the counters they advance."""

    cfg: TrainConfig
    data: TrainData
    accelerator: Any
    module: Any  # the prepared (maybe DDP-wrapped) FullForward / TailForward
    inputs: Any  # TokenInputs / CachedInputs
    optimizer: Any
    scheduler: Any
    plans: list[list[list[int]]]  # every epoch's batches for this process
    total_steps: int
    write: Any = None  # write(row): the step log
    advance: Any = None  # advance(n, info): the progress report
    step: int = 0
    examples: int = 0
    tokens_useful: int = 0
    tokens_computed: int = 0
    train_time: float = 0.0
    seen: list[set[str]] = field(default_factory=list)


@contextlib.contextmanager
def step_log(path: Path | None) -> Iterator[Any]:
    """Yields ``write(row)``: one JSON line per row, line-buffered (a crashed run keeps its log); no file: no-op."""
    if path is None:
        yield lambda row: None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", buffering=1) as handle:
        yield lambda row: handle.write(json.dumps(row, sort_keys=True) + "\n")


def train_epoch(loop: Loop, epoch: int, plan: Sequence[list[int]]) -> None:
    """One pass over this process's batches; an optimizer step every ``grad_accum_steps`` micro-batches."""
    import torch

    cfg, data, acc = loop.cfg, loop.data, loop.accelerator
    started = time.perf_counter()
    loop.seen.append(set())
    loop.module.train()
    window: dict[str, float] = defaultdict(float)
    for i, batch in enumerate(plan):
        window_start = i - i % cfg.grad_accum_steps
        window_size = min(cfg.grad_accum_steps, len(plan) - window_start)
        sync = i - window_start == window_size - 1
        inputs = loop.inputs.batch("train", batch, acc.device)
        y = torch.tensor(data.targets["train"][batch], dtype=torch.float32, device=acc.device)
        g = torch.tensor(data.group_number[batch], device=acc.device)
        with contextlib.nullcontext() if sync else acc.no_sync(loop.module), acc.autocast():
            logits = loop.module(**inputs).float()
            point = pointwise_loss(logits, y, cfg.loss, cfg.huber_delta)
            pair, n_pairs = pairwise_loss(logits[:, 0], y[:, 0], g, cfg.pairwise_margin_scale)
            loss = point + cfg.pairwise_weight * pair
        acc.backward(loss / window_size)
        loop.seen[-1].update(data.records["train"][j]["id"] for j in batch)
        loop.examples += len(batch)
        loop.tokens_useful += int(inputs["attention_mask"].sum())
        loop.tokens_computed += inputs["attention_mask"].numel()
        for key, value in (("loss", loss.item()), ("pointwise", point.item()), ("pairwise", pair.item())):
            window[key] += value / window_size
        window["pairs"] += n_pairs
        window["examples"] += len(batch)
        if sync:
            optimizer_step(loop, epoch, window, loop.train_time + time.perf_counter() - started)
            window = defaultdict(float)
    loop.train_time += time.perf_counter() - started


def optimizer_step(loop: Loop, epoch: int, window: dict[str, float], elapsed: float) -> None:
    """Clip, step, schedule, zero the gradients; log the step and advance the progress report."""
    if loop.cfg.max_grad_norm > 0:
        loop.accelerator.clip_grad_norm_(loop.module.parameters(), loop.cfg.max_grad_norm)
    loop.optimizer.step()
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.step += 1
    world = loop.accelerator.num_processes
    rate = loop.examples * world / max(elapsed, 1e-9)
    loop.write(
        {
            "event": "step",
            "epoch": epoch,
            "step": loop.step,
            "loss": round(window["loss"], 6),
            "pointwise": round(window["pointwise"], 6),
            "pairwise": round(window["pairwise"], 6),
            "pairs": int(window["pairs"]),
            "examples": int(window["examples"]) * world,
            "lr": {g["name"]: g["lr"] for g in loop.optimizer.param_groups if "no_decay" not in g["name"]},
            "examples_per_s": round(rate, 2),
            "elapsed_s": round(elapsed, 2),
        }
    )
    loop.advance(1, f"epoch {epoch} loss {window['loss']:.3f} {rate:.1f} ex/s")


def validate(loop: Loop) -> tuple[float, np.ndarray]:
    """Validation Spearman of the overall output (every process computes it; rank 0's value decides, so no process
    diverges) and the predictions, in standard units."""
    from accelerate.utils import broadcast_object_list

    module = loop.accelerator.unwrap_model(loop.module)
    module.eval()
    device, target = loop.accelerator.device, loop.data.targets["validation"]

    def forward(idx: list[int]) -> torch.Tensor:
        with loop.accelerator.autocast():
            return module(**loop.inputs.batch("validation", idx, device))

    try:
        pred = predict_in_batches(forward, loop.data.lengths("validation"), 2 * loop.cfg.batch_size, target.shape[1])
    finally:
        module.train()
    value = [spearman(target[:, 0], pred[:, 0], undefined=-1.0)]  # undefined never wins early stopping
    broadcast_object_list(value, from_process=0)
    return value[0], pred


def run_epochs(loop: Loop) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train epoch after epoch, validate after each, keep the best epoch's trainable weights, stop early; without a
    validation split, run every planned epoch and keep the last.

    Returns (history: one row per validation; best: ``spearman`` (None without validation), ``epoch``, ``state``)."""
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"spearman": -math.inf, "epoch": 0, "state": None}
    model = loop.accelerator.unwrap_model(loop.module).model
    bad_epochs = 0
    for epoch, plan in enumerate(loop.plans, start=1):
        train_epoch(loop, epoch, plan)
        if not loop.data.records["validation"]:
            best.update(spearman=None, epoch=epoch)  # the weights in the model are the last epoch's
            log.info("epoch %d/%d done (no validation split: the last epoch is kept)", epoch, len(loop.plans))
            continue
        value, pred = validate(loop)
        improved = value > best["spearman"]
        if improved:  # frozen tensors never change: only the trainable ones are kept
            state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
            best.update(spearman=value, epoch=epoch, state=state)
        bad_epochs = 0 if improved else bad_epochs + 1
        rmse = float(np.sqrt(np.mean((pred - loop.data.targets["validation"]) ** 2)))
        row = {
            "event": "validation",
            "epoch": epoch,
            "step": loop.step,
            "validation_spearman": round(value, 6),
            "validation_rmse_std_units": round(rmse, 6),
            "best": improved,
            "elapsed_s": round(loop.train_time, 2),
        }
        history.append(row)
        loop.write(row)
        left = format_duration(loop.train_time / epoch * (len(loop.plans) - epoch))
        mark = " (best)" if improved else ""
        log.info("epoch %d/%d: validation Spearman %.4f%s; at most %s to go", epoch, len(loop.plans), value, mark, left)
        if bad_epochs >= loop.cfg.early_stopping_patience:
            log.info("early stop: no better validation Spearman for %d epoch(s)", bad_epochs)
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"], strict=False)
    return history, best


def start_loop(
    accelerator: Any, cfg: TrainConfig, data: TrainData, module: Any, inputs: Any, new_params: list[str]
) -> Loop:
    """Plan every epoch, then the optimizer, the schedule (linear warm-up, then linear decay to 0 over exactly the
    planned steps) and accelerate's wrapping; log the plan."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    world, rank = accelerator.num_processes, accelerator.process_index
    plans = plan_epochs(data.group_members, data.lengths("train"), cfg, rank, world)
    steps = max(1, optimizer_steps(plans, cfg.grad_accum_steps))
    optimizer = torch.optim.AdamW(param_groups(module.model, new_params, cfg))
    module, optimizer = accelerator.prepare(module, optimizer)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * steps), steps)
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    log.info(
        "train %s: %d replies in %d groups (validation %d); %.1fM trainable parameters; %d epoch(s), %d optimizer "
        "steps planned; %s; precision %s, %d thread(s), %d process(es)",
        cfg.backbone,
        len(data.records["train"]),
        len(data.group_members),
        len(data.records["validation"]),
        n_trainable / 1e6,
        len(plans),
        steps,
        inputs.description,
        accelerator.mixed_precision,
        torch.get_num_threads(),
        world,
    )
    return Loop(cfg, data, accelerator, module, inputs, optimizer, scheduler, plans, steps)


@dataclass
class FittedModel:
    """A trained model (best epoch's weights, unwrapped, on this process's device) and what its training did."""

    model: Any
    tokenizer: Any
    metadata: ModelMetadata
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seen_ids: list[set[str]] = field(default_factory=list)  # per epoch: ids of the examples this process trained on


def fit(
    params: Params,
    records: list[dict],
    splits: dict[str, list[str]],
    progress: bool = True,
    *,
    log_path: Path | None = None,
) -> FittedModel:
    """Train on the ``splits["train"]`` groups, early-stop on the ``splits["validation"]`` groups (an empty
    validation split: every planned epoch runs and the last is kept).

    Args:
        params: reads ``train`` and ``rubric``; nothing under ``data`` (no file is read or written; past
            ``train.frozen_cache_max_mb`` the frozen-layer cache is a temporary file, removed before returning).
        records: judged records (``data.load_judged_records``); records of other groups (test) are ignored.
        splits: ``{"train": [group ids], "validation": [group ids], ...}``.
        progress: draw a progress bar on a terminal (main process); elsewhere progress is logged every ~30 s.
        log_path: where the main process writes one JSON line per optimizer step and per validation (optional).

    Returns:
        The model with its best epoch's weights, its tokenizer, its metadata (without the data and split hashes,
        which only the caller knows; with the n-gram head fit on the training replies attached when
        ``train.ngram_weight`` > 0), the training metrics and the validation history.
    """
    from accelerate.utils import set_seed

    cfg, rubric = params.train, params.rubric
    with torch_threads(choose_threads(cfg.num_threads)):
        started = time.perf_counter()
        accelerator = make_accelerator(resolve_precision(cfg.mixed_precision))
        set_seed(cfg.seed)
        model, tokenizer, new_params = load_backbone_model(
            cfg.backbone, [OVERALL, *rubric.names], params.data.backbones, cfg.attention_dropout
        )
        frozen = freeze(model, cfg.freeze_embeddings, cfg.freeze_layers)
        model.to(accelerator.device)
        data = build_data(records, splits, rubric, tokenizer, cfg)
        module, inputs = build_trainable(model, data, cfg, frozen, pad_id(tokenizer))
        try:
            loop = start_loop(accelerator, cfg, data, module, inputs, new_params)
            main = accelerator.is_main_process
            with (
                step_log(log_path if main else None) as write,
                report_progress("train", loop.total_steps, bar=progress and main) as advance,
            ):
                loop.write, loop.advance = write, advance
                history, best = run_epochs(loop)
        finally:
            inputs.close()
        model = accelerator.unwrap_model(loop.module).model
        head = fit_ngram_head_on(data, cfg, rubric, model, tokenizer)
        metrics = fit_metrics(loop, best, time.perf_counter() - started)
    metrics["ngram_features"] = len(head.vocabulary) + head.embedding_size if head is not None else 0
    meta = fit_metadata(cfg, rubric, data, best).with_ngram_head(head)
    return FittedModel(model, tokenizer, meta, metrics, history, loop.seen)


def fit_ngram_head_on(
    data: TrainData, cfg: TrainConfig, rubric: Rubric, model: Any, tokenizer: Any
) -> NgramHead | None:
    """The n-gram head fit on the training replies and their judge-scale targets (None when ``ngram_weight`` is 0);
    with ``ngram_embedding_layer``, on the replies' embeddings from that (frozen) layer of ``model`` too."""
    if cfg.ngram_weight == 0:
        return None
    replies = [r["tutor_response"] for r in data.records["train"]]
    layer = cfg.ngram_embedding_layer
    embeddings = None
    if layer is not None:
        embeddings = model_reply_embeddings(model, tokenizer, replies, layer, cfg.max_length, 2 * cfg.batch_size)
    targets = target_matrix(data.records["train"], rubric.names)
    return fit_ngram_head(replies, targets, cfg.ngram_weight, embeddings, layer)


def rounded(value: float | None, digits: int) -> float | None:
    """``round``, passing None (no validation split: no validation Spearman) through."""
    return None if value is None else round(value, digits)


def fit_metadata(cfg: TrainConfig, rubric: Rubric, data: TrainData, best: dict[str, Any]) -> ModelMetadata:
    """The model folder's metadata; the data and split hashes are the caller's to add (``dataclasses.replace``)."""
    return ModelMetadata(
        dimensions=rubric.names,
        weights=dict(rubric.weights),
        scale=rubric.scale.model_dump(),
        mean=[float(x) for x in data.mean],
        std=[float(x) for x in data.std],
        max_length=cfg.max_length,
        keep_first_turns=cfg.keep_first_turns,
        backbone=cfg.backbone,
        rubric_version=rubric.version,
        extra={
            "seed": cfg.seed,
            "best_epoch": best["epoch"],
            "best_validation_spearman": rounded(best["spearman"], 6),
            "train_config": cfg.model_dump(mode="json"),
            "n_train": len(data.records["train"]),
        },
    )


def fit_metrics(loop: Loop, best: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What ``data.train_metrics`` reports about a fit (sizes, speed, where the compute went)."""
    import torch

    world = loop.accelerator.num_processes
    return {
        "epochs_run": len(loop.seen),  # one entry per epoch trained (history has one per validation)
        "planned_epochs": len(loop.plans),
        "best_epoch": best["epoch"],
        "best_validation_spearman": rounded(best["spearman"], 4),
        "optimizer_steps": loop.step,
        "planned_optimizer_steps": loop.total_steps,
        "train_seconds": round(loop.train_time, 1),
        "total_seconds": round(seconds, 1),
        "examples_per_s": round(loop.examples * world / max(loop.train_time, 1e-9), 2),
        "useful_tokens_per_s": round(loop.tokens_useful * world / max(loop.train_time, 1e-9), 1),
        "tokens_useful": loop.tokens_useful * world,
        "tokens_computed": loop.tokens_computed * world,
        "padding_share": round(1 - loop.tokens_useful / max(loop.tokens_computed, 1), 4),
        "frozen_prefix_cached": int(isinstance(loop.inputs, CachedInputs)),
        "frozen_cache_mb": round(loop.inputs.cache.nbytes / 2**20, 1) if isinstance(loop.inputs, CachedInputs) else 0,
        "bf16": int(loop.accelerator.mixed_precision == "bf16"),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "processes": world,
        "n_train": len(loop.data.records["train"]),
        "n_validation": len(loop.data.records["validation"]),
        "n_groups_train": len(loop.data.group_members),
        "n_groups_validation": len({r["group_id"] for r in loop.data.records["validation"]}),
        "trainable_parameters": sum(p.numel() for p in loop.module.parameters() if p.requires_grad),
        **loop.data.truncation,
    }


# ----------------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class TrainResult:
    """What a training run did (``metrics`` is what goes to ``data.train_metrics``)."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    seen_ids: list[set[str]] = field(default_factory=list)  # per epoch: ids of the examples this process trained on
    model_dir: Path | None = None
    model: Any = None  # the trained model (best epoch's weights), unwrapped, on this process's device


def run_train(params: Params, progress: bool = True) -> TrainResult:
    """Train the reward model described by ``params.train`` on ``params.data`` and save it.

    Args:
        params: all settings; reads ``data.*`` paths, ``rubric`` (dimensions, weights, scale) and ``train``.
        progress: show the progress bar (main process, on a terminal; elsewhere progress is logged).

    Returns:
        A TrainResult; side effects: ``data.splits``, ``data.model_dir``, ``data.train_metrics`` and
        ``data.logs_dir/train.jsonl`` are written (by the main process).
    """
    from accelerate import PartialState

    cfg, paths, rubric = params.train, params.data, params.rubric
    started = time.perf_counter()
    main = os.environ.get("RANK", "0") == "0"  # before accelerate starts: every launcher sets RANK
    records = load_judged_records(paths.validated, paths.judgments, rubric)
    splits = make_splits(group_languages(records), cfg.split, cfg.seed)
    split_doc = split_document(splits, cfg.split, cfg.seed)
    if main:
        write_json(paths.splits, split_doc)
    log.info(
        "split %d groups (train %d / validation %d / test %d) -> %s",
        len(split_of(split_doc)),
        *(len(splits[s]) for s in SPLITS),
        paths.splits,
    )
    fitted = fit(params, records, splits, progress, log_path=Path(paths.logs_dir) / LOG_FILE)
    meta = fitted.metadata.model_copy(
        update={
            "training_data_sha256": training_data_sha256(paths.judgments, paths.validated),
            "split_sha256": stable_hash(split_doc, length=64),
        }
    )
    test = set(splits["test"])
    metrics = {
        **fitted.metrics,
        "total_seconds": round(time.perf_counter() - started, 1),
        "n_test": sum(r["group_id"] in test for r in records),
        "n_groups_test": len(test),
    }
    if main:
        save_model_folder(fitted.model, fitted.tokenizer, meta, Path(paths.model_dir))
        write_json(paths.train_metrics, dict(sorted(metrics.items())))
        epoch, validation = metrics["best_epoch"], metrics["best_validation_spearman"]
        kept = (
            f"last epoch {epoch}, no validation split"
            if validation is None
            else f"best epoch {epoch}, validation Spearman {validation:.4f}"
        )
        log.info(
            "saved %s (%s) in %.0f s, %.1f examples/s, peak RSS %.0f MB",
            paths.model_dir,
            kept,
            metrics["total_seconds"],
            metrics["examples_per_s"],
            metrics["peak_rss_mb"],
        )
    PartialState().wait_for_everyone()
    return TrainResult(metrics, fitted.history, fitted.seen_ids, Path(paths.model_dir), fitted.model)
