"""`asymlora compare --reference`: paired bootstrap differences on the same test items."""

import json

import numpy as np
import pytest

from asymlora.errors import DataError
from asymlora.evaluate.paired import paired_bootstrap
from asymlora.evaluate.report import compare
from asymlora.evaluate.scores import mean_score


def write_run(root, name, per_task):
    """An `asymlora eval` output dir: results.json and predictions.jsonl from {task: (metric, higher, scores)}."""
    run = root / name
    run.mkdir(parents=True)
    tasks, rows = {}, []
    for task, (metric, higher, scores) in per_task.items():
        tasks[task] = {"metric": metric, metric: float(np.mean(scores)), "higher_is_better": higher,
                       "count": len(scores)}
        rows += [{"task": task, "id": i, "prediction": "", "reference": "", "score": s} for i, s in enumerate(scores)]
    (run / "results.json").write_text(json.dumps({"name": name, "tasks": tasks, "mean": mean_score(tasks)}))
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_paired_differences_are_exact_and_oriented(tmp_path):
    rng = np.random.default_rng(0)
    ref_vqa = (rng.random(200) < 0.5).astype(float)
    ref_cer = rng.random(100)
    better_vqa = ref_vqa.copy()
    better_vqa[np.flatnonzero(ref_vqa == 0)[:20]] = 1.0  # 20 more right answers of 200: +0.10
    runs = {"ref": write_run(tmp_path, "ref", {"vqa": ("vqa_match", True, ref_vqa), "ocr": ("cer", False, ref_cer)}),
            "same": write_run(tmp_path, "same", {"vqa": ("vqa_match", True, ref_vqa), "ocr": ("cer", False, ref_cer)}),
            "better": write_run(tmp_path, "better", {"vqa": ("vqa_match", True, better_vqa),
                                                     "ocr": ("cer", False, ref_cer - 0.1)})}
    paths = compare(list(runs.values()), tmp_path / "cmp", reference=str(runs["ref"]), resamples=2000)
    summary = json.loads(paths["paired_json"].read_text())
    assert summary["reference"] == "ref" and summary["tasks"]["ocr"]["items"] == 100
    same = summary["runs"]["same"]
    assert same["mean"] == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_ahead": 0.0}
    better = summary["runs"]["better"]
    vqa, ocr = better["tasks"]["vqa"], better["tasks"]["ocr"]
    assert vqa["diff"] == pytest.approx(0.10) and (vqa["ahead"], vqa["behind"]) == (20, 0)
    assert ocr["diff"] == pytest.approx(0.10) and ocr["ahead"] == 100  # CER 0.1 lower: 1 - CER 0.1 higher
    assert 0 < vqa["low"] < 0.10 < vqa["high"] < 0.2 and vqa["p_ahead"] == 1.0
    assert ocr["low"] == pytest.approx(0.10) and ocr["high"] == pytest.approx(0.10)  # a constant shift
    assert better["mean"]["diff"] == pytest.approx(0.10) and better["mean"]["low"] > 0.05
    table = paths["paired"].read_text()
    assert "| better | +0.100 [" in table and "(20↑ 0↓)" in table


def test_cer_above_one_moves_its_task_but_not_the_clipped_mean(tmp_path):
    ref = write_run(tmp_path, "ref", {"ocr": ("character_error_rate", False, [1.5, 1.3])})
    run = write_run(tmp_path, "run", {"ocr": ("character_error_rate", False, [1.2, 1.2])})
    summary = json.loads(compare([ref, run], tmp_path / "cmp", reference="ref")["paired_json"].read_text())
    entry = summary["runs"]["run"]
    assert entry["tasks"]["ocr"]["diff"] == pytest.approx(0.2) and entry["tasks"]["ocr"]["ahead"] == 2
    assert entry["mean"]["diff"] == 0.0  # both means score max(0, 1 - CER) = 0, as compare's mean column does


