"""The train stage: splits by group, standardised targets, group-aware batches and the training loop on accelerate.

``run_train(params)`` is the whole stage (the CLI only calls it). It

1. joins the validated records with their judgments and computes the targets (the rubric's weighted overall, then
   every dimension, on the judge's scale);
2. splits the groups (all candidate replies of one context) into train / validation / test, seeded and stratified by
   language, and writes the split to ``data.splits``; the test groups are never tokenised here;
3. fine-tunes ``AutoModelForSequenceClassification(num_labels=1 + n_dims)`` on standardised targets with a pointwise
   loss plus a Bradley–Terry term between replies of the same group, early-stopping on the validation Spearman of the
   overall score and keeping the best epoch's weights;
4. saves the model folder (safetensors, tokenizer, ``fluent_reward.json``) and ``data.train_metrics``.

The same code runs on one CPU and, unchanged, under ``accelerate launch`` / ``torchrun`` on several processes: every
process builds the same epoch plan of whole-group batches and takes every ``world_size``-th batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fluent_reward.config import Params, SplitRatios, TrainConfig
from fluent_reward.data import load_judged_records
from fluent_reward.errors import FluentRewardError
from fluent_reward.io import file_sha256, stable_hash, write_json
from fluent_reward.model import OVERALL, ModelMetadata, encode_batch, resolve_backbone

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
UNKNOWN_LANGUAGE = "unknown"
LOG_FILE = "train.jsonl"


# ----------------------------------------------------------------------------------------------------------------
# Records, judgments and targets


def training_data_sha256(*paths: Path) -> str:
    """One digest of the bytes of the files, in order (the judgments and the validated records)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def target_matrix(records: Sequence[dict[str, Any]], dimensions: Sequence[str]) -> np.ndarray:
    """Judge-scale targets, shape (n, 1 + n_dims): the overall first, then the dimensions in rubric order."""
    return np.array([[r["overall"], *(r["scores"][d] for d in dimensions)] for r in records], dtype=np.float64)


def fit_normalisation(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-label mean and standard deviation (a constant label gets std 1, so standardising never divides by 0)."""
    mean = targets.mean(axis=0)
    std = targets.std(axis=0)
    return mean, np.where(std > 1e-8, std, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Splits


def make_splits(groups: dict[str, str], ratios: SplitRatios, seed: int) -> dict[str, list[str]]:
    """Assign whole groups to train / validation / test.

    Args:
        groups: group_id -> language (the stratum; any string).
        ratios: target fractions of groups per split (sum 1).
        seed: the same seed and groups always give the same split, on any machine.

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}``, sorted group ids. Counts are exact (rounded, each
        split at least one group); languages are spread in proportion: groups are shuffled within each language by a
        seeded hash, given their relative position in that language, then cut in order of position.
    """
    if len(groups) < 3:
        raise FluentRewardError(f"need at least 3 groups (contexts) to split train/validation/test, got {len(groups)}")
    by_language: dict[str, list[str]] = defaultdict(list)
    for gid, language in groups.items():
        by_language[language].append(gid)
    position = {}
    for members in by_language.values():
        members.sort(key=lambda g: stable_hash(seed, g))
        for i, gid in enumerate(members):
            position[gid] = (i + 0.5) / len(members)
    ordered = sorted(groups, key=lambda g: (position[g], stable_hash(seed, "order", g)))
    n = len(ordered)
    n_test = max(1, round(n * ratios.test))
    n_val = max(1, round(n * ratios.validation))
    if n - n_test - n_val < 1:
        raise FluentRewardError(f"{n} groups are too few for split ratios {ratios.model_dump()}")
    return {
        "test": sorted(ordered[:n_test]),
        "validation": sorted(ordered[n_test : n_test + n_val]),
        "train": sorted(ordered[n_test + n_val :]),
    }


def group_languages(records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """group_id -> language of its first record (``unknown`` when absent)."""
    out: dict[str, str] = {}
    for r in records:
        out.setdefault(r["group_id"], r.get("language") or UNKNOWN_LANGUAGE)
    return out


def split_document(splits: dict[str, list[str]], ratios: SplitRatios, seed: int) -> dict[str, Any]:
    """The ``data.splits`` file (see docs/ARCHITECTURE.md)."""
    return {"seed": seed, "ratios": ratios.model_dump(), "groups": {name: splits[name] for name in SPLITS}}


def split_of(split_doc: dict[str, Any]) -> dict[str, str]:
    """group_id -> split name, from a ``data.splits`` document."""
    return {gid: name for name, gids in split_doc["groups"].items() for gid in gids}


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


def collate(encoded: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (dynamic padding)."""
    import torch

    width = max(len(e["input_ids"]) for e in encoded)
    out: dict[str, torch.Tensor] = {}
    for key in encoded[0]:
        pad = pad_token_id if key == "input_ids" else 0
        out[key] = torch.tensor([e[key] + [pad] * (width - len(e[key])) for e in encoded], dtype=torch.long)
    return out


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
    backbone: str, labels: Sequence[str], backbones_dir: Path | None = None
) -> tuple[Any, Any, list[str]]:
    """(model, tokenizer, names of newly initialised parameters) for a regression model with one logit per label.

    Safetensors weights only, never remote code. A local folder, a packaged or converted backbone (converted ones
    live in ``backbones_dir``) or a hub id (needs a hub).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_backbone(backbone, backbones_dir)
    try:
        with quiet_transformers():  # its load report lists the new head as "missing": expected, not news
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning logs and progress bars for a block (our own log says what matters)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def freeze(model: Any, embeddings: bool, layers: int) -> int:
    """Freeze the embeddings and/or the lowest ``layers`` transformer layers; return how many tensors were frozen."""
    base = model.base_model
    modules = []
    if embeddings:
        modules.append(base.embeddings)
    if layers:
        stack = getattr(getattr(base, "encoder", None), "layer", None)
        if stack is None:
            raise FluentRewardError(
                f"train.freeze_layers={layers}: this backbone has no `encoder.layer` stack; set it to 0"
            )
        if layers > len(stack):
            raise FluentRewardError(f"train.freeze_layers={layers}: the backbone has only {len(stack)} layers")
        modules += list(stack[:layers])
    count = 0
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)
            count += 1
    return count


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


def predict_logits(
    model: Any, encoded: Sequence[dict[str, list[int]]], batch_size: int, pad_token_id: int, device: Any = None
) -> np.ndarray:
    """Raw logits (standardised units), shape (n, num_labels), in the order of ``encoded``; length-sorted batches."""
    import torch

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    out = np.zeros((len(encoded), model.config.num_labels), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_token_id).items()}
            out[idx] = model(**batch).logits.float().cpu().numpy()
    model.train(was_training)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation; NaN (constant input or fewer than 2 points) becomes -1 so it never wins early stopping."""
    from scipy.stats import spearmanr

    if len(a) < 2:
        return -1.0
    value = float(spearmanr(a, b).statistic)
    return value if math.isfinite(value) else -1.0


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


