"""Which groups train, validate and test, and the identity of the data they came from.

A *group* is every candidate reply to one context; whole groups go to one split, so a context seen in training never
reappears in validation or test. The split is a pure, seeded function of the group ids and their languages; the
``data.splits`` document records it, and its hash (with the hash of the training data files) goes into the model
folder, so evaluate can refuse a model trained on another split.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fluent_reward.config import SplitRatios
from fluent_reward.errors import FluentRewardError
from fluent_reward.io import file_sha256, stable_hash

SPLITS = ("train", "validation", "test")
UNKNOWN_LANGUAGE = "unknown"


def share_count(n: int, share: float) -> int:
    """How many of ``n`` groups a split's ``share`` gets: rounded, at least one unless the share is 0."""
    return max(1, round(n * share)) if share > 0 else 0


def make_splits(groups: dict[str, str], ratios: SplitRatios, seed: int) -> dict[str, list[str]]:
    """Assign whole groups to train / validation / test.

    Args:
        groups: group_id -> language (the stratum; any string).
        ratios: target fractions of groups per split (sum 1).
        seed: the same seed and groups always give the same split, on any machine.

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}``, sorted group ids. Counts are exact (rounded, each
        split at least one group; validation none when its ratio is 0); languages are spread in proportion: groups
        are shuffled within each language by a seeded hash, given their relative position in that language, then cut
        in order of position.
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
    n_test = share_count(n, ratios.test)
    n_val = share_count(n, ratios.validation)
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


def training_data_sha256(*paths: Path) -> str:
    """One digest of the bytes of the files, in order (the judgments and the validated records)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()
