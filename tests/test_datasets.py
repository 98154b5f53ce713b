"""The built-in real datasets (asymlora.builtin_data): schema, determinism, splits, baselines, CLI.

Every builder runs for real on a small sample (``max_per_split``) into a temporary directory. A test
that needs an asset which is not installed is skipped with the command that installs it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from asymlora.assets import ASSETS, locate
from asymlora.builtin_data import (
    BUILDERS,
    SPLITS,
    build,
    build_all,
    dataset_dir,
    digits,
    easyvqa,
    emoji,
    fashion,
    load_split,
    load_stats,
    majority_baseline,
    ocr,
    validate_records,
)
from asymlora.builtin_data.common import (
    BuildContext,
    DatasetBuilder,
    Sample,
    question_majority_baseline,
    run_build,
)
from asymlora.commands.data import register_cli
from asymlora.errors import DataError, MissingAssetError

SMALL = 12
NAMES = list(BUILDERS)
MIX5 = Path(__file__).resolve().parents[1] / "src" / "asymlora" / "mixtures" / "mix5.yaml"


def require_sources(name: str) -> None:
    """Skip the calling test if the sources of dataset ``name`` are not installed here."""
    for asset in BUILDERS[name].assets:
        if locate(asset) is None:
            pytest.skip(f"asset {asset!r} is not installed; run: {ASSETS[asset].install_command}")
    if name == "ocr":
        try:
            ocr.find_fonts()
        except MissingAssetError as err:
            pytest.skip(str(err))


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All datasets whose sources are installed, built with seed 0 and SMALL samples per split."""
    root = tmp_path_factory.mktemp("data")
    for name in NAMES:
        # A dataset whose sources are missing is left out: its tests skip through require_sources.
        with contextlib.suppress(MissingAssetError):
            build(name, out_dir=root, seed=0, max_per_split=SMALL)
    return root


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def record(answer: str, question: str = "Q?", index: int = 0) -> dict[str, Any]:
    return {
        "id": f"t-{index}",
        "image": "images/x.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "task": "t",
    }


@pytest.mark.parametrize("name", NAMES)
def test_schema_and_images(small_root: Path, name: str) -> None:
    require_sources(name)
    directory = dataset_dir(name, small_root)
    for split in SPLITS:
        records = load_split(name, split, small_root)
        assert len(records) == SMALL
        validate_records(records, f"{name}/{split}", root=directory)
        assert {r["task"] for r in records} == {name}
        assert all(r["id"].startswith(f"{name}-{split}-") for r in records)
        assert all(r["image"].startswith(f"images/{split}/") and r["image"].endswith(".png") for r in records)
        with Image.open(directory / records[0]["image"]) as image:
            assert image.format == "PNG" and image.mode == "RGB"
    stats = load_stats(name, small_root)
    assert stats["counts"] == {s: SMALL for s in SPLITS}
    assert stats["build"]["seed"] == 0 and stats["task"] == name


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_identical_bytes(small_root: Path, tmp_path: Path, name: str) -> None:
    require_sources(name)
    again = build(name, out_dir=tmp_path, seed=0, max_per_split=SMALL)
    first, second = files_of(dataset_dir(name, small_root)), files_of(again)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first), "a JSON or PNG file differs between two builds"
    other = build(name, out_dir=tmp_path / "seed1", seed=1, max_per_split=SMALL)
    assert (other / "train.json").read_bytes() != second["train.json"]


