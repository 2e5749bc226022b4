"""Fully Fluent Reward Model: distil Claude's judgment of language-tutor replies into a small local reward model."""

__version__ = "0.1.0"
