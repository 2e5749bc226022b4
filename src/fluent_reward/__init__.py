"""Fully Fluent Reward Model: distil Claude's judgment of language-tutor replies into a small local reward model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RewardModelScorer"]

if TYPE_CHECKING:
    from fluent_reward.inference import RewardModelScorer


def __getattr__(name: str) -> Any:
    # Lazy: `import fluent_reward` stays light (no torch); the scorer's module loads on first use.
    if name == "RewardModelScorer":
        from fluent_reward.inference import RewardModelScorer

        return RewardModelScorer
    raise AttributeError(f"module 'fluent_reward' has no attribute {name!r}")