@pytest.mark.parametrize("name", NAMES)
def test_smaller_build_is_a_prefix(small_root: Path, tmp_path: Path, name: str) -> None:
    require_sources(name)
    small = build(name, out_dir=tmp_path, seed=0, max_per_split=SMALL // 2)
    for split in SPLITS:
        part = json.loads((small / f"{split}.json").read_text())
        assert part == load_split(name, split, small_root)[: SMALL // 2]


@pytest.mark.parametrize("name", ["easyvqa", "fashion", "emoji"])
def test_splits_share_no_source_image(small_root: Path, name: str) -> None:
    require_sources(name)
    directory = dataset_dir(name, small_root)
    stems: dict[str, set[str]] = {}
    digests: dict[str, set[str]] = {}
    for split in SPLITS:
        images = {r["image"] for r in load_split(name, split, small_root)}
        stems[split] = {Path(i).stem for i in images}
        digests[split] = {hashlib.sha256((directory / i).read_bytes()).hexdigest() for i in images}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not stems[a] & stems[b], f"{name}: {a} and {b} share source images"
        assert not digests[a] & digests[b], f"{name}: {a} and {b} share identical images"


def test_easyvqa_val_images_come_from_train_and_test_from_test(small_root: Path) -> None:
    require_sources("easyvqa")
    assert all(
        Path(r["image"]).stem.startswith("train-")
        for s in ("train", "val")
        for r in load_split("easyvqa", s, small_root)
    )
    assert all(Path(r["image"]).stem.startswith("test-") for r in load_split("easyvqa", "test", small_root))
    for split in SPLITS:  # open questions only: a colour or a shape, never yes/no
        answers = {r["conversations"][1]["value"] for r in load_split("easyvqa", split, small_root)}
        assert answers <= easyvqa.ANSWERS and len(answers) >= 5, split


def test_fashion_answers_and_upscaled_images(small_root: Path) -> None:
    require_sources("fashion")
    directory = dataset_dir("fashion", small_root)
    for split in SPLITS:
        for r in load_split("fashion", split, small_root):
            assert r["conversations"][0]["value"] == f"<image>\n{fashion.QUESTION}"
            assert r["conversations"][1]["value"] in fashion.CLASS_NAMES
    with Image.open(directory / load_split("fashion", "test", small_root)[0]["image"]) as image:
        assert image.size == (fashion.IMAGE_SIZE, fashion.IMAGE_SIZE)
    assert all(Path(r["image"]).stem.startswith("t10k-") for r in load_split("fashion", "test", small_root))


def test_digit_pools_are_disjoint_and_cover_the_source() -> None:
    pools = digits.split_pools(5000, seed=3)
    sets = {split: set(pool.tolist()) for split, pool in pools.items()}
    assert {split: len(s) for split, s in sets.items()} == digits.POOLS
    assert (
        not sets["train"] & sets["val"]
        and not sets["train"] & sets["test"]
        and not sets["val"] & sets["test"]
    )
    assert set().union(*sets.values()) == set(range(5000))
    assert not np.array_equal(pools["test"], digits.split_pools(5000, seed=4)["test"])


def test_digit_answers_are_single_digits(small_root: Path) -> None:
    require_sources("digits")
    for split in SPLITS:
        records = load_split("digits", split, small_root)
        assert {r["conversations"][0]["value"] for r in records} == {f"<image>\n{digits.QUESTION}"}
        answers = [r["conversations"][1]["value"] for r in records]
        assert all(len(a) == 1 and a.isdigit() for a in answers)
        assert len(set(answers)) >= 5, split  # SMALL uniform draws over ten digits


def test_emoji_descriptions() -> None:
    entry = {"name": "GRINNING FACE", "category": "Smileys & Emotion", "subcategory": "face-smiling"}
    assert (
        emoji.describe(entry) == "A grinning face, a face-smiling emoji from the Smileys & Emotion category."
    )
    flag = {"name": "Australia Flag", "category": "Flags", "subcategory": "country-flag"}
    assert emoji.describe(flag) == "An Australia flag, a country-flag emoji from the Flags category."
    assert [emoji.article(w) for w in ("owl", "unicorn", "hourglass", "tiger")] == ["an", "a", "an", "a"]


def test_emoji_uses_base_emoji_with_images(small_root: Path) -> None:
    require_sources("emoji")
    package = locate("twemoji") / "package"  # type: ignore[operator]
    entries = emoji.usable_entries(package)
    assert len(entries) > 1800 and all(e["has_img_twitter"] and e["category"] != "Component" for e in entries)
    categories = {e["category"] for e in entries}
    assert len(categories) == 9
    for split in SPLITS:
        records = load_split("emoji", split, small_root)
        assert all(r["conversations"][1]["value"] in categories for r in records)
        assert {r["conversations"][0]["value"] for r in records} == {f"<image>\n{emoji.QUESTION}"}


def test_ocr_with_system_fonts(small_root: Path) -> None:
    require_sources("ocr")
    fonts = ocr.find_fonts()
    assert fonts and all(f.parent == ocr.FONT_DIR for f in fonts)
    words = set(ocr.WORDS)
    for split in SPLITS:
        for r in load_split("ocr", split, small_root):
            text = r["conversations"][1]["value"]
            assert text in words
    assert len(words) == len(ocr.WORDS) == 12
    rng = np.random.default_rng(0)
    image = ocr.render("Hello", fonts[0], rng)
    assert (
        image.size == (ocr.IMAGE_SIZE, ocr.IMAGE_SIZE)
        and len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 2
    )


def test_ocr_without_fonts_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(MissingAssetError, match="apt-get install fonts-dejavu-core"):
        ocr.find_fonts(tmp_path)


def test_majority_baseline() -> None:
    train = [record("yes"), record("no"), record("yes"), record("blue")]
    test = [record("yes"), record("no"), record("no"), record("red")]
    assert majority_baseline(train, test) == ("yes", 0.25)
    # Ties break on the answer text, not on order.
    assert majority_baseline([record("b"), record("a")], [record("a")]) == ("a", 1.0)
    with pytest.raises(DataError):
        majority_baseline([], test)
    by_question = [record("yes", "Is it?"), record("blue", "Colour?"), record("yes", "Is it?")]
    assert question_majority_baseline(by_question, [record("blue", "Colour?"), record("no", "Is it?")]) == 0.5


@pytest.mark.parametrize("name", NAMES)
def test_stats_match_the_splits(small_root: Path, name: str) -> None:
    require_sources(name)
    stats = load_stats(name, small_root)
    train, test = load_split(name, "train", small_root), load_split(name, "test", small_root)
    answer, accuracy = majority_baseline(train, test)
    assert stats["majority_answer"] == answer
    assert stats["majority_baseline"] == pytest.approx(accuracy, abs=1e-4)
    top = stats["top_answers"]["train"][0]
    assert top["answer"] == answer and top["count"] == sum(
        r["conversations"][1]["value"] == answer for r in train
    )


def _fake_builder(fail: bool) -> DatasetBuilder:
    def make(context: BuildContext, assets: Any) -> dict[str, list[Sample]]:
        samples = {}
        for split in SPLITS:
            samples[split] = []
            for i in range(context.size(split)):
                image = Image.new("RGB", (4, 4), (i, 0, 0))
                samples[split].append(Sample(context.save_image(split, f"{i}", image), "Q?", str(i % 2)))
                if fail and split == "test":
                    raise RuntimeError("crash in the middle of a build")
        return samples

    return DatasetBuilder("fake", "a fake", "none", "none", (), {"train": 3, "val": 2, "test": 2}, make)


def test_build_is_idempotent_and_atomic(tmp_path: Path) -> None:
    first = run_build(_fake_builder(fail=False), tmp_path)
    assert not first.skipped and first.stats["counts"] == {"train": 3, "val": 2, "test": 2}
    before = files_of(first.directory)
    assert run_build(_fake_builder(fail=False), tmp_path).skipped
    assert not run_build(_fake_builder(fail=False), tmp_path, force=True).skipped
    with pytest.raises(RuntimeError, match="crash"):
        run_build(_fake_builder(fail=True), tmp_path, force=True)
    assert files_of(first.directory) == before  # the previous build is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake"]  # no staging directory left over
    smaller = run_build(_fake_builder(fail=False), tmp_path, max_per_split=1)
    assert not smaller.skipped and smaller.stats["counts"] == {"train": 1, "val": 1, "test": 1}


def test_validate_records_rejects_bad_records() -> None:
    good = record("yes")
    validate_records([good], "ok")
    bad_turns = {**good, "conversations": [good["conversations"][1], good["conversations"][0]]}
    for bad in ({**good, "image": "/abs.png"}, {**good, "extra": 1}, bad_turns):
        with pytest.raises(DataError):
            validate_records([bad], "bad")
    with pytest.raises(DataError, match="unique"):
        validate_records([good, good], "dup")


def test_load_split_of_unbuilt_dataset_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(MissingAssetError, match="asymlora data build --only fashion"):
        load_split("fashion", "train", tmp_path)
    with pytest.raises(DataError, match="unknown built-in dataset"):
        build("nope", out_dir=tmp_path)


def test_load_split_names_the_file_and_line_of_a_damaged_split(tmp_path: Path) -> None:
    split = dataset_dir("fashion", tmp_path) / "train.json"
    split.parent.mkdir(parents=True)
    split.write_text('[\n{"id": "a",}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{split.name}, line 2, column 12: not valid JSON"):
        load_split("fashion", "train", tmp_path)
    split.write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(DataError, match=rf"{split.name}: not UTF-8 text .* at byte 9"):
        load_split("fashion", "train", tmp_path)


def test_cli_build_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_sources("ocr")
    require_sources("digits")
    parser = argparse.ArgumentParser(prog="asymlora")
    register_cli(parser.add_subparsers(dest="command"))
    argv = [
        "data",
        "build",
        "--only",
        "ocr",
        "digits",
        "--out",
        str(tmp_path),
        "--max-per-split",
        "4",
        "--seed",
        "2",
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "majority answer" in out and "ocr" in out and "digits" in out
    assert json.loads((tmp_path / "ocr" / "stats.json").read_text())["build"]["seed"] == 2
    args = parser.parse_args(argv)
    assert args.func(args) == 0 and "skipped" in capsys.readouterr().out
    args = parser.parse_args(["data", "list", "--out", str(tmp_path)])
    assert args.func(args) == 0 and "seed 2: 4/4/4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "build", "--max-per-split", "0"])


def test_build_all_defaults_to_every_dataset(tmp_path: Path) -> None:
    for name in NAMES:
        require_sources(name)
    results = build_all(out_dir=tmp_path, max_per_split=2)
    assert [r.name for r in results] == NAMES


def test_mix5_lists_the_five_datasets() -> None:
    mixture = yaml.safe_load(MIX5.read_text())
    assert mixture["name"] == "mix5"
    entries = mixture["datasets"]
    assert [e["builtin"] for e in entries] == NAMES
    assert all(e["name"] == e["task"] == e["builtin"] and e["weight"] > 0 for e in entries)


def test_cli_reports_a_missing_asset_and_builds_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    require_sources("ocr")

    def missing(name: str) -> Path:
        raise MissingAssetError(f"asset {name} is not installed. Run: asymlora setup --only {name}")

    monkeypatch.setattr("asymlora.builtin_data.common.require", missing)
    parser = argparse.ArgumentParser(prog="asymlora")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["data", "build", "--only", "fashion", "ocr", "--out", str(tmp_path), "--max-per-split", "2"]
    )
    assert args.func(args) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "asymlora setup --only fashion" in captured.err
    assert (tmp_path / "ocr" / "train.json").is_file() and not (tmp_path / "fashion").exists()
