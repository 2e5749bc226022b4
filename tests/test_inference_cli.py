"""`fluent-reward score` and ``score_file``: streaming chunks, per-dimension rows, invalid records as validate does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fluent_reward.config import load_params
from fluent_reward.errors import FluentRewardError
from fluent_reward.inference import RewardModelScorer, score_file
from tests.support import make_records, make_tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
DIMS = ("accuracy", "feedback")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_folder(tmp_path_factory.mktemp("m") / "model", dimensions=DIMS)


def raw_records(n_groups: int = 3) -> list[dict]:
    """Records in the INPUT format (no group_id; conversation_id optional)."""
    rows = []
    for r in make_records(n_groups=n_groups, per_group=3):
        row = {k: v for k, v in r.items() if k != "group_id"}
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def cli(*args: str) -> int:
    from fluent_reward.cli import main

    return main(["--params", str(ROOT / "params.yaml"), "score", "--no-progress", *args])


def test_score_file_streams_in_chunks_and_keeps_order(tmp_path, model_dir, monkeypatch):
    params = load_params(ROOT / "params.yaml")
    scorer = RewardModelScorer(model_dir, device="cpu")
    rows = raw_records(3)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    expected = scorer.score_dimensions(
        [r["context"] for r in rows], [r["tutor_response"] for r in rows], [r["student_message"] for r in rows]
    )
    sizes: list[int] = []
    original = scorer.score_dimensions

    def spy(contexts, *args, **kwargs):
        sizes.append(len(contexts))
        return original(contexts, *args, **kwargs)

    monkeypatch.setattr(scorer, "score_dimensions", spy)
    report = score_file(scorer, source, tmp_path / "out.jsonl", params.validate_, chunk_size=4, with_input=True)
    assert sizes == [4, 4, 1]  # never more than a chunk in memory
    assert report.records_read == report.records_scored == 9
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [o["id"] for o in out] == [r["id"] for r in rows]
    for o, e in zip(out, expected, strict=True):
        assert set(o) == {"id", "group_id", "overall", "weighted_overall", "scores", "input"}
        assert o["overall"] == pytest.approx(e.overall, abs=1e-4)
        assert o["scores"] == pytest.approx(e.dimensions, abs=1e-4)
        assert o["weighted_overall"] == pytest.approx(e.weighted(), abs=1e-4)
        assert o["group_id"].startswith("g-")  # no conversation_id: grouped by context + student message
        assert o["input"]["tutor_response"]


def test_cli_score_json_array_with_weights(tmp_path, model_dir):
    source = tmp_path / "in.json"
    source.write_text(json.dumps(raw_records(2), ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    assert (
        cli(
            "--input",
            str(source),
            "--output",
            str(out),
            "--model",
            str(model_dir),
            "--weights",
            "accuracy=1,feedback=0",
        )
        == 0
    )
    rows = read_jsonl(out)
    assert len(rows) == 6
    assert all(r["weighted_overall"] == pytest.approx(r["scores"]["accuracy"]) for r in rows)


def test_invalid_records_fail_like_validate_and_write_nothing(tmp_path, model_dir, capsys):
    rows = raw_records(1)
    rows[1]["tutor_response"] = ""
    source = tmp_path / "in.jsonl"
    write_jsonl(source, rows)
    with source.open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    out = tmp_path / "out.jsonl"
    assert cli("--input", str(source), "--output", str(out), "--model", str(model_dir), "--on-error", "fail") == 2
    err = capsys.readouterr().err
    assert f"{source}: record 2 (id=r0-1): field 'tutor_response': must not be empty" in err
    assert f"{source}: record 4: not valid JSON" in err
    assert "2 problems in 2 of 4 records; nothing written" in err
    assert not out.exists()


def test_invalid_records_dropped_and_reported(tmp_path, model_dir, caplog):
    params = load_params(ROOT / "params.yaml")
    cfg = params.validate_.model_copy(update={"on_error": "drop"})
    rows: list = raw_records(1)
    rows.insert(1, ["not", "an", "object"])
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    report = score_file(RewardModelScorer(model_dir), source, tmp_path / "out.jsonl", cfg, chunk_size=2)
    assert report.records_read == 4 and report.records_scored == 3 and report.problems_total == 1
    assert "record 2: record is a list, expected an object (skipped)" in caplog.text
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["r0-0", "r0-1", "r0-2"]


def test_cli_score_errors(tmp_path, model_dir, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", raw_records(1))
    out = str(tmp_path / "o.jsonl")
    assert cli("--input", str(source), "--output", out, "--model", str(tmp_path / "missing")) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert cli("--input", str(source), "--output", out, "--model", str(model_dir), "--weights", "accuracy=1") == 2
    assert "missing: ['feedback']" in capsys.readouterr().err
    assert cli("--input", str(tmp_path / "nope.jsonl"), "--output", out, "--model", str(model_dir)) == 2
    assert "nope.jsonl: input file does not exist\n" in capsys.readouterr().err
    cfg = load_params(ROOT / "params.yaml").validate_.model_copy(update={"on_error": "drop"})
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}, {"y": 2}])
    scorer = RewardModelScorer(model_dir)
    with pytest.raises(FluentRewardError, match="no valid records"):
        score_file(scorer, bad, tmp_path / "x", cfg)


def test_input_and_output_are_checked_before_the_model_is_loaded(tmp_path, model_dir, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(RewardModelScorer, "__init__", no_load)
    assert cli("--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o"), "--model", str(model_dir)) == 2
    assert "nope.jsonl: input file does not exist" in capsys.readouterr().err
    source = write_jsonl(tmp_path / "in.jsonl", raw_records(1))
    assert cli("--input", str(source), "--output", str(tmp_path), "--model", str(model_dir)) == 2
    assert f"{tmp_path}: is a directory; give the path of the JSONL file to write" in capsys.readouterr().err


def test_progress_advances_per_scored_batch_and_ends_with_time_and_throughput(tmp_path, model_dir, monkeypatch, caplog):
    import contextlib

    import fluent_reward.inference as inference

    advances: list[int] = []
    totals: list = []

    @contextlib.contextmanager
    def recording(enabled, total, description="scoring"):
        if enabled:
            totals.append(total)
        yield advances.append if enabled else (lambda n: None)

    monkeypatch.setattr(inference, "_progress", recording)
    params = load_params(ROOT / "params.yaml")
    source = write_jsonl(tmp_path / "in.jsonl", raw_records(3))
    scorer = RewardModelScorer(model_dir, device="cpu", batch_size=2)
    caplog.set_level("INFO", logger="fluent_reward.inference")
    score_file(scorer, source, tmp_path / "out.jsonl", params.validate_, chunk_size=4, show_progress=True)
    assert totals[0] == 9
    # one step per forward pass (chunks of 4, 4, 1 in batches of at most 2), not one jump per records read
    assert [n for n in advances if n] == [2, 2, 2, 2, 1]
    summary = [r.message for r in caplog.records if r.message.startswith("scored 9 of 9 records")]
    assert summary and " s (" in summary[0] and "records/s)" in summary[0]


def test_cli_clips_to_the_scale_unless_no_clip(tmp_path, model_dir):
    source = write_jsonl(tmp_path / "in.jsonl", raw_records(3))
    assert cli("--input", str(source), "--output", str(tmp_path / "a.jsonl"), "--model", str(model_dir)) == 0
    assert (
        cli("--input", str(source), "--output", str(tmp_path / "b.jsonl"), "--model", str(model_dir), "--no-clip") == 0
    )
    clipped = [v for row in read_jsonl(tmp_path / "a.jsonl") for v in [row["overall"], *row["scores"].values()]]
    raw = [v for row in read_jsonl(tmp_path / "b.jsonl") for v in [row["overall"], *row["scores"].values()]]
    assert min(clipped) >= 1 and max(clipped) <= 10
    assert min(raw) < 1 or max(raw) > 10  # the wide-init tiny model leaves the scale
    assert clipped == pytest.approx([min(max(v, 1), 10) for v in raw], abs=1e-4)
