"""Readers for the official local file layouts of six VLM benchmarks.

Each reader returns a list of :class:`EvalItem` (``id``, ``image`` path, ``question``, reference ``answers``,
benchmark-specific ``extra``). A malformed file raises :class:`~asymlora.errors.DataError` naming the file,
the record (index, key or line) and the field; a missing data file or image raises
:class:`MissingFileError` (a ``DataError`` and a ``FileNotFoundError``) naming the path and what refers to it.

=========  ====================================================  =========================================
name       ``data_path`` (a file, or the folder holding it)      images (default ``image_root``)
=========  ====================================================  =========================================
textvqa    ``TextVQA_0.5.1_val.json``: ``{"data": [{"question_   ``train_images/<image_id>.jpg`` next to the
           id", "image_id", "question", "answers": [10]}]}``     json
gqa        ``testdev_balanced_questions.json``: ``{qid:          ``images/<imageId>.jpg`` next to the json
           {"imageId", "question", "answer", "types",
           "groups", "isBalanced", ...}}``
vizwiz     ``val.json``: ``[{"image", "question", "answers":     ``val/<image>`` next to the json
           [{"answer", "answer_confidence"}], "answerable",
           "answer_type"}]``
scienceqa  ``problems.json``: ``{pid: {"question", "choices",    ``images/<split>/<pid>/<image>`` next to the
           "answer": int, "hint", "image", "split", ...}}``;     json; only problems of ``split`` (default
           the IMG subset                                        ``test``) with an image are read
mme        the ``MME_Benchmark_release_version`` folder: one     inside the subtask folders (``image_root``
           folder per subtask, either ``images/`` +              is not used)
           ``questions_answers_YN/<stem>.txt`` or images next
           to same-named ``.txt``; lines ``question<TAB>answer``
pope       ``coco_pope_<category>.json`` (JSON lines ``{"question_   COCO ``val2014/`` next to the file or its
           id", "image", "text", "label"}``) or a folder of them  folder's parent
=========  ====================================================  =========================================

:mod:`asymlora.evaluate.official.registry` reads, prompts and scores a benchmark by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asymlora.errors import DataError
from asymlora.evaluate.metrics.mme import PERCEPTION_SUBTASKS, SUBTASKS
from asymlora.evaluate.metrics.scienceqa import OPTIONS
from asymlora.evaluate.official.items import (
    EvalItem,
    MissingFileError,
    PathLike,
    check_limit,
    checked_image,
    data_file,
    find_image_root,
    require_field,
    string_list,
)
from asymlora.io import read_json

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")  # MME image lookup order


def read_textvqa(
    data_path: PathLike,
    image_root: PathLike | None = None,
    limit: int | None = None,
    check_images: bool = True,
) -> list[EvalItem]:
    """TextVQA val: ``id`` = question_id, ``answers`` = the 10 human answers.

    ``extra``: ``question_id``, ``image_id`` (and ``ocr_tokens`` when the record has them).
    """
    check_limit(limit)
    path = data_file(data_path, "TextVQA_0.5.1_val.json")
    document = read_json(path, "TextVQA_0.5.1_val.json")
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise DataError(f'{path}: expected an object with a "data" list (TextVQA_0.5.1 format)')
    root = find_image_root(
        image_root,
        [path.parent / "train_images", path.parent / "train_val_images" / "train_images"],
        "TextVQA",
    )
    items: list[EvalItem] = []
    for index, record in enumerate(document["data"]):
        if limit is not None and len(items) >= limit:
            break
        where = f"record {index} of data"
        question_id = require_field(record, "question_id", (int, str), path, where)
        where = f"record {index} of data (question_id {question_id})"
        image_id = require_field(record, "image_id", str, path, where)
        question = require_field(record, "question", str, path, where)
        answers = string_list(require_field(record, "answers", list, path, where), "answers", path, where)
        extra: dict[str, Any] = {"question_id": question_id, "image_id": image_id}
        if isinstance(record.get("ocr_tokens"), list):
            extra["ocr_tokens"] = list(record["ocr_tokens"])
        image = checked_image(root / f"{image_id}.jpg", check_images, f"{where} in {path}")
        items.append(EvalItem(str(question_id), image, question, answers, extra))
    return items


def read_gqa(
    data_path: PathLike,
    image_root: PathLike | None = None,
    limit: int | None = None,
    check_images: bool = True,
) -> list[EvalItem]:
    """GQA questions (testdev-balanced): ``id`` = question id, ``answers`` = ``[answer]``.

    ``extra``: ``structural`` (``types.structural``, or ``None``), ``global_group`` (``groups.global``, or
    ``None``), ``is_balanced`` (``isBalanced``, default true), ``full_answer`` (``fullAnswer``, or ``None``).
    """
    check_limit(limit)
    path = data_file(data_path, "testdev_balanced_questions.json")
    document = read_json(path, "GQA's testdev_balanced_questions.json")
    if not isinstance(document, dict):
        raise DataError(f"{path}: expected an object mapping question ids to questions")
    root = find_image_root(image_root, [path.parent / "images"], "GQA")
    items: list[EvalItem] = []
    for question_id, record in document.items():
        if limit is not None and len(items) >= limit:
            break
        where = f"question {question_id!r}"
        image_id = require_field(record, "imageId", str, path, where)
        question = require_field(record, "question", str, path, where)
        answer = require_field(record, "answer", str, path, where)
        types = record.get("types") or {}
        groups = record.get("groups") or {}
        if not isinstance(types, dict) or not isinstance(groups, dict):
            raise DataError(f"{path}: {where}: fields 'types' and 'groups' must be objects")
        structural = types.get("structural")
        if structural is not None and not isinstance(structural, str):
            raise DataError(f"{path}: {where}: field 'types.structural' must be a string")
        is_balanced = record.get("isBalanced", True)
        if not isinstance(is_balanced, bool):
            raise DataError(f"{path}: {where}: field 'isBalanced' must be true or false")
        extra = {
            "structural": structural,
            "global_group": groups.get("global"),
            "is_balanced": is_balanced,
            "full_answer": record.get("fullAnswer"),
        }
        image = checked_image(root / f"{image_id}.jpg", check_images, f"{where} in {path}")
        items.append(EvalItem(str(question_id), image, question, [answer], extra))
    return items


def read_vizwiz(
    data_path: PathLike,
    image_root: PathLike | None = None,
    limit: int | None = None,
    check_images: bool = True,
) -> list[EvalItem]:
    """VizWiz VQA (val): ``id`` = image file name, ``answers`` = the 10 human answers.

    ``extra``: ``answerable``, ``answer_type``, ``answer_confidence`` (list, aligned with ``answers``).
    A record without ``answers`` (the test split) gets ``answers == []``; such items can be generated for a
    server submission but not scored locally.
    """
    check_limit(limit)
    path = data_file(data_path, "val.json")
    document = read_json(path, "VizWiz's val.json")
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a list of questions (VizWiz format)")
    root = find_image_root(image_root, [path.parent / "val"], "VizWiz")
    items: list[EvalItem] = []
    for index, record in enumerate(document):
        if limit is not None and len(items) >= limit:
            break
        where = f"record {index}"
        image_name = require_field(record, "image", str, path, where)
        where = f"record {index} (image {image_name})"
        question = require_field(record, "question", str, path, where)
        raw_answers = record.get("answers", [])
        if not isinstance(raw_answers, list):
            raise DataError(f"{path}: {where}: field 'answers' must be a list")
        answers, confidences = [], []
        for k, entry in enumerate(raw_answers):
            answers.append(require_field(entry, "answer", str, path, f"{where}, answers[{k}]"))
            confidences.append(entry.get("answer_confidence"))
        extra = {
            "answerable": record.get("answerable"),
            "answer_type": record.get("answer_type"),
            "answer_confidence": confidences,
        }
        image = checked_image(root / image_name, check_images, f"{where} in {path}")
        items.append(EvalItem(image_name, image, question, answers, extra))
    return items


def format_scienceqa_question(question: str, choices: Sequence[str], hint: str = "") -> str:
    """LLaVA-1.5's ScienceQA question: ``Context: <hint>`` (if any), the question, ``A. <choice>`` lines."""
    lines = [f"Context: {hint}"] if hint else []
    lines.append(question)
    lines.extend(f"{letter}. {choice}" for letter, choice in zip(OPTIONS, choices))
    return "\n".join(lines)


