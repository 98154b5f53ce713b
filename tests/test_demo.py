"""`asymlora demo` end to end with the tiny random LLaVA on small builds of the real built-in datasets."""

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
    for path in ("before/report.md", "after/report.md", "before/scores.png", "compare.md", "compare.png",
                 "adapter/adapter_model.safetensors"):
        assert (out / path).is_file(), path
