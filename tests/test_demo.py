"""`asymlora demo` end to end with the tiny random LLaVA on small builds of the real built-in datasets."""

import json

import pytest

from asymlora.assets import locate
from asymlora.cli import main


def test_demo_pipeline_on_tiny_model(tmp_path, isolated_cache, capsys):
    if any(locate(name) is None for name in ("easyvqa", "mnist", "fashion", "twemoji")):
        pytest.skip("dataset assets missing: asymlora setup --only easyvqa mnist fashion twemoji")
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny", "--steps", "4", "--batch-size", "4", "--eval-samples", "3",
                 "--max-per-split", "24", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for task in ("easyvqa", "fashion", "digits", "emoji", "ocr"):
        assert task in printed.split("[5/5] results")[1]
    assert "shuffled" in printed.split("[5/5] results")[1]
    for path in ("before/report.md", "after/report.md", "shuffled/report.md", "before/scores.png", "compare.md",
                 "compare.png", "adapter/adapter_model.safetensors", "summary.json"):
        assert (out / path).is_file(), path
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "asymlora" and summary["total_seconds"] >= summary["train_seconds"] > 0
    assert set(summary["tasks"]) == {"easyvqa", "fashion", "digits", "emoji", "ocr"}
    for task, row in summary["tasks"].items():
        assert set(row) == {"metric", "higher_is_better", "n", "before", "after", "majority", "shuffled"}, task
        assert row["n"] == 3 and row["higher_is_better"] == (row["metric"] != "character_error_rate")
    shuffled = [json.loads(line) for line in (out / "shuffled" / "predictions.jsonl").read_text().splitlines()]
    assert len(shuffled) == 15


def test_grounded_needs_the_margin_past_both_baselines():
    from asymlora.demo import grounded

    assert grounded(0.5, 0.3, 0.35, True) and not grounded(0.5, 0.3, 0.45, True)
    assert not grounded(0.5, 0.45, 0.2, True)
    assert grounded(0.6, 0.9, 0.8, False) and not grounded(0.75, 0.9, 0.8, False)
