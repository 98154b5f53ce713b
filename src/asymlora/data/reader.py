"""Read instruction data (LLaVA JSON / JSONL, or TRL-style ``messages`` + ``images``) into samples.

Every sample becomes a :class:`Sample`: ``messages`` (role + string content, with ``<image>`` at each
image's position), absolute image paths, an optional task name and its ``file:line`` origin.

Validation reports ``file:line: field: problem`` for: malformed JSON or a record that is not an
object, missing or wrongly typed fields, unknown roles, turns that do not alternate user/assistant or
have no assistant reply, missing image files, ``<image>`` placeholders that do not match the number of
images, and more images than the model family supports. ``on_error="fail"`` (default) raises one
:class:`~asymlora.errors.DataError` listing the problems; ``"skip"`` drops bad samples and counts them
in the :class:`ReadReport`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asymlora.errors import DataError

IMAGE_TOKEN = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGE_ROLES = ("user", "assistant", "system")
MAX_LISTED = 20


@dataclass
class Sample:
    """One conversation with its images, normalised from any supported format."""

    id: str
    messages: list[dict[str, str]]
    images: list[Path] = field(default_factory=list)
    task: str | None = None
    source: str = ""
    dataset: str | None = None


@dataclass
class ReadReport:
    """What :func:`read_samples` found in one file."""

    path: Path
    total: int = 0
    kept: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.total - self.kept

    def summary(self) -> str:
        reasons = Counter(p.split(": ", 2)[1] if p.count(": ") >= 2 else p for p in self.problems)
        grouped = ", ".join(f"{field_name}: {n}" for field_name, n in reasons.most_common())
        return f"{self.path}: kept {self.kept} of {self.total} samples" + (
            f"; skipped {self.skipped} ({grouped})" if self.skipped else "")


class _RecordError(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")


def iter_records(path: Path) -> list[tuple[int, Any]]:
    """(line, record) for each element of a JSON list or each line of a JSONL file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or (stripped and stripped[0] == "{"):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON: {err.msg} (column {err.colno})") from None
        return records
    decoder = json.JSONDecoder()
    position = len(text) - len(stripped)
    if not stripped or stripped[0] != "[":
        raise DataError(f"{path}:1: expected a JSON list of samples or JSON Lines (one object per line)")
    position += 1
    records = []
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text):
            raise DataError(f"{path}:{text.count(chr(10), 0, position) + 1}: not valid JSON: the list is not closed")
        if text[position] == "]":
            break
        line = text.count("\n", 0, position) + 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
        records.append((line, record))
    return records


