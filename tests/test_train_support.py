"""Shared by the train and evaluate tests: a tiny project (records, judgments in the contract format, params).

No tests here; the module is named ``test_train_*`` only because it belongs to the train tests.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from fluent_reward.config import Params, load_params
from fluent_reward.io import write_json, write_jsonl
from tests.helpers import make_records, make_tiny_backbone

REPO = Path(__file__).resolve().parents[1]
GOOD_MARKERS = ("Great", "Nice")


def make_learnable_backbone(folder: Path) -> Path:
    """tests.helpers' tiny random BERT with a wider initialisation (0.1 instead of BERT's 0.02), so its outputs
    depend on the input from the start and a few steps of training visibly lower the loss."""
    import torch
    from transformers import BertConfig, BertModel

    make_tiny_backbone(folder)
    config = BertConfig.from_pretrained(folder)
    config.initializer_range = 0.1
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def make_judgments(records: list[dict[str, Any]], params: Params, seed: int = 0) -> dict[str, Any]:
    """Judgments in the judge stage's contract format: good replies score high, bad ones low, with a little noise."""
    rng = random.Random(seed)
    rows = []
    for r in records:
        base = 8 if r["tutor_response"].startswith(GOOD_MARKERS) else 3
        scores = {d: max(1, min(10, base + rng.choice([-1, 0, 0, 1]))) for d in params.rubric.names}
        rows.append(
            {
                "id": r["id"],
                "group_id": r["group_id"],
                "scores": scores,
                "rationale": "synthetic",
                "source": "reference",
                "model": "test",
                "prompt_version": "test",
                "usage": {},
                "samples": 1,
            }
        )
    return {
        "model": "test",
        "prompt_version": "test",
        "rubric_version": params.rubric.version,
        "scale": params.rubric.scale.model_dump(),
        "dimensions": params.rubric.names,
        "judgments": rows,
    }


def tiny_project(root: Path, backbone: Path, n_groups: int = 20, per_group: int = 4, **train: Any) -> Params:
    """Write records + judgments under ``root`` and return params pointing every path there, with a fast config."""
    params = load_params(REPO / "params.yaml")
    records = make_records(n_groups=n_groups, per_group=per_group)
    data = params.data.model_copy(
        update={
            "validated": root / "data/validated.jsonl",
            "judgments": root / "data/judgments.json",
            "judge_metrics": root / "metrics/judge.json",
            "splits": root / "data/splits.json",
            "model_dir": root / "models/rm",
            "logs_dir": root / "outputs/logs",
            "train_metrics": root / "metrics/train.json",
            "eval_metrics": root / "metrics/metrics.json",
            "predictions": root / "metrics/predictions.csv",
            "test_predictions": root / "metrics/predictions_test.csv",
            "cv_metrics": root / "metrics/cv.json",
            "plots_dir": root / "metrics/plots",
            "report": root / "metrics/report.md",
        }
    )
    write_jsonl(data.validated, records)
    write_json(data.judgments, make_judgments(records, params))
    settings = {
        "backbone": str(backbone),
        "max_length": 64,
        "epochs": 2,
        "batch_size": 8,
        "lr": 3e-3,
        "head_lr": 1e-2,
        "warmup_ratio": 0.0,
        "early_stopping_patience": 5,
        "freeze_embeddings": False,
        "freeze_layers": 0,
        "grad_accum_steps": 1,
        "mixed_precision": "no",
        "pairwise_weight": 0.5,
        "loss": "huber",
        "num_threads": 1,  # a tiny model on a busy machine: one thread is many times faster than two
        **train,
    }
    settings["split"] = params.train.split
    evaluate = params.evaluate.model_copy(update={"bootstrap_samples": 200})
    return params.model_copy(
        update={"data": data, "train": params.train.model_copy(update=settings), "evaluate": evaluate}
    )
