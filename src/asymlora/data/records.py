"""One record's fields, whatever its format: the problem kinds, :class:`RecordError` and the parsers of
turns, text and image fields that LLaVA, messages and LLaMA-Factory records share."""

from __future__ import annotations

import json
import re
from typing import Any

from asymlora.config import IMAGE_TOKEN

# LLaVA ``from`` values and the role each becomes; ShareGPT-style data also uses user/assistant here.
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGE_ROLES = ("user", "assistant", "system")

# Reasons a record is rejected (the ``kind`` of a Problem); skip mode groups its count by these.
MALFORMED_JSON = "malformed JSON"
NOT_AN_OBJECT = "not an object"
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
UNKNOWN_ROLE = "unknown role"
TURN_ORDER = "turns out of order"
NO_REPLY = "no assistant reply"
NO_QUESTION = "no user turn"
IMAGE_TOKENS = "<image> count mismatch"
TOO_MANY_IMAGES = "too many images"


class RecordError(Exception):
    """A problem with one record: the field it concerns, the message and the reason kind."""

    def __init__(self, field_name: str, message: str, kind: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name, self.message, self.kind = field_name, message, kind


def type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def text_field(value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        kind = MISSING_FIELD if value is None else WRONG_TYPE
        raise RecordError(field_name, f"expected a string, got {type_name(value)}", kind)
    return value


def turn_list(record: dict[str, Any], key: str, shape: str) -> list[Any]:
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if turns == [] else type_name(turns)
        raise RecordError(key, f"expected a non-empty list of {shape} turns, got {got}", WRONG_TYPE)
    return turns


def llava_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    messages = []
    for i, turn in enumerate(turn_list(record, "conversations", "{from, value}")):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"expected an object with 'from' and 'value', got {type_name(turn)}",
                               WRONG_TYPE)
        role = turn.get("from")
        if role not in LLAVA_ROLES:
            kind = MISSING_FIELD if role is None else UNKNOWN_ROLE
            raise RecordError(f"{where}.from", f"{role!r} is not one of {sorted(LLAVA_ROLES)}", kind)
        messages.append({"role": LLAVA_ROLES[role], "content": text_field(turn.get("value"), f"{where}.value")})
    return messages


def content_text(content: Any, where: str, inline_images: list[str]) -> str:
    """String content, or structured parts joined with ``<image>`` at each image part."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        kind = MISSING_FIELD if content is None else WRONG_TYPE
        raise RecordError(f"{where}.content", f"expected a string or a list of parts, got {type_name(content)}",
                           kind)
    pieces = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_TOKEN)
            inline = next((part[k] for k in ("path", "image", "url") if isinstance(part.get(k), str)), None)
            if inline is not None:
                if re.match(r"^(https?|data):", inline):
                    raise RecordError(f"{where}.content[{j}]", f"remote or inline image {inline[:40]!r}: "
                                       "download it and give a file path", WRONG_TYPE)
                inline_images.append(inline)
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise RecordError(f"{where}.content[{j}]", "expected {'type': 'image'} or {'type': 'text', "
                               f"'text': str}}, got {json.dumps(part)[:60]}", WRONG_TYPE)
    return "".join(pieces)


def chat_messages(record: dict[str, Any], inline_images: list[str]) -> list[dict[str, str]]:
    messages = []
    for i, turn in enumerate(turn_list(record, "messages", "{role, content}")):
        where = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"expected an object with 'role' and 'content', got {type_name(turn)}",
                               WRONG_TYPE)
        role = turn.get("role")
        if role not in MESSAGE_ROLES:
            kind = MISSING_FIELD if role is None else UNKNOWN_ROLE
            raise RecordError(f"{where}.role", f"{role!r} is not one of {list(MESSAGE_ROLES)}", kind)
        messages.append({"role": role, "content": content_text(turn.get("content"), where, inline_images)})
    return messages


def check_turns(messages: list[dict[str, str]], key: str, role_field: str, shift: int = 0,
                 require_reply: bool = True) -> None:
    """An optional first system turn, then user/assistant alternating from user, with a reply (or, without
    ``require_reply``, at least one user turn).

    ``shift``: messages that precede the record's ``key`` list (a system prompt from its own column), so
    that a reported index is the turn's index in the record.
    """
    offset = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[offset:]):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RecordError(f"{key}[{i + offset - shift}].{role_field}",
                               f"{message['role']!r} where {expected!r} was expected (after an optional first "
                               "system turn, turns alternate user/assistant, starting with user)", TURN_ORDER)
    if require_reply and len(messages) - offset < 2:
        raise RecordError(key, "no assistant reply to learn from", NO_REPLY)
    if len(messages) - offset < 1:
        raise RecordError(key, "no user turn to answer", NO_QUESTION)
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and IMAGE_TOKEN in message["content"]:
            raise RecordError(f"{key}[{i - shift}]", f"{IMAGE_TOKEN} in an assistant reply; images belong in user "
                                              "turns", IMAGE_TOKENS)


def image_paths(value: Any, key: str) -> list[str]:
    """Image paths of a record's image field: a path, a ``{"path": ...}`` object (ms-swift, HF datasets), or a
    list of them."""
    if value is None:
        return []
    values = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(values, list):
        raise RecordError(key, f"expected a path, a {{'path': ...}} object or a list of them, got {type_name(value)}",
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
                raise RecordError(where, message, WRONG_TYPE)
            item = path
        if not isinstance(item, str) or not item:
            raise RecordError(where, f"expected a non-empty path string, got {item!r}", WRONG_TYPE)
        if re.match(r"^(https?|data):", item):
            raise RecordError(where, f"remote or inline image {item[:40]!r}: download it and give a file path",
                               WRONG_TYPE)
        paths.append(item)
    return paths


def image_list(record: dict[str, Any], default_key: str) -> tuple[list[str], str]:
    """The record's image paths and the key they came from (``image`` or ``images``)."""
    if "image" in record and "images" in record:
        raise RecordError("images", "give either 'image' or 'images', not both", WRONG_TYPE)
    key = "images" if "images" in record else "image" if "image" in record else default_key
    return image_paths(record.get(key), key), key
