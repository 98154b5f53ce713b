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
have no assistant reply, missing image files, ``<image>`` placeholders that do not match the number of
images, and more images than the model family takes. ``on_error="fail"`` (default) raises one
:class:`~asymlora.errors.DataError` listing every problem; ``"skip"`` drops the bad samples, logs a
summary and counts them, grouped by reason, in the :class:`ReadReport`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asymlora.config import IMAGE_TOKEN
from asymlora.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# LLaVA ``from`` values and the role each becomes; ShareGPT-style data also uses user/assistant here.
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGE_ROLES = ("user", "assistant", "system")
ON_ERROR = ("fail", "skip")
FROM_RECORD = "from_record"  # task=FROM_RECORD: each record's own "task" field (required)
FORMATTINGS = ("sharegpt", "alpaca")
MAX_LISTED = 20  # problems listed in one DataError; the rest are counted ("and N more")
_JSON_SPACE = " \t\r\n"

# Reasons a record is rejected (the ``kind`` of a Problem); skip mode groups its count by these.
MALFORMED_JSON = "malformed JSON"
NOT_AN_OBJECT = "not an object"
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
UNKNOWN_ROLE = "unknown role"
TURN_ORDER = "turns out of order"
NO_REPLY = "no assistant reply"
MISSING_IMAGE = "missing image file"
IMAGE_TOKENS = "<image> count mismatch"
TOO_MANY_IMAGES = "too many images"


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