def read_scienceqa(
    data_path: PathLike,
    image_root: PathLike | None = None,
    limit: int | None = None,
    check_images: bool = True,
    split: str = "test",
) -> list[EvalItem]:
    """ScienceQA-IMG: the problems of ``split`` that have an image (``id`` = problem id).

    ``question`` is :func:`format_scienceqa_question`; ``answers`` = ``[letter of the answer]``. ``extra``:
    ``answer_index``, ``num_choices``, ``choices``, ``hint``, ``raw_question``, ``subject``, ``grade``.
    """
    check_limit(limit)
    path = data_file(data_path, "problems.json")
    document = read_json(path, "ScienceQA's problems.json")
    if not isinstance(document, dict):
        raise DataError(f"{path}: expected an object mapping problem ids to problems")
    root = find_image_root(image_root, [path.parent / "images"], "ScienceQA")
    items: list[EvalItem] = []
    for problem_id, record in document.items():
        if limit is not None and len(items) >= limit:
            break
        where = f"problem {problem_id!r}"
        problem_split = require_field(record, "split", str, path, where)
        image_name = record.get("image")
        if image_name is not None and not isinstance(image_name, str):
            raise DataError(f"{path}: {where}: field 'image' must be a file name or null")
        if problem_split != split or not image_name:
            continue
        question = require_field(record, "question", str, path, where)
        choices = string_list(require_field(record, "choices", list, path, where), "choices", path, where)
        if len(choices) > len(OPTIONS):
            raise DataError(
                f"{path}: {where}: field 'choices' has {len(choices)} options, at most {len(OPTIONS)}"
            )
        answer = require_field(record, "answer", int, path, where)
        if not 0 <= answer < len(choices):
            raise DataError(
                f"{path}: {where}: field 'answer' is {answer}, not a choice index 0..{len(choices) - 1}"
            )
        hint = record.get("hint") or ""
        if not isinstance(hint, str):
            raise DataError(f"{path}: {where}: field 'hint' must be a string")
        extra = {
            "answer_index": answer,
            "num_choices": len(choices),
            "choices": choices,
            "hint": hint,
            "raw_question": question,
            "subject": record.get("subject"),
            "grade": record.get("grade"),
        }
        image = checked_image(
            root / split / str(problem_id) / image_name, check_images, f"{where} in {path}"
        )
        text = format_scienceqa_question(question, choices, hint)
        items.append(EvalItem(str(problem_id), image, text, [OPTIONS[answer]], extra))
    return items