def _llava_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise _RecordError("conversations", "expected a non-empty list of {from, value} turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _RecordError(f"conversations[{i}]", "expected an object with 'from' and 'value'")
        role = turn.get("from")
        if role not in LLAVA_ROLES:
            raise _RecordError(f"conversations[{i}].from", f"{role!r} is not one of {sorted(LLAVA_ROLES)}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise _RecordError(f"conversations[{i}].value", f"expected a string, got {type(value).__name__}")
        messages.append({"role": LLAVA_ROLES[role], "content": value})
    return messages


def _chat_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = record["messages"]
    if not isinstance(turns, list) or not turns:
        raise _RecordError("messages", "expected a non-empty list of {role, content} messages")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _RecordError(f"messages[{i}]", "expected an object with 'role' and 'content'")
        role = turn.get("role")
        if role not in MESSAGE_ROLES:
            raise _RecordError(f"messages[{i}].role", f"{role!r} is not one of {list(MESSAGE_ROLES)}")
        content = turn.get("content")
        if isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    pieces.append(IMAGE_TOKEN)
                elif kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                else:
                    raise _RecordError(f"messages[{i}].content[{j}]",
                                       "expected {'type': 'image'} or {'type': 'text', 'text': str}")
            content = "".join(pieces)
        if not isinstance(content, str):
            raise _RecordError(f"messages[{i}].content", f"expected a string or a list of parts, got "
                                                          f"{type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def _check_turns(messages: list[dict[str, str]], key: str) -> None:
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise _RecordError(key, f"turn {i + 1} is {message['role']!r}, expected {expected!r} (turns must "
                                    "alternate user/assistant, starting with user)")
    if not any(m["role"] == "assistant" for m in body):
        raise _RecordError(key, "no assistant reply to learn from")


def _image_list(record: dict[str, Any]) -> list[str]:
    value = record.get("images", record.get("image"))
    key = "images" if "images" in record else "image"
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _RecordError(key, "expected a path or a list of paths")


def parse_record(record: Any, *, index: int, path: Path, image_folder: Path, task: str | None,
                 max_images_per_sample: int | None, auto_insert_image_token: bool, check_images: bool) -> Sample:
    """One record -> Sample; raises _RecordError(field, message) on a problem."""
    if not isinstance(record, dict):
        raise _RecordError("record", f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        messages, key = _llava_messages(record), "conversations"
    elif "messages" in record:
        messages, key = _chat_messages(record), "messages"
    else:
        raise _RecordError("conversations", "missing: a sample needs 'conversations' (LLaVA) or 'messages'")
    _check_turns(messages, key)
    images = _image_list(record)
    if max_images_per_sample is not None and len(images) > max_images_per_sample:
        raise _RecordError("image", f"{len(images)} images, but this model family takes at most "
                                    f"{max_images_per_sample} per sample")
    placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if images and placeholders == 0 and auto_insert_image_token:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = IMAGE_TOKEN * len(images) + "\n" + first_user["content"]
        placeholders = len(images)
    if placeholders != len(images):
        raise _RecordError(key, f"{placeholders} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s)"
                                + ("; set auto_insert_image_token to add them" if placeholders == 0 else ""))
    resolved = []
    for name in images:
        image_path = (image_folder / name).resolve()
        if check_images and not image_path.is_file():
            raise _RecordError("image", f"file not found: {image_path}")
        resolved.append(image_path)
    sample_task = record.get("task", task) if task is None else task
    if sample_task is not None and not isinstance(sample_task, str):
        raise _RecordError("task", f"expected a string, got {type(sample_task).__name__}")
    sample_id = record.get("id", f"{path.stem}-{index}")
    return Sample(id=str(sample_id), messages=messages, images=resolved, task=sample_task, source="")


def read_samples(path: str | Path, image_folder: str | Path | None = None, on_error: str = "fail",
                 task: str | None = None, max_images_per_sample: int | None = None,
                 auto_insert_image_token: bool = False, check_images: bool = True) -> list[Sample]:
    """Read a LLaVA JSON/JSONL or messages-format file; see :func:`read_samples_with_report`."""
    return read_samples_with_report(path, image_folder, on_error, task, max_images_per_sample,
                                    auto_insert_image_token, check_images)[0]


def read_samples_with_report(path: str | Path, image_folder: str | Path | None = None, on_error: str = "fail",
                             task: str | None = None, max_images_per_sample: int | None = None,
                             auto_insert_image_token: bool = False, check_images: bool = True,
                             ) -> tuple[list[Sample], ReadReport]:
    """Samples and a report. ``task`` overrides each record's ``task`` field; images resolve against
    ``image_folder`` (default: the file's directory)."""
    if on_error not in ("fail", "skip"):
        raise DataError(f"on_error: {on_error!r} is not one of ('fail', 'skip')")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    folder = Path(image_folder) if image_folder is not None else path.parent
    report = ReadReport(path=path)
    samples = []
    for index, (line, record) in enumerate(iter_records(path)):
        report.total += 1
        try:
            sample = parse_record(record, index=index, path=path, image_folder=folder, task=task,
                                  max_images_per_sample=max_images_per_sample,
                                  auto_insert_image_token=auto_insert_image_token, check_images=check_images)
        except _RecordError as err:
            report.problems.append(f"{path}:{line}: {err}")
            continue
        sample.source = f"{path}:{line}"
        samples.append(sample)
    report.kept = len(samples)
    if report.problems and on_error == "fail":
        listed = report.problems[:MAX_LISTED]
        more = len(report.problems) - len(listed)
        raise DataError(f"{len(report.problems)} malformed sample(s) in {path} (set on_error: skip to drop them):\n"
                        + "\n".join(listed) + (f"\nand {more} more" if more else ""))
    return samples, report