class _RecordError(Exception):
    """A problem with one record: the field it concerns, the message and the reason kind."""

    def __init__(self, field_name: str, message: str, kind: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name, self.message, self.kind = field_name, message, kind


@dataclass(frozen=True)
class _BadLine:
    """A JSON Lines line that does not parse (the rest of the file is still read)."""

    message: str


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


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


def _text_field(value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        kind = MISSING_FIELD if value is None else WRONG_TYPE
        raise _RecordError(field_name, f"expected a string, got {_type_name(value)}", kind)
    return value


def _turn_list(record: dict[str, Any], key: str, shape: str) -> list[Any]:
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if turns == [] else _type_name(turns)
        raise _RecordError(key, f"expected a non-empty list of {shape} turns, got {got}", WRONG_TYPE)
    return turns


def _llava_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    messages = []
    for i, turn in enumerate(_turn_list(record, "conversations", "{from, value}")):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise _RecordError(where, f"expected an object with 'from' and 'value', got {_type_name(turn)}",
                               WRONG_TYPE)
        role = turn.get("from")
        if role not in LLAVA_ROLES:
            kind = MISSING_FIELD if role is None else UNKNOWN_ROLE
            raise _RecordError(f"{where}.from", f"{role!r} is not one of {sorted(LLAVA_ROLES)}", kind)
        messages.append({"role": LLAVA_ROLES[role], "content": _text_field(turn.get("value"), f"{where}.value")})
    return messages


def _content_text(content: Any, where: str, inline_images: list[str]) -> str:
    """String content, or structured parts joined with ``<image>`` at each image part."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        kind = MISSING_FIELD if content is None else WRONG_TYPE
        raise _RecordError(f"{where}.content", f"expected a string or a list of parts, got {_type_name(content)}",
                           kind)
    pieces = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_TOKEN)
            inline = next((part[k] for k in ("path", "image", "url") if isinstance(part.get(k), str)), None)
            if inline is not None:
                if re.match(r"^(https?|data):", inline):
                    raise _RecordError(f"{where}.content[{j}]", f"remote or inline image {inline[:40]!r}: "
                                       "download it and give a file path", WRONG_TYPE)
                inline_images.append(inline)
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise _RecordError(f"{where}.content[{j}]", "expected {'type': 'image'} or {'type': 'text', "
                               f"'text': str}}, got {json.dumps(part)[:60]}", WRONG_TYPE)
    return "".join(pieces)


def _chat_messages(record: dict[str, Any], inline_images: list[str]) -> list[dict[str, str]]:
    messages = []
    for i, turn in enumerate(_turn_list(record, "messages", "{role, content}")):
        where = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise _RecordError(where, f"expected an object with 'role' and 'content', got {_type_name(turn)}",
                               WRONG_TYPE)
        role = turn.get("role")
        if role not in MESSAGE_ROLES:
            kind = MISSING_FIELD if role is None else UNKNOWN_ROLE
            raise _RecordError(f"{where}.role", f"{role!r} is not one of {list(MESSAGE_ROLES)}", kind)
        messages.append({"role": role, "content": _content_text(turn.get("content"), where, inline_images)})
    return messages


# LLaMA-Factory's dataset_info.json: the columns and role tags each formatting reads, with its defaults.
FORMAT_COLUMNS: dict[str, dict[str, str | None]] = {
    "sharegpt": {"messages": "conversations", "system": None, "images": None},
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None,
               "images": None},
}
FORMAT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
               "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call"}


@dataclass(frozen=True)
class RecordFormat:
    """How the records of a dataset registered in LLaMA-Factory's ``dataset_info.json`` are laid out.

    ``formatting`` is ``sharegpt`` (the turns are a list under ``columns["messages"]``; each turn's role is
    under ``tags["role_tag"]`` and its text under ``tags["content_tag"]``; ``user_tag``, ``assistant_tag``
    and ``system_tag`` are the role values) or ``alpaca`` (one exchange: ``prompt`` + ``"\\n"`` + ``query``
    -> ``response``, after the ``[prompt, response]`` pairs of ``history``). ``columns["images"]`` names the
    image column (none: the records are read as text only); ``columns["system"]`` a system-prompt column.
    ``columns`` and ``tags`` hold every key, LLaMA-Factory's defaults filled in (:meth:`from_registry`).
    """

    formatting: str = "sharegpt"
    columns: dict[str, str | None] = field(default_factory=lambda: dict(FORMAT_COLUMNS["sharegpt"]))
    tags: dict[str, str] = field(default_factory=lambda: dict(FORMAT_TAGS))

    @classmethod
    def from_registry(cls, spec: dict[str, Any], where: str) -> RecordFormat:
        """The format of one ``dataset_info.json`` entry; ConfigError names ``where`` and the key for a
        formatting, column or tag this reader does not take."""
        formatting = spec.get("formatting", "alpaca")
        if formatting not in FORMATTINGS:
            raise ConfigError(f"{where}: formatting: {formatting!r} is not one of {FORMATTINGS}")
        columns: dict[str, str | None] = dict(FORMAT_COLUMNS[formatting])
        tags = dict(FORMAT_TAGS)
        for key, given, known in (("columns", spec.get("columns"), columns), ("tags", spec.get("tags"), tags)):
            if given is None:
                continue
            if not isinstance(given, dict):
                raise ConfigError(f"{where}: {key}: expected an object, got {_type_name(given)}")
            for name, value in given.items():
                if name not in known:
                    raise ConfigError(f"{where}: {key}.{name}: not read by asymlora ({formatting} formatting reads "
                                      f"{', '.join(known)}); remove it or convert that data")
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"{where}: {key}.{name}: expected a non-empty string, got {value!r}")
                known[name] = value
        return cls(formatting=formatting, columns=columns, tags=tags)

    def messages(self, record: dict[str, Any]) -> tuple[list[dict[str, str]], str, str, int]:
        """(messages, the record's key for turn errors, its role field, turns added before the key's list)."""
        system_column = self.columns.get("system")
        system = record.get(system_column) if system_column else None
        if system is not None:
            system = _text_field(system, str(system_column))
        if self.formatting == "alpaca":
            return self._alpaca(record, system)
        key, tags = str(self.columns["messages"]), self.tags
        roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
        tool_roles = (tags["observation_tag"], tags["function_tag"])
        if key not in record:
            raise _RecordError(key, "missing: the registry's columns.messages names this field (default: "
                                    "conversations)", MISSING_FIELD)
        messages = []
        for i, turn in enumerate(_turn_list(record, key, f"{{{tags['role_tag']}, {tags['content_tag']}}}")):
            where = f"{key}[{i}]"
            if not isinstance(turn, dict):
                raise _RecordError(where, f"expected an object with '{tags['role_tag']}' and '{tags['content_tag']}', "
                                   f"got {_type_name(turn)}", WRONG_TYPE)
            role = turn.get(tags["role_tag"])
            if role in tool_roles:
                raise _RecordError(f"{where}.{tags['role_tag']}", f"{role!r}: tool turns are not supported",
                                   UNKNOWN_ROLE)
            if role not in roles:
                kind = MISSING_FIELD if role is None else UNKNOWN_ROLE
                raise _RecordError(f"{where}.{tags['role_tag']}", f"{role!r} is not one of {list(roles)} (the "
                                   "registry's user_tag, assistant_tag, system_tag)", kind)
            messages.append({"role": roles[role],
                             "content": _text_field(turn.get(tags["content_tag"]), f"{where}.{tags['content_tag']}")})
        shift = 0
        if system and messages[0]["role"] != "system":  # a system turn in the list wins over the column
            messages.insert(0, {"role": "system", "content": system})
            shift = 1
        return messages, key, tags["role_tag"], shift

    def _alpaca(self, record: dict[str, Any], system: str | None) -> tuple[list[dict[str, str]], str, str, int]:
        columns = self.columns
        prompt_key, response_key = str(columns["prompt"]), str(columns["response"])
        messages = [{"role": "system", "content": system}] if system else []
        history_key = columns.get("history")
        history = record.get(history_key) if history_key else None
        if history is not None:
            if not isinstance(history, list):
                raise _RecordError(str(history_key), f"expected a list of [prompt, response] pairs, got "
                                   f"{_type_name(history)}", WRONG_TYPE)
            for i, pair in enumerate(history):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise _RecordError(f"{history_key}[{i}]", f"expected a [prompt, response] pair, got "
                                       f"{json.dumps(pair)[:60]}", WRONG_TYPE)
                messages.append({"role": "user", "content": _text_field(pair[0], f"{history_key}[{i}][0]")})
                answer = _text_field(pair[1], f"{history_key}[{i}][1]")
                if IMAGE_TOKEN in answer:
                    raise _RecordError(f"{history_key}[{i}][1]", f"{IMAGE_TOKEN} in a response; images belong in "
                                       "prompts", IMAGE_TOKENS)
                messages.append({"role": "assistant", "content": answer})
        prompt = _text_field(record.get(prompt_key), prompt_key)
        query_key = columns.get("query")
        query = record.get(query_key) if query_key else None
        if query is not None and _text_field(query, str(query_key)):
            prompt = f"{prompt}\n{query}"
        response = _text_field(record.get(response_key), response_key)
        if IMAGE_TOKEN in response:
            raise _RecordError(response_key, f"{IMAGE_TOKEN} in a response; images belong in prompts", IMAGE_TOKENS)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return messages, prompt_key, "role", 0


def _check_turns(messages: list[dict[str, str]], key: str, role_field: str, shift: int = 0) -> None:
    """An optional first system turn, then user/assistant alternating from user, with a reply.

    ``shift``: messages that precede the record's ``key`` list (a system prompt from its own column), so
    that a reported index is the turn's index in the record.
    """
    offset = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[offset:]):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise _RecordError(f"{key}[{i + offset - shift}].{role_field}",
                               f"{message['role']!r} where {expected!r} was expected (after an optional first "
                               "system turn, turns alternate user/assistant, starting with user)", TURN_ORDER)
    if len(messages) - offset < 2:
        raise _RecordError(key, "no assistant reply to learn from", NO_REPLY)
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and IMAGE_TOKEN in message["content"]:
            raise _RecordError(f"{key}[{i - shift}]", f"{IMAGE_TOKEN} in an assistant reply; images belong in user "
                                              "turns", IMAGE_TOKENS)


def _image_paths(value: Any, key: str) -> list[str]:
    """Image paths of a record's image field: a path, a ``{"path": ...}`` object (ms-swift, HF datasets), or a
    list of them."""
    if value is None:
        return []
    values = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(values, list):
        raise _RecordError(key, f"expected a path, a {{'path': ...}} object or a list of them, got {_type_name(value)}",
                           WRONG_TYPE)
    paths = []
    for i, item in enumerate(values):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if isinstance(item, dict):
            path = item.get("path")
            if not isinstance(path, str) or not path:
                message = ("embedded image bytes: write the image to a file and give its 'path'"
                           if item.get("bytes") is not None else
                           f"expected an object with a non-empty 'path', got {json.dumps(item)[:60]}")
                raise _RecordError(where, message, WRONG_TYPE)
            item = path
        if not isinstance(item, str) or not item:
            raise _RecordError(where, f"expected a non-empty path string, got {item!r}", WRONG_TYPE)
        if re.match(r"^(https?|data):", item):
            raise _RecordError(where, f"remote or inline image {item[:40]!r}: download it and give a file path",
                               WRONG_TYPE)
        paths.append(item)
    return paths


def _image_list(record: dict[str, Any], default_key: str) -> tuple[list[str], str]:
    """The record's image paths and the key they came from (``image`` or ``images``)."""
    if "image" in record and "images" in record:
        raise _RecordError("images", "give either 'image' or 'images', not both", WRONG_TYPE)
    key = "images" if "images" in record else "image" if "image" in record else default_key
    return _image_paths(record.get(key), key), key


@dataclass
class _Options:
    path: Path
    image_folder: Path
    task: str | None
    max_images_per_sample: int | None
    auto_insert_image_token: bool
    check_images: bool
    record_format: RecordFormat | None = None
    found: dict[str, bool] = field(default_factory=dict)  # image path -> exists (images repeat across records)

    def __post_init__(self) -> None:
        self.folder = str(self.image_folder.expanduser().resolve())  # resolved once: pathlib per image is slow

    def image_path(self, name: str) -> str:
        """The absolute, normalised path of image ``name`` (relative to the image folder)."""
        return os.path.normpath(os.path.join(self.folder, os.path.expanduser(name)))

    def exists(self, image: str) -> bool:
        if image not in self.found:
            self.found[image] = os.path.isfile(image)
        return self.found[image]


def _parse_record(record: Any, index: int, options: _Options) -> tuple[Sample, bool]:
    """One record -> (Sample, whether the record's own task differs from the task given for the file); raises
    _RecordError on the first problem found."""
    if isinstance(record, _BadLine):
        raise _RecordError("record", record.message, MALFORMED_JSON)
    if not isinstance(record, dict):
        raise _RecordError("record", f"expected a JSON object, got {_type_name(record)}", NOT_AN_OBJECT)
    inline_images: list[str] = []
    if options.record_format is not None:
        messages, key, role_field, shift = options.record_format.messages(record)
        _check_turns(messages, key, role_field, shift)
        image_key = options.record_format.columns.get("images")
        images = _image_paths(record.get(image_key), image_key) if image_key else []
        image_key = image_key or "images"
    else:
        if "conversations" in record and "messages" in record:
            raise _RecordError("messages", "give either 'conversations' (LLaVA) or 'messages', not both",
                               WRONG_TYPE)
        if "conversations" in record:
            messages, key = _llava_messages(record), "conversations"
        elif "messages" in record:
            messages, key = _chat_messages(record, inline_images), "messages"
        else:
            raise _RecordError("conversations", "missing: a sample needs 'conversations' (LLaVA format) or "
                                                "'messages' (messages format)", MISSING_FIELD)
        _check_turns(messages, key, "from" if key == "conversations" else "role")
        images, image_key = _image_list(record, "image" if key == "conversations" else "images")
    if inline_images:
        if images:
            raise _RecordError(image_key, "images are given both here and inside message parts; give them "
                                          "in one place", WRONG_TYPE)
        images, image_key = inline_images, "messages"
    limit = options.max_images_per_sample
    if limit is not None and len(images) > limit:
        raise _RecordError(image_key, f"{len(images)} images, but this model family takes at most {limit} per "
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
        raise _RecordError(key, f"{placeholders} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s) in "
                                f"'{image_key}'{hint}", IMAGE_TOKENS)
    resolved = []
    for i, name in enumerate(images):
        image = options.image_path(name)
        if options.check_images and not options.exists(image):
            if inline_images:
                where = f"messages (image part {i + 1})"
            else:
                where = f"{image_key}[{i}]" if isinstance(record.get(image_key), list) else image_key
            raise _RecordError(where, f"file not found: {image}", MISSING_IMAGE)
        resolved.append(Path(image))
    own_task = record.get("task")
    overridden = False
    if options.task is not None and options.task != FROM_RECORD:
        sample_task: str | None = options.task
        overridden = own_task is not None and own_task != options.task
    else:
        if own_task is None and options.task == FROM_RECORD:
            raise _RecordError("task", "missing: this dataset's tasks come from the records (task: from_record), "
                                       "so every record needs a 'task'", MISSING_FIELD)
        if own_task is not None and (not isinstance(own_task, str) or not own_task):
            raise _RecordError("task", f"expected a non-empty string, got {own_task!r}", WRONG_TYPE)
        sample_task = own_task
    sample_id = record.get("id", f"{options.path.stem}-{index}")
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        raise _RecordError("id", f"expected a string or an integer, got {_type_name(sample_id)}", WRONG_TYPE)
    return Sample(id=str(sample_id), messages=messages, images=resolved, task=sample_task), overridden


def read_samples(path: str | Path, image_folder: str | Path | None = None, on_error: str = "fail",
                 task: str | None = None, max_images_per_sample: int | None = None,
                 auto_insert_image_token: bool = False, check_images: bool = True,
                 record_format: RecordFormat | None = None) -> list[Sample]:
    """Read a LLaVA JSON/JSONL, messages-format (TRL, ms-swift) or ``record_format`` file into samples.

    Same arguments as :func:`read_samples_with_report`, which also returns the :class:`ReadReport`.
    """
    return read_samples_with_report(path, image_folder, on_error, task, max_images_per_sample,
                                    auto_insert_image_token, check_images, record_format)[0]


def read_samples_with_report(path: str | Path, image_folder: str | Path | None = None, on_error: str = "fail",
                             task: str | None = None, max_images_per_sample: int | None = None,
                             auto_insert_image_token: bool = False, check_images: bool = True,
                             record_format: RecordFormat | None = None) -> tuple[list[Sample], ReadReport]:
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
        check_images: check that every image file exists.
        record_format: the column names and role tags of a LLaMA-Factory dataset (:class:`RecordFormat`);
            None reads LLaVA and messages records.

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
                       record_format=record_format)
    report = ReadReport(path=path)
    samples = []
    for index, (line, record) in enumerate(iter_records(path)):
        report.total += 1
        try:
            sample, overridden = _parse_record(record, index, options)
        except _RecordError as err:
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
