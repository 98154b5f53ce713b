"""`asymlora eval` / `asymlora compare` end to end on a tiny trained model."""

import json

import pytest
import yaml
from train_fixtures import train_setup

from asymlora.cli import main
from asymlora.train import TrainConfig, run_training


def setup_with_test_split(tmp_path, method, steps):
    """The tiny training setup, its mixture written to mix.yaml with the train files as test split too."""
    values = train_setup(tmp_path, method=method, max_steps=steps, save_steps=100)
    mixture = values["data"]["mixture"]
    for entry in mixture["datasets"]:
        entry["splits"] = {"test": entry["path"]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture))
    values["data"]["mixture"] = str(tmp_path / "mix.yaml")
    return values


def test_eval_report_plot_merge_and_compare(tmp_path):
    values = setup_with_test_split(tmp_path, "asymlora", 6)
    run = run_training(TrainConfig.from_dict(values))
    common = ["--max-samples", "6", "--max-new-tokens", "4", "--batch-size", "4", "--mixture", str(tmp_path / "mix.yaml")]
    assert main(["eval", "--adapter", str(run), "--out", str(tmp_path / "routed"), *common]) == 0
    results = json.loads((tmp_path / "routed" / "results.json").read_text())
    assert set(results["tasks"]) == {"color", "isred"} and results["tasks"]["color"]["count"] == 6
    assert results["tasks"]["color"]["metric"] == "exact_match" and 0 <= results["mean"] <= 1
    for name in ("report.md", "scores.png", "predictions.jsonl"):
        assert (tmp_path / "routed" / name).stat().st_size > 0
    assert (tmp_path / "routed" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", "--adapter", str(run), "--merge-task", "color", "--tasks", "color", "--name", "merged",
                 "--out", str(tmp_path / "merged"), *common]) == 0
    routed = [json.loads(line) for line in (tmp_path / "routed" / "predictions.jsonl").read_text().splitlines()]
    merged = [json.loads(line) for line in (tmp_path / "merged" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in routed if p["task"] == "color"] == [p["prediction"] for p in merged]
    assert main(["eval", "--model", str(tmp_path / "model"), "--name", "base", "--out", str(tmp_path / "base"),
                 *common]) == 0
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "routed"), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.splitlines()[0] == "| task | metric | base | run |"
    assert table.splitlines()[-1].startswith("| **mean** |")
    assert (tmp_path / "cmp" / "compare.png").is_file()
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "routed"), "--reference", "base", "--resamples",
                 "200", "--out", str(tmp_path / "paired")]) == 0
    paired = json.loads((tmp_path / "paired" / "paired.json").read_text())
    base = json.loads((tmp_path / "base" / "results.json").read_text())
    assert paired["runs"]["run"]["mean"]["diff"] == pytest.approx(results["mean"] - base["mean"])
    assert set(paired["tasks"]) == {"color", "isred"} and paired["tasks"]["color"]["items"] == 6
    assert "| run | " in (tmp_path / "paired" / "paired.md").read_text()


def test_rank_scoring_picks_from_train_answers(tmp_path):
    setup_with_test_split(tmp_path, "lora", 2)
    assert main(["eval", "--model", str(tmp_path / "model"), "--scoring", "rank", "--max-samples", "4",
                 "--mixture", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "r")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    assert {r["prediction"] for r in rows if r["task"] == "isred"} <= {"yes", "no"}
    assert {r["prediction"] for r in rows if r["task"] == "color"} <= {"red", "green", "blue"}
    assert main(["eval", "--model", str(tmp_path / "model"), "--scoring", "rank-calibrated", "--max-samples", "4",
                 "--tasks", "color", "--mixture", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "c")]) == 0


def test_question_templates_group_answers_and_give_baselines():
    from asymlora.evaluate.run import answer_pool, question_template

    def pair(question, answer):
        return [{"role": "user", "content": "<image>\n" + question}], answer

    pool = answer_pool([pair("What color is the circle?", "red"), pair("What color is the square?", "blue"),
                        pair("What color is the circle?", "blue"), pair("Is there a circle?", "yes"),
                        pair("Is there a square?", "no"), pair("Is there a square?", "no"),
                        pair("What shape is this?", "circle"), pair("What shape is this?", "square")])
    assert question_template("What color is the SQUARE?", pool.answer_words) == "what color is the _ ?"
    assert pool.candidates("What color is the square?") == ["blue", "red"]
    assert pool.candidates("Is there a circle?") == ["no", "yes"]
    assert pool.candidates("Which one?") == pool.answers  # unseen template: every answer competes
    assert pool.majority() == "blue"  # blue 2, no 2: ties broken by name
    assert pool.majority("What color is the circle?") == "blue"
    assert pool.majority("Is there a circle?") == "no"
    assert pool.majority("Is there a red circle?") == "blue"  # template "is there a _ _ ?" unseen: overall
    assert pool.candidates("Is there a triangle?") == pool.answers  # not an answer word: an unseen template


def test_rank_with_question_candidates_reports_baselines(tmp_path):
    setup_with_test_split(tmp_path, "lora", 2)
    assert main(["eval", "--model", str(tmp_path / "model"), "--scoring", "rank", "--candidates", "question",
                 "--max-samples", "4", "--mixture", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "q")]) == 0
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    for task in ("isred", "color"):
        assert 0 <= results["tasks"][task]["majority"] <= 1 and 0 <= results["tasks"][task]["majority_by_question"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "q" / "predictions.jsonl").read_text().splitlines()]
    assert {r["prediction"] for r in rows if r["task"] == "isred"} <= {"yes", "no"}


def test_shuffled_images_move_every_question_to_another_image():
    from collections import Counter
    from pathlib import Path

    from asymlora.evaluate.run import _Prompt, _shuffle_images

    paths = [Path(f"{i // 2}.png") for i in range(7)]  # questions come in pairs about one image
    prompts = [_Prompt(messages=[], images=[p]) for p in paths]
    _shuffle_images(prompts)
    assert all(prompt.images != [path] for prompt, path in zip(prompts, paths))
    assert Counter(p.images[0] for p in prompts) == Counter(paths)  # the same images, moved


def test_blind_control_and_baselines_in_generate_mode(tmp_path):
    setup_with_test_split(tmp_path, "lora", 2)
    common = ["--model", str(tmp_path / "model"), "--max-samples", "4", "--max-new-tokens", "2",
              "--mixture", str(tmp_path / "mix.yaml")]
    assert main(["eval", *common, "--out", str(tmp_path / "own")]) == 0
    assert main(["eval", *common, "--images", "shuffled", "--out", str(tmp_path / "blind")]) == 0
    own = json.loads((tmp_path / "own" / "results.json").read_text())
    blind = json.loads((tmp_path / "blind" / "results.json").read_text())
    assert own["setup"]["images"] == "own" and blind["setup"]["images"] == "shuffled"
    for task in ("isred", "color"):  # closed answer sets: the answer-prior baselines, the same in both runs
        assert own["tasks"][task]["majority"] == blind["tasks"][task]["majority"]
        assert 0 <= own["tasks"][task]["majority_by_question"] <= 1
    report = (tmp_path / "blind" / "report.md").read_text()
    assert "| task | metric | score | majority | majority_by_question |" in report
