"""Read instruction data (LLaVA JSON / JSONL, TRL / ms-swift ``messages`` + ``images``, or a LLaMA-Factory
dataset described by a :class:`RecordFormat`) into samples.

Every record becomes a :class:`Sample`: ``messages`` (``{"role": "user" | "assistant" | "system",
"content": str}``, with one ``<image>`` placeholder at each image's position), absolute image paths, an
optional task name and the ``file:line`` where the record starts.

Accepted records (one JSON list of them, or JSON Lines with one per line)::

    {"id": "1", "image": "a.png" | ["a.png", "b.png"], "task": "vqa",            # LLaVA
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}

    {"id": "1", "images": ["a.png"], "task": "vqa",                                # TRL / HF messages
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": "A cat."}]}

    {"images": [{"path": "a.png"}], "messages": [{"role": "user", "content": "<image>What is it?"},   # ms-swift
                                                 {"role": "assistant", "content": "A cat."}]}

A :class:`RecordFormat` (built from an entry of LLaMA-Factory's ``dataset_info.json``) reads records with
the column names and role tags given there, in its ``sharegpt`` or ``alpaca`` formatting.

Validation reports ``file:line: field: problem`` for: malformed JSON or a record that is not an
object, missing or wrongly typed fields, unknown roles, turns that do not alternate user/assistant or
have no assistant reply (with ``require_reply=False``, for prediction: no user turn), missing or
undecodable image files (:mod:`asymlora.data.images`), ``<image>`` placeholders that do not match the number of
images, and more images than the model family takes. ``on_error="fail"`` (default) raises one
:class:`~asymlora.errors.DataError` listing every problem; ``"skip"`` drops the bad samples, logs a
summary and counts them, grouped by reason, in the :class:`ReadReport`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asymlora.config import IMAGE_TOKEN
from asymlora.data.images import MISSING as MISSING_IMAGE
from asymlora.data.images import image_problem
from asymlora.data.records import (
    IMAGE_TOKENS,
    MALFORMED_JSON,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    TOO_MANY_IMAGES,
    WRONG_TYPE,
    RecordError,
    chat_messages,
    check_turns,
    image_list,
    image_paths,
    llava_messages,
    type_name,
)
from asymlora.data.registry import RecordFormat
from asymlora.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
FROM_RECORD = "from_record"  # task=FROM_RECORD: each record's own "task" field (required)
MAX_LISTED = 20  # problems listed in one DataError; the rest are counted ("and N more")
_JSON_SPACE = " \t\r\n"

@dataclass
class Sample:
    """One conversation with its images, normalised from any supported format.

    ``messages`` hold string content with ``<image>`` where each of ``images`` goes (in order);
    ``source`` is ``"file:line"`` of the record; ``dataset`` is the mixture entry it came from.
    """

    id: str
    messages: list[dict[str, str]]
    images: list[Path] = field(default_factory=list)
    task: str | None = None
    source: str = ""
    dataset: str | None = None


@dataclass(frozen=True)
class Problem:
    """One rejected record: where it starts, which field is wrong, what is wrong, and the reason kind."""

    source: str
    field: str
    message: str
    kind: str

    def __str__(self) -> str:
        return f"{self.source}: {self.field}: {self.message}"


@dataclass
class ReadReport:
    """What :func:`read_samples_with_report` found in one file: counts and the rejected records."""

    path: Path
    total: int = 0
    kept: int = 0
    problems: list[Problem] = field(default_factory=list)
    overridden: int = 0  # kept records whose own "task" differs from the task given for the file
    overridden_example: str = ""  # the first of them: "file:line: 'task'"

    @property
    def skipped(self) -> int:
        """Records dropped (only non-zero in ``on_error="skip"`` mode)."""
        return self.total - self.kept

    @property
    def reasons(self) -> dict[str, int]:
        """Rejected records per reason kind, most frequent first."""
        return dict(Counter(p.kind for p in self.problems).most_common())

    def summary(self) -> str:
        """One line: kept/total, and for each reason its count and its first example."""
        text = f"{self.path}: kept {self.kept} of {self.total} samples"
        if not self.problems:
            return text
        first: dict[str, Problem] = {}
        for problem in self.problems:
            first.setdefault(problem.kind, problem)
        grouped = "; ".join(f"{kind}: {n} (e.g. {first[kind]})" for kind, n in self.reasons.items())
        return f"{text}; skipped {len(self.problems)}: {grouped}"


@dataclass(frozen=True)
class _BadLine:
    """A JSON Lines line that does not parse (the rest of the file is still read)."""

    message: str


def iter_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line, record) for each element of a JSON list, or each non-blank line of a JSON Lines file.

    ``line`` is the 1-based line on which the record starts. A JSON Lines line that does not parse is
    yielded as a ``_BadLine`` (so every bad line is reported); a JSON list that does not parse stops
    with a DataError at the line of the error, since nothing after it can be located reliably.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    if start == len(text):
        raise DataError(f"{path}: the file is empty; expected a JSON list of samples or JSON Lines")
    if text[start] == "[" and path.suffix != ".jsonl":
        yield from _json_list(path, text, start)
    elif text[start] == "{" or path.suffix == ".jsonl":
        yield from _json_lines(path, text)
    else:
        line = text.count("\n", 0, start) + 1
        raise DataError(f"{path}:{line}: expected a JSON list of samples ([{{...}}, ...]) or JSON Lines "
                        f"(one object per line), found {text[start:start + 20]!r}")


def _json_lines(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == 1 and path.suffix != ".jsonl" and _is_one_object(text):
                raise DataError(f"{path}:1: the file holds one JSON object; expected a list of samples "
                                "([{...}, {...}]) or JSON Lines (one object per line)") from None
            yield number, _BadLine(f"not valid JSON: {err.msg} (column {err.colno})")
            continue
        yield number, record


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _json_list(path: Path, text: str, start: int) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    counted, line = 0, 1

    def line_at(position: int) -> int:  # newlines are counted once, incrementally (files can be GBs)
        nonlocal counted, line
        line += text.count("\n", counted, position)
        counted = position
        return line

    def skip_space(position: int) -> int:
        while position < len(text) and text[position] in _JSON_SPACE:
            position += 1
        return position

    position = skip_space(start + 1)
    if position < len(text) and text[position] == "]":
        position += 1
    else:
        while True:
            element_line = line_at(position)
            try:
                record, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
            yield element_line, record
            position = skip_space(position)
            if position >= len(text):
                raise DataError(f"{path}:{line_at(position)}: not valid JSON: the list is not closed with ']'")
            if text[position] == "]":
                position += 1
                break
            if text[position] != ",":
                raise DataError(f"{path}:{line_at(position)}: not valid JSON: expected ',' or ']' after the "
                                f"sample that starts on line {element_line}")
            position = skip_space(position + 1)
    position = skip_space(position)
    if position < len(text):
        raise DataError(f"{path}:{line_at(position)}: not valid JSON: extra data after the closing ']'")


@dataclass
class _Options:
    path: Path
    image_folder: Path
    task: str | None
    max_images_per_sample: int | None
    auto_insert_image_token: bool
    check_images: bool
    record_format: RecordFormat | None = None
    require_reply: bool = True
    found: dict[str, tuple[str, str] | None] = field(default_factory=dict)  # image -> problem (images repeat)

    def __post_init__(self) -> None:
        self.folder = str(self.image_folder.expanduser().resolve())  # resolved once: pathlib per image is slow

    def image_path(self, name: str) -> str:
        """The absolute, normalised path of image ``name`` (relative to the image folder)."""
        return os.path.normpath(os.path.join(self.folder, os.path.expanduser(name)))

    def problem(self, image: str) -> tuple[str, str] | None:
        if image not in self.found:
            self.found[image] = image_problem(image)
        return self.found[image]


def _parse_record(record: Any, index: int, options: _Options) -> tuple[Sample, bool]:
    """One record -> (Sample, whether the record's own task differs from the task given for the file); raises
    RecordError on the first problem found."""
    if isinstance(record, _BadLine):
        raise RecordError("record", record.message, MALFORMED_JSON)
    if not isinstance(record, dict):
        raise RecordError("record", f"expected a JSON object, got {type_name(record)}", NOT_AN_OBJECT)
    inline_images: list[str] = []
    if options.record_format is not None:
        messages, key, role_field, shift = options.record_format.messages(record)
        check_turns(messages, key, role_field, shift, options.require_reply)
        image_key = options.record_format.columns.get("images")
        images = image_paths(record.get(image_key), image_key) if image_key else []
        image_key = image_key or "images"
    else:
        if "conversations" in record and "messages" in record:
            raise RecordError("messages", "give either 'conversations' (LLaVA) or 'messages', not both",
                               WRONG_TYPE)
        if "conversations" in record:
            messages, key = llava_messages(record), "conversations"
        elif "messages" in record:
            messages, key = chat_messages(record, inline_images), "messages"
        else:
            raise RecordError("conversations", "missing: a sample needs 'conversations' (LLaVA format) or "
                                                "'messages' (messages format)", MISSING_FIELD)
        check_turns(messages, key, "from" if key == "conversations" else "role",
                     require_reply=options.require_reply)
        images, image_key = image_list(record, "image" if key == "conversations" else "images")
    if inline_images:
        if images:
            raise RecordError(image_key, "images are given both here and inside message parts; give them "
                                          "in one place", WRONG_TYPE)
        images, image_key = inline_images, "messages"
    limit = options.max_images_per_sample
    if limit is not None and len(images) > limit:
        raise RecordError(image_key, f"{len(images)} images, but this model family takes at most {limit} per "
                                      "sample", TOO_MANY_IMAGES)
    placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if placeholders == 0 and len(images) == 1 and options.auto_insert_image_token:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = f"{IMAGE_TOKEN}\n{first_user['content']}"
        placeholders = 1
    if placeholders != len(images):
        if placeholders == 0 and len(images) == 1:
            hint = f"; put {IMAGE_TOKEN} where the image goes, or set auto_insert_image_token"
        elif placeholders == 0:
            hint = f"; put one {IMAGE_TOKEN} where each image goes"
        else:
            hint = ""
        raise RecordError(key, f"{placeholders} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s) in "
                                f"'{image_key}'{hint}", IMAGE_TOKENS)
    resolved = []
    for i, name in enumerate(images):
        image = options.image_path(name)
        problem = options.problem(image) if options.check_images else None
        if problem is not None:
            if inline_images:
                where = f"messages (image part {i + 1})"
            else:
                where = f"{image_key}[{i}]" if isinstance(record.get(image_key), list) else image_key
            raise RecordError(where, problem[1], problem[0])
        resolved.append(Path(image))
    own_task = record.get("task")
    overridden = False
    if options.task is not None and options.task != FROM_RECORD:
        sample_task: str | None = options.task
        overridden = own_task is not None and own_task != options.task
    else:
        if own_task is None and options.task == FROM_RECORD:
            raise RecordError("task", "missing: this dataset's tasks come from the records (task: from_record), "
                                       "so every record needs a 'task'", MISSING_FIELD)
        if own_task is not None and (not isinstance(own_task, str) or not own_task):
            raise RecordError("task", f"expected a non-empty string, got {own_task!r}", WRONG_TYPE)
        sample_task = own_task
    sample_id = record.get("id", f"{options.path.stem}-{index}")
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        raise RecordError("id", f"expected a string or an integer, got {type_name(sample_id)}", WRONG_TYPE)
    return Sample(id=str(sample_id), messages=messages, images=resolved, task=sample_task), overridden


def read_samples(path: str | Path, image_folder: str | Path | None = None, on_error: str = "fail",
                 task: str | None = None, max_images_per_sample: int | None = None,
                 auto_insert_image_token: bool = False, check_images: bool = True,
                 record_format: RecordFormat | None = None, require_reply: bool = True) -> list[Sample]:
    """Read a LLaVA JSON/JSONL, messages-format (TRL, ms-swift) or ``record_format`` file into samples.

    Same arguments as :func:`read_samples_with_report`, which also returns the :class:`ReadReport`.
    """
    return read_samples_with_report(path, image_folder, on_error, task, max_images_per_sample,
                                    auto_insert_image_token, check_images, record_format, require_reply)[0]


def read_samples_with_report(path: str | Path, image_folder: str | Path | None = None, on_error: str = "fail",
                             task: str | None = None, max_images_per_sample: int | None = None,
                             auto_insert_image_token: bool = False, check_images: bool = True,
                             record_format: RecordFormat | None = None, require_reply: bool = True,
                             ) -> tuple[list[Sample], ReadReport]:
    """Samples of one file and a report of what was kept and why the rest was not.

    Args:
        path: a JSON list of records or JSON Lines (``.jsonl``, or any file starting with ``{``).
        image_folder: where relative image paths resolve (default: the directory of ``path``).
        on_error: ``"fail"`` raises one DataError listing every bad record (``file:line: field:
            message``); ``"skip"`` drops bad records, logs :meth:`ReadReport.summary` and returns the rest.
            A JSON list that does not parse at all fails in both modes.
        task: the task of every sample: a name (it replaces the records' own ``task``; records whose own
            task differs are counted in :attr:`ReadReport.overridden` and logged in one warning), or
            ``"from_record"`` (each record's own ``task``, which every record must have). None: the records'
            own ``task`` where they have one, else None.
        max_images_per_sample: reject records with more images (1 for single-image model families).
        auto_insert_image_token: for a record with exactly one image and no ``<image>`` placeholder,
            put ``<image>\\n`` at the start of the first user turn instead of rejecting it.
        check_images: check that every image file exists and decodes (once per file).
        record_format: the column names and role tags of a LLaMA-Factory dataset (:class:`RecordFormat`);
            None reads LLaVA and messages records.
        require_reply: a record needs an assistant reply (training data); ``False`` accepts records that end
            with the user turn to answer (prediction input).

    Raises:
        DataError: a bad record (``on_error="fail"``), or a file with no usable sample.
    """
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error: {on_error!r} is not one of {ON_ERROR}")
    if max_images_per_sample is not None and (isinstance(max_images_per_sample, bool)
                                              or not isinstance(max_images_per_sample, int)
                                              or max_images_per_sample < 0):
        raise ConfigError(f"max_images_per_sample: expected an integer >= 0 or None, got {max_images_per_sample!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    folder = Path(image_folder).expanduser() if image_folder is not None else path.parent
    options = _Options(path=path, image_folder=folder, task=task, max_images_per_sample=max_images_per_sample,
                       auto_insert_image_token=auto_insert_image_token, check_images=check_images,
                       record_format=record_format, require_reply=require_reply)
    report = ReadReport(path=path)
    samples = []
    for index, (line, record) in enumerate(iter_records(path)):
        report.total += 1
        try:
            sample, overridden = _parse_record(record, index, options)
        except RecordError as err:
            report.problems.append(Problem(f"{path}:{line}", err.field_name, err.message, err.kind))
            continue
        sample.source = f"{path}:{line}"
        if overridden:
            report.overridden += 1
            report.overridden_example = report.overridden_example or f"{sample.source}: {record['task']!r}"
        samples.append(sample)
    report.kept = len(samples)
    if report.total == 0:
        raise DataError(f"{path}: no samples (the list is empty)")
    if report.problems and (on_error == "fail" or not samples):
        raise DataError(_failure_message(report, folder))
    if report.problems:
        logger.warning("%s", report.summary())
    if report.overridden:
        logger.warning("%s: %d of %d samples carry their own 'task' that differs from %r (e.g. %s); %r is used "
                       "(a mixture entry with 'task: from_record' takes the records' own)", path,
                       report.overridden, report.kept, task, report.overridden_example, task)
    return samples, report


def _failure_message(report: ReadReport, folder: Path) -> str:
    count = len(report.problems)
    if report.kept:
        head = f"{count} of {report.total} samples in {report.path} are invalid (on_error='skip' drops them):"
    else:
        head = f"none of the {report.total} samples in {report.path} is valid:"
    listed = [str(p) for p in report.problems[:MAX_LISTED]]
    if count > MAX_LISTED:
        listed.append(f"and {count - MAX_LISTED} more")
    if any(p.kind == MISSING_IMAGE for p in report.problems):
        listed.append(f"(relative image paths resolve against {folder}; pass image_folder to change that)")
    return "\n".join([head, *listed])
