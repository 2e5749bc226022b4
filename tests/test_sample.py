"""The bundled sample: valid input, one reference judgment per record, and the sanity properties it promises."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fluent_reward.config import Rubric, load_params, read_yaml
from fluent_reward.data import validate_file

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


def _sample_report():
    spec = importlib.util.spec_from_file_location("sample_report", ROOT / "scripts" / "sample_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sample():
    """The sample with the rubric it was judged against (data/sample/rubric.yaml), whatever your rubric.yaml says."""
    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(update={"rubric": Rubric.model_validate(read_yaml(SAMPLE / "rubric.yaml"))})
    records = json.loads((SAMPLE / "conversations.json").read_text(encoding="utf-8"))
    reference = json.loads((SAMPLE / "reference" / "reference_judgments.json").read_text(encoding="utf-8"))
    return params, records, reference


def test_sample_passes_validation_with_zero_problems(sample):
    params, _, _ = sample
    rows, report = validate_file(SAMPLE / "conversations.json", params.validate_)
    rows = list(rows)
    assert report.problems == [] and report.warnings == []
    assert len(rows) >= 400 and len(report.groups) >= 80 and len(report.languages) >= 6


def test_every_context_has_five_candidates_and_2_to_8_turns(sample):
    _, records, _ = sample
    by_group: dict[str, list[dict]] = {}
    for r in records:
        by_group.setdefault(r["conversation_id"], []).append(r)
    assert all(len(v) == 5 for v in by_group.values())
    for group in by_group.values():
        turns = [line for line in group[0]["context"].splitlines() if line.startswith(("Tutor:", "Student:"))]
        assert 2 <= len(turns) <= 8
        assert len({r["tutor_response"] for r in group}) == 5


def test_reference_judgments_cover_every_record_on_the_scale(sample):
    params, records, reference = sample
    rubric = params.rubric
    assert reference["source"] == "reference" and reference["rubric_version"] == rubric.version
    assert "No script or heuristic computed any score" in reference["provenance"]["method"]
    judged = {j["id"]: j for j in reference["judgments"]}
    assert set(judged) == {r["id"] for r in records}
    for j in judged.values():
        assert set(j["scores"]) == set(rubric.names)
        assert all(isinstance(v, int) and rubric.scale.min <= v <= rubric.scale.max for v in j["scores"].values())
        assert j["rationale"].strip()


def test_sanity_spans_no_ties_and_length_does_not_predict_quality(sample):
    params, records, reference = sample
    report = _sample_report().sanity(records, {j["id"]: j for j in reference["judgments"]}, params.rubric)
    assert all(hi - lo >= 6 for lo, hi in report["dimension_ranges"].values()), report["dimension_ranges"]
    assert all(n >= 6 for n in report["dimension_distinct_values"].values())
    assert report["contexts_with_tied_overall"] == []
    assert -0.3 <= report["spearman_overall_vs_length"] <= 0.3
