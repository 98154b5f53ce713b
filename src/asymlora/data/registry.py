"""LLaMA-Factory's ``dataset_info.json``: how the records of a registered dataset are laid out."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from asymlora.config import IMAGE_TOKEN
from asymlora.data.records import (
    IMAGE_TOKENS,
    MISSING_FIELD,
    UNKNOWN_ROLE,
    WRONG_TYPE,
    RecordError,
    text_field,
    turn_list,
    type_name,
)
from asymlora.errors import ConfigError

FORMATTINGS = ("sharegpt", "alpaca")
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
                raise ConfigError(f"{where}: {key}: expected an object, got {type_name(given)}")
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
            system = text_field(system, str(system_column))
        if self.formatting == "alpaca":
            return self._alpaca(record, system)
        key, tags = str(self.columns["messages"]), self.tags
        roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
        tool_roles = (tags["observation_tag"], tags["function_tag"])
        if key not in record:
            raise RecordError(key, "missing: the registry's columns.messages names this field (default: "
                                    "conversations)", MISSING_FIELD)
        messages = []
        for i, turn in enumerate(turn_list(record, key, f"{{{tags['role_tag']}, {tags['content_tag']}}}")):
            where = f"{key}[{i}]"
            if not isinstance(turn, dict):
                raise RecordError(where, f"expected an object with '{tags['role_tag']}' and '{tags['content_tag']}', "
                                   f"got {type_name(turn)}", WRONG_TYPE)
            role = turn.get(tags["role_tag"])
            if role in tool_roles:
                raise RecordError(f"{where}.{tags['role_tag']}", f"{role!r}: tool turns are not supported",
                                   UNKNOWN_ROLE)
            if role not in roles:
                kind = MISSING_FIELD if role is None else UNKNOWN_ROLE
                raise RecordError(f"{where}.{tags['role_tag']}", f"{role!r} is not one of {list(roles)} (the "
                                   "registry's user_tag, assistant_tag, system_tag)", kind)
            messages.append({"role": roles[role],
                             "content": text_field(turn.get(tags["content_tag"]), f"{where}.{tags['content_tag']}")})
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
                raise RecordError(str(history_key), f"expected a list of [prompt, response] pairs, got "
                                   f"{type_name(history)}", WRONG_TYPE)
            for i, pair in enumerate(history):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise RecordError(f"{history_key}[{i}]", f"expected a [prompt, response] pair, got "
                                       f"{json.dumps(pair)[:60]}", WRONG_TYPE)
                messages.append({"role": "user", "content": text_field(pair[0], f"{history_key}[{i}][0]")})
                answer = text_field(pair[1], f"{history_key}[{i}][1]")
                if IMAGE_TOKEN in answer:
                    raise RecordError(f"{history_key}[{i}][1]", f"{IMAGE_TOKEN} in a response; images belong in "
                                       "prompts", IMAGE_TOKENS)
                messages.append({"role": "assistant", "content": answer})
        prompt = text_field(record.get(prompt_key), prompt_key)
        query_key = columns.get("query")
        query = record.get(query_key) if query_key else None
        if query is not None and text_field(query, str(query_key)):
            prompt = f"{prompt}\n{query}"
        response = text_field(record.get(response_key), response_key)
        if IMAGE_TOKEN in response:
            raise RecordError(response_key, f"{IMAGE_TOKEN} in a response; images belong in prompts", IMAGE_TOKENS)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return messages, prompt_key, "role", 0