def _mme_image(image_dir: Path, stem: str, txt: Path) -> Path:
    for suffix in IMAGE_SUFFIXES:
        candidate = image_dir / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise MissingFileError(
        f"{image_dir / stem}.*: image of {txt} not found (tried {', '.join(IMAGE_SUFFIXES)})"
    )


def read_mme(
    data_path: PathLike,
    image_root: PathLike | None = None,
    limit: int | None = None,
    check_images: bool = True,
    subtasks: Sequence[str] | None = None,
) -> list[EvalItem]:
    """MME: every question of the subtask folders present (in the official subtask order), or of ``subtasks``.

    ``id`` = ``<subtask>/<image file>/<question number in its file>``; ``answers`` = ``[Yes or No]`` as in the
    file. ``extra``: ``subtask``, ``image_key`` (``<subtask>/<image file>``, which groups the questions of an
    image for acc+), ``category`` (``perception`` or ``cognition``). Images are always looked up (their
    extension is not known beforehand), so ``check_images`` has no effect.
    """
    check_limit(limit)
    if image_root is not None:
        raise ValueError("MME images live in the subtask folders of data_path; image_root is not used")
    root = Path(data_path).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"{root}: MME folder not found (expected MME_Benchmark_release_version/)")
    wanted = list(SUBTASKS if subtasks is None else subtasks)
    unknown = [s for s in wanted if s not in SUBTASKS]
    if unknown:
        raise ValueError(f"unknown MME subtask(s) {unknown}; expected names from {list(SUBTASKS)}")
    present = [s for s in wanted if (root / s).is_dir()]
    if not present:
        raise MissingFileError(f"{root}: no MME subtask folder found (expected some of {', '.join(wanted)})")
    if subtasks is not None and len(present) < len(wanted):
        missing = [s for s in wanted if s not in present]
        raise MissingFileError(f"{root}: MME subtask folder(s) {', '.join(missing)} not found")
    items: list[EvalItem] = []
    for subtask in present:
        folder = root / subtask
        if (folder / "questions_answers_YN").is_dir():
            image_dir, text_dir = folder / "images", folder / "questions_answers_YN"
        else:
            image_dir, text_dir = folder, folder
        category = "perception" if subtask in PERCEPTION_SUBTASKS else "cognition"
        text_files = sorted(text_dir.glob("*.txt"))
        if not text_files:
            raise DataError(f"{text_dir}: no question files (*.txt) for MME subtask {subtask}")
        for txt in text_files:
            image = _mme_image(image_dir, txt.stem, txt)
            try:
                lines = txt.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as error:
                raise DataError(f"{txt}: not UTF-8 text ({error.reason} at byte {error.start})") from None
            number = 0
            for line_number, line in enumerate(lines, start=1):
                if limit is not None and len(items) >= limit:
                    return items
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) != 2:
                    raise DataError(
                        f"{txt}: line {line_number}: expected 'question<TAB>answer', got {len(fields)} fields"
                    )
                question, answer = fields[0].strip(), fields[1].strip()
                if not question:
                    raise DataError(f"{txt}: line {line_number}: field question is empty")
                if answer.lower() not in ("yes", "no"):
                    raise DataError(
                        f"{txt}: line {line_number}: field answer must be Yes or No, got {answer!r}"
                    )
                extra = {"subtask": subtask, "image_key": f"{subtask}/{image.name}", "category": category}
                items.append(EvalItem(f"{subtask}/{image.name}/{number}", image, question, [answer], extra))
                number += 1
    return items


