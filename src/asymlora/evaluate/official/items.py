"""What every official-benchmark reader shares: the :class:`EvalItem` record, :class:`MissingFileError`,
and the checks that name the file, the record and the field of a malformed input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asymlora.errors import DataError

PathLike = str | Path


class MissingFileError(DataError, FileNotFoundError):
    """A benchmark file or image that is not where the layout says it is. The message names both."""


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question, normalised across benchmarks.

    ``image`` is the image path (``None`` for a question without image); ``question`` is the question as the
    model should see it before the response-format suffix of
    :data:`~asymlora.evaluate.official.registry.PROMPTS` (for ScienceQA: context, question and lettered
    choices); ``answers`` are the references (10 human answers for TextVQA/VizWiz, one
    for the others: GQA's answer, ScienceQA's letter, MME's ``Yes``/``No``, POPE's ``yes``/``no``); ``extra``
    holds what the benchmark's metric needs (see each reader).
    """

    id: str
    image: Path | None
    question: str
    answers: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def data_file(data_path: PathLike, default_name: str) -> Path:
    path = Path(data_path).expanduser()
    if path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file (expected the official {default_name}, or its folder)")
    return path


def find_image_root(image_root: PathLike | None, candidates: Sequence[Path], benchmark: str) -> Path:
    if image_root is not None:
        root = Path(image_root).expanduser()
        if not root.is_dir():
            raise MissingFileError(f"{root}: image folder of {benchmark} not found (image_root)")
        return root
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise MissingFileError(f"no image folder for {benchmark}: tried {tried}; pass image_root=")


def require_field(record: Any, key: str, kinds: type | tuple[type, ...], path: Path, where: str) -> Any:
    """``record[key]``, checked to be of ``kinds`` (bool is never accepted as int)."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DataError(f"{path}: {where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        expected = " or ".join(k.__name__ for k in _as_tuple(kinds))
        raise DataError(f"{path}: {where}: field {key!r} must be {expected}, got {type(value).__name__}")
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def string_list(value: Any, key: str, path: Path, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{path}: {where}: field {key!r} must be a list of strings")
    if not value:
        raise DataError(f"{path}: {where}: field {key!r} is empty")
    return list(value)


def checked_image(image: Path, check: bool, what: str) -> Path:
    if check and not image.is_file():
        raise MissingFileError(f"{image}: image of {what} not found")
    return image


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