class _StepLog:
    """Per-step JSONL log on the main process (line-buffered, so a crashed run keeps its log)."""

    def __init__(self, path: Path | None):
        self.handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed in close())

    def write(self, row: dict[str, Any]) -> None:
        if self.handle:
            self.handle.write(json.dumps(row, sort_keys=True) + "\n")

    def close(self) -> None:
        if self.handle:
            self.handle.close()


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def _make_accelerator(cfg: TrainConfig) -> Any:
    import torch
    from accelerate import Accelerator

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise FluentRewardError("train.mixed_precision=fp16 needs a CUDA GPU; use 'no' (or 'bf16') on CPU")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate picks gloo on CPU-only machines only when asked for the CPU: several processes with no GPU.
    cpu = world > 1 and not torch.accelerator.is_available()
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)


def run_train(params: Params, progress: bool = True) -> TrainResult:
    """Train the reward model described by ``params.train`` on ``params.data`` and save it.

    Args:
        params: all settings; reads ``data.*`` paths, ``rubric`` (dimensions, weights, scale) and ``train``.
        progress: show the progress bar (main process only).

    Returns:
        A TrainResult; side effects: ``data.splits``, ``data.model_dir``, ``data.train_metrics`` and
        ``data.logs_dir/train.jsonl`` are written (by the main process).
    """
    import torch

    threads = torch.get_num_threads()
    if params.train.num_threads > 0:
        torch.set_num_threads(params.train.num_threads)
    try:
        return _train(params, progress)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _train(params: Params, progress: bool) -> TrainResult:
    import torch
    from accelerate.utils import broadcast_object_list, set_seed
    from transformers import get_linear_schedule_with_warmup

    cfg, paths, rubric = params.train, params.data, params.rubric
    accelerator = _make_accelerator(cfg)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    started = time.perf_counter()

    # --- data, split, targets
    records = load_judged_records(paths.validated, paths.judgments, rubric)
    splits = make_splits(group_languages(records), cfg.split, cfg.seed)
    split_doc = split_document(splits, cfg.split, cfg.seed)
    if main:
        write_json(paths.splits, split_doc)
    where = split_of(split_doc)
    subset = {name: [r for r in records if where[r["group_id"]] == name] for name in SPLITS}
    labels = [OVERALL, *rubric.names]
    raw_targets = {name: target_matrix(subset[name], rubric.names) for name in ("train", "validation")}
    mean, std = fit_normalisation(raw_targets["train"])
    targets = {name: (t - mean) / std for name, t in raw_targets.items()}
    log.info(
        "split %d groups (train %d / validation %d / test %d) -> %s; training on %d records",
        len(where),
        *(len(splits[s]) for s in SPLITS),
        paths.splits,
        len(subset["train"]),
    )

    # --- model and inputs (the test split is never tokenised here)
    model, tokenizer, new_params = load_backbone_model(cfg.backbone, labels, paths.backbones)
    frozen = freeze(model, cfg.freeze_embeddings, cfg.freeze_layers)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with quiet_transformers():  # untruncated lengths are measured on purpose; the tokenizer warns about them
        encoded = {
            name: encode_batch(
                tokenizer,
                [r["context"] for r in subset[name]],
                [r["student_message"] for r in subset[name]],
                [r["tutor_response"] for r in subset[name]],
                cfg.max_length,
            )
            for name in ("train", "validation")
        }
    train_recs, train_enc, train_y = subset["train"], encoded["train"], targets["train"]
    lengths = [len(e["input_ids"]) for e in train_enc]
    group_ids = sorted({r["group_id"] for r in train_recs})
    group_index = {g: i for i, g in enumerate(group_ids)}
    members: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(train_recs):
        members[r["group_id"]].append(i)
    group_members = [members[g] for g in group_ids]

    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = math.ceil(
        len(shard_batches(group_batches(group_members, lengths, cfg.batch_size, random.Random(0)), rank, world))
        / cfg.grad_accum_steps
    )
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    optimizer = torch.optim.AdamW(param_groups(model, new_params, cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
    unwrapped = accelerator.unwrap_model(model)
    n_trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    log.info(
        "backbone %s: %d labels, %.1fM trainable parameters (%d tensors frozen), %d process(es), %d steps/epoch",
        cfg.backbone,
        len(labels),
        n_trainable / 1e6,
        frozen,
        world,
        steps_per_epoch,
    )

    steplog = _StepLog(Path(paths.logs_dir) / LOG_FILE if main else None)
    history: list[dict[str, Any]] = []
    seen: list[set[str]] = []
    best = {"spearman": -math.inf, "epoch": 0, "state": None}
    step, examples, train_time, bad_epochs, epochs_run = 0, 0, 0.0, 0, 0
    model.train()
    try:
        with _progress(progress and main) as bar:
            task = bar.add_task("train", total=total_steps, info="")
            for epoch in range(1, cfg.epochs + 1):
                epochs_run = epoch
                rng = random.Random(f"{cfg.seed}-{epoch}")
                plan = shard_batches(group_batches(group_members, lengths, cfg.batch_size, rng), rank, world)
                epoch_start = time.perf_counter()
                seen.append(set())
                window: dict[str, float] = defaultdict(float)
                for i, batch in enumerate(plan):
                    window_start = i - i % cfg.grad_accum_steps
                    window_size = min(cfg.grad_accum_steps, len(plan) - window_start)
                    sync = i - window_start == window_size - 1
                    inputs = {
                        k: v.to(accelerator.device) for k, v in collate([train_enc[j] for j in batch], pad_id).items()
                    }
                    y = torch.tensor(train_y[batch], dtype=torch.float32, device=accelerator.device)
                    g = torch.tensor([group_index[train_recs[j]["group_id"]] for j in batch], device=accelerator.device)
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                        logits = model(**inputs).logits.float()
                        point = pointwise_loss(logits, y, cfg.loss, cfg.huber_delta)
                        pair, n_pairs = pairwise_loss(logits[:, 0], y[:, 0], g, cfg.pairwise_margin_scale)
                        loss = point + cfg.pairwise_weight * pair
                    accelerator.backward(loss / window_size)
                    seen[-1].update(train_recs[j]["id"] for j in batch)
                    examples += len(batch)
                    window["loss"] += loss.item() / window_size
                    window["pointwise"] += point.item() / window_size
                    window["pairwise"] += pair.item() / window_size
                    window["pairs"] += n_pairs
                    window["examples"] += len(batch)
                    if not sync:
                        continue
                    if cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    elapsed = train_time + time.perf_counter() - epoch_start
                    rate = examples * world / max(elapsed, 1e-9)
                    steplog.write(
                        {
                            "event": "step",
                            "epoch": epoch,
                            "step": step,
                            "loss": round(window["loss"], 6),
                            "pointwise": round(window["pointwise"], 6),
                            "pairwise": round(window["pairwise"], 6),
                            "pairs": int(window["pairs"]),
                            "examples": int(window["examples"]) * world,
                            "lr": {
                                grp["name"]: grp["lr"]
                                for grp in optimizer.param_groups
                                if "no_decay" not in grp["name"]
                            },
                            "examples_per_s": round(rate, 2),
                            "elapsed_s": round(elapsed, 2),
                        }
                    )
                    bar.update(task, advance=1, info=f"epoch {epoch} loss {window['loss']:.3f} {rate:.1f} ex/s")
                    window = defaultdict(float)
                train_time += time.perf_counter() - epoch_start

                # --- validation (every process computes it; rank 0's value decides, so no process diverges)
                pred = predict_logits(unwrapped, encoded["validation"], cfg.batch_size * 2, pad_id, accelerator.device)
                val = [spearman(pred[:, 0], targets["validation"][:, 0])]
                broadcast_object_list(val, from_process=0)
                improved = val[0] > best["spearman"]
                if improved:
                    best.update(spearman=val[0], epoch=epoch)
                    best["state"] = {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()}
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                row = {
                    "event": "validation",
                    "epoch": epoch,
                    "step": step,
                    "validation_spearman": round(val[0], 6),
                    "validation_rmse_std_units": round(float(np.sqrt(np.mean((pred - targets["validation"]) ** 2))), 6),
                    "best": improved,
                    "elapsed_s": round(train_time, 2),
                }
                history.append(row)
                steplog.write(row)
                log.info("epoch %d: validation Spearman %.4f%s", epoch, val[0], " (best)" if improved else "")
                if bad_epochs >= cfg.early_stopping_patience:
                    log.info("early stop: no better validation Spearman for %d epoch(s)", bad_epochs)
                    break
    finally:
        steplog.close()

    unwrapped.load_state_dict(best["state"])
    accelerator.wait_for_everyone()
    meta = ModelMetadata(
        dimensions=rubric.names,
        weights=dict(rubric.weights),
        scale=rubric.scale.model_dump(),
        mean=[float(x) for x in mean],
        std=[float(x) for x in std],
        max_length=cfg.max_length,
        backbone=cfg.backbone,
        rubric_version=rubric.version,
        training_data_sha256=training_data_sha256(paths.judgments, paths.validated),
        split_sha256=stable_hash(split_doc, length=64),
        extra={
            "seed": cfg.seed,
            "best_epoch": best["epoch"],
            "best_validation_spearman": round(best["spearman"], 6),
            "train_config": cfg.model_dump(mode="json"),
            "n_train": len(train_recs),
        },
    )
    total_seconds = time.perf_counter() - started
    metrics = {
        "epochs_run": epochs_run,
        "best_epoch": best["epoch"],
        "best_validation_spearman": round(best["spearman"], 4),
        "optimizer_steps": step,
        "train_seconds": round(train_time, 1),
        "total_seconds": round(total_seconds, 1),
        "examples_per_s": round(examples * world / max(train_time, 1e-9), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "processes": world,
        "n_train": len(train_recs),
        "n_validation": len(subset["validation"]),
        "n_test": len(subset["test"]),
        "n_groups_train": len(splits["train"]),
        "n_groups_validation": len(splits["validation"]),
        "n_groups_test": len(splits["test"]),
        "trainable_parameters": n_trainable,
    }
    if main:
        save_model_folder(unwrapped, tokenizer, meta, Path(paths.model_dir))
        write_json(paths.train_metrics, metrics)
        log.info(
            "saved %s (best epoch %d, validation Spearman %.4f) in %.0f s, %.1f examples/s, peak RSS %.0f MB",
            paths.model_dir,
            best["epoch"],
            best["spearman"],
            total_seconds,
            metrics["examples_per_s"],
            metrics["peak_rss_mb"],
        )
    accelerator.wait_for_everyone()
    return TrainResult(
        metrics=metrics, history=history, seen_ids=seen, model_dir=Path(paths.model_dir), model=unwrapped
    )


def save_model_folder(model: Any, tokenizer: Any, meta: ModelMetadata, folder: Path) -> None:
    """Write the folder beside ``folder`` and swap it in, so a crash never leaves half a model behind."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    meta.save(tmp)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