def _pope_files(path: Path) -> tuple[list[Path], bool]:
    """(files, read_from_folder)."""
    if path.is_file():
        return [path], False
    if not path.is_dir():
        raise MissingFileError(f"{path}: POPE file or folder not found (expected coco_pope_<category>.json)")
    files = sorted(path.glob("coco_pope_*.json")) or sorted([*path.glob("*.jsonl"), *path.glob("*.json")])
    if not files:
        raise MissingFileError(f"{path}: no POPE question files (coco_pope_<category>.json) in this folder")
    return files, True


def read_pope(
    data_path: PathLike,
    image_root: PathLike | None = None,
    limit: int | None = None,
    check_images: bool = True,
) -> list[EvalItem]:
    """POPE: JSON-lines question files (``coco_pope_random.json`` etc.), one file or a folder of them.

    ``id`` = question_id (one file) or ``<category>/<question_id>`` (a folder; ids repeat across files);
    ``answers`` = ``[label]``. ``extra``: ``question_id``, ``category`` (the record's ``category`` field,
    else the file name without ``coco_pope_``).
    """
    check_limit(limit)
    path = Path(data_path).expanduser()
    files, from_folder = _pope_files(path)
    base = path if from_folder else path.parent
    root = find_image_root(image_root, [base / "val2014", base.parent / "val2014"], "POPE (COCO val2014)")
    items: list[EvalItem] = []
    for file in files:
        default_category = file.stem.removeprefix("coco_pope_")
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise DataError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        for line_number, line in enumerate(lines, start=1):
            if limit is not None and len(items) >= limit:
                return items
            if not line.strip():
                continue
            where = f"line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{file}: {where}: invalid JSON ({error.msg})") from None
            question_id = require_field(record, "question_id", (int, str), file, where)
            image_name = require_field(record, "image", str, file, where)
            question = require_field(record, "text", str, file, where)
            label = require_field(record, "label", str, file, where)
            if label not in ("yes", "no"):
                raise DataError(f"{file}: {where}: field 'label' must be 'yes' or 'no', got {label!r}")
            category = record.get("category", default_category)
            if not isinstance(category, str):
                raise DataError(f"{file}: {where}: field 'category' must be a string")
            item_id = f"{category}/{question_id}" if from_folder else str(question_id)
            image = checked_image(root / image_name, check_images, f"{where} of {file}")
            extra = {"question_id": question_id, "category": category}
            items.append(EvalItem(item_id, image, question, [label], extra))
    return items