def test_paired_interval_covers_a_null_difference(tmp_path):
    """Two runs right on independent halves of the items: no true difference, so the interval spans 0."""
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.5).astype(float)
    b = (rng.random(400) < 0.5).astype(float)
    runs = {n: (json.loads((d / "results.json").read_text()), d) for n, d in
            (("a", write_run(tmp_path, "a", {"t": ("exact_match", True, a)})),
             ("b", write_run(tmp_path, "b", {"t": ("exact_match", True, b)})))}
    summary = paired_bootstrap(runs, "a", resamples=4000, seed=3)
    entry = summary["runs"]["b"]["tasks"]["t"]
    assert entry["diff"] == pytest.approx(b.mean() - a.mean())
    assert entry["low"] < entry["diff"] < entry["high"]
    # the paired interval of two independent runs is about 2 x 1.96 x sqrt(2 x 0.25 / 400) = 0.139 wide
    assert 0.11 < entry["high"] - entry["low"] < 0.17


def test_paired_comparison_refuses_runs_on_other_items(tmp_path):
    ref = write_run(tmp_path, "ref", {"t": ("exact_match", True, [1.0, 0.0, 1.0])})
    short = write_run(tmp_path, "short", {"t": ("exact_match", True, [1.0, 0.0])})
    with pytest.raises(DataError, match=r"short/predictions.jsonl: task 't' has 2 items, 1 of the reference's 3"):
        compare([ref, short], tmp_path / "cmp", reference="ref")
    assert not (tmp_path / "cmp").exists()  # nothing half-written
    with pytest.raises(DataError, match="--reference: 'nope' is neither"):
        compare([ref, short], tmp_path / "cmp", reference="nope")
    (short / "predictions.jsonl").write_text('{"task": "t", "id": 0, "score": 1}\n{"task": "t", "id": 1}\n')
    with pytest.raises(DataError, match=r"short/predictions.jsonl, line 2: expected a JSON object"):
        compare([ref, short], tmp_path / "cmp", reference="ref")


def test_first_items_per_task_compare_an_all_items_eval_with_a_shorter_one(tmp_path, capsys):
    from asymlora.cli import main

    full = write_run(tmp_path, "full", {"vqa": ("vqa_match", True, [1.0, 0.0, 1.0, 0.0, 0.0]),
                                        "ocr": ("character_error_rate", False, [0.2, 0.4, 0.9, 0.9])})
    short = write_run(tmp_path, "short", {"vqa": ("vqa_match", True, [1.0, 1.0, 1.0]),
                                          "ocr": ("character_error_rate", False, [0.2, 0.2, 0.6])})
    with pytest.raises(DataError, match="task 'vqa' has 3 items, 2 of the reference's 5 missing"):
        compare([full, short], tmp_path / "plain", reference="full")
    paths = compare([full, short], tmp_path / "cmp", reference="full", resamples=500, max_items_per_task=3)
    summary = json.loads(paths["paired_json"].read_text())
    assert summary["max_items_per_task"] == 3 and {t["items"] for t in summary["tasks"].values()} == {3}
    entry = summary["runs"]["short"]
    assert entry["tasks"]["vqa"]["diff"] == pytest.approx(1.0 - 2 / 3)  # first 3 of full: 1, 0, 1
    assert entry["tasks"]["ocr"]["diff"] == pytest.approx(0.5 - 1 / 3)  # CER 0.5 -> 0.333 on the first 3
    assert entry["mean"]["diff"] == pytest.approx(((1 - 2 / 3) + (0.5 - 1 / 3)) / 2)
    table = paths["table"].read_text()
    assert "first 3 items" in table and "| vqa | vqa_match ↑ | 0.667 | 1.000 |" in table
    assert "| ocr | character_error_rate ↓ | 0.500 | 0.333 |" in table
    assert "| 0.583 | 0.833 |" in table  # the means: (2/3 + 0.5) / 2 and (1 + 2/3) / 2
    assert "first 3 items only" in paths["paired"].read_text()
    # a limit above the shorter eval's size still leaves the runs on different items
    with pytest.raises(DataError, match="--max-items-per-task no larger than"):
        compare([full, short], tmp_path / "big", reference="full", max_items_per_task=4)
    assert not (tmp_path / "big").exists()
    # the CLI: without --reference the table alone, from the first items
    assert main(["compare", str(full), str(short), "--out", str(tmp_path / "cli"), "--max-items-per-task", "2"]) == 0
    assert "| 0.600 | 0.900 |" in (tmp_path / "cli" / "compare.md").read_text()  # (0.5 + 0.7) / 2, (1 + 0.8) / 2
    assert main(["compare", str(full), str(short), "--out", str(tmp_path / "zero"), "--max-items-per-task", "0"]) == 2
    assert "--max-items-per-task: 0 must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "zero").exists()
