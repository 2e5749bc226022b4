"""Sanity report on the bundled sample and its reference judgments (issue: bundled sample).

Prints, from data/sample/: per-dimension score distributions, whether every context's candidates differ in overall
score, the Spearman correlation of overall score with reply length, and mean scores per candidate style and
language (a consistency check: the same kind of flaw should score alike across contexts and languages).

    .venv/bin/python scripts/sample_report.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

from scipy.stats import spearmanr

from fluent_reward.config import load_params

SAMPLE = Path("data/sample")


def load(params_path: Path) -> tuple[list[dict], dict[str, dict], object]:
    rubric = load_params(params_path).rubric
    records = json.loads((SAMPLE / "conversations.json").read_text(encoding="utf-8"))
    judged = json.loads((SAMPLE / "reference" / "reference_judgments.json").read_text(encoding="utf-8"))["judgments"]
    return records, {j["id"]: j for j in judged}, rubric


def sanity(records: list[dict], judgments: dict[str, dict], rubric) -> dict:
    """The numbers the sample must satisfy, computed from the files (also used by tests/test_sample.py)."""
    # Rounded: weighted means that are equal up to float noise (6.05 vs 6.050000000000001) are ties.
    overall = {r["id"]: round(rubric.overall(judgments[r["id"]]["scores"]), 6) for r in records}
    by_group: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_group[r["conversation_id"]].append(overall[r["id"]])
    lengths = [len(r["tutor_response"].split()) for r in records]
    rho = spearmanr([overall[r["id"]] for r in records], lengths).statistic
    return {
        "records": len(records),
        "contexts": len(by_group),
        "languages": dict(Counter(r["language"] for r in records)),
        "dimension_ranges": {
            d: (min(j["scores"][d] for j in judgments.values()), max(j["scores"][d] for j in judgments.values()))
            for d in rubric.names
        },
        "dimension_distinct_values": {d: len({j["scores"][d] for j in judgments.values()}) for d in rubric.names},
        "contexts_with_tied_overall": sorted(g for g, s in by_group.items() if len(set(s)) < len(s)),
        "spearman_overall_vs_length": float(rho),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    records, judgments, rubric = load(parser.parse_args().params)
    report = sanity(records, judgments, rubric)
    print(f"{report['records']} records, {report['contexts']} contexts, languages: {report['languages']}")
    print("\nper-dimension distribution (score: count)")
    for d in rubric.names:
        counts = Counter(j["scores"][d] for j in judgments.values())
        values = [j["scores"][d] for j in judgments.values()]
        hist = " ".join(f"{k}:{counts[k]}" for k in sorted(counts))
        print(f"  {d:<16} mean {statistics.mean(values):.2f} sd {statistics.pstdev(values):.2f}  {hist}")
    tied = report["contexts_with_tied_overall"]
    print(f"\ncontexts whose candidates share an overall score: {len(tied)} {tied}")
    print(f"Spearman(overall, reply length in words): {report['spearman_overall_vs_length']:+.3f}")
    by_style: dict[str, list[float]] = defaultdict(list)
    by_lang_style: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        style = r.get("metadata", {}).get("candidate_style", "?")
        score = rubric.overall(judgments[r["id"]]["scores"])
        by_style[style].append(score)
        by_lang_style[(r["language"], style)].append(score)
    print("\nmean overall by candidate style (consistency across languages)")
    languages = sorted({r["language"] for r in records})
    print(f"  {'style':<18}{'all':>6}" + "".join(f"{lang[:7]:>9}" for lang in languages))
    for style in sorted(by_style, key=lambda s: -statistics.mean(by_style[s])):
        row = "".join(
            f"{statistics.mean(by_lang_style[(lang, style)]):>9.2f}" if by_lang_style[(lang, style)] else f"{'-':>9}"
            for lang in languages
        )
        print(f"  {style:<18}{statistics.mean(by_style[style]):>6.2f}{row}")
    ok = (
        not tied
        and abs(report["spearman_overall_vs_length"]) <= 0.3
        and all(lo < hi for lo, hi in report["dimension_ranges"].values())
    )
    print("\nsanity:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
