"""Atomic file writes: write to a temporary file in the target directory, then rename.

A crash or error mid-write leaves the previous file (or nothing) in place, never half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():  # mkstemp creates 0600 files: give the result the usual umask permissions
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_output_dir(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path, once it is known to be usable as an output directory: it and every existing
    parent are directories (or do not exist yet); otherwise ConfigError naming ``what`` (e.g. ``--out``)."""
    from asymlora.errors import ConfigError

    target = Path(path).expanduser()
    for candidate in (target, *target.parents):
        if candidate.exists() and not candidate.is_dir():
            what_is = "" if candidate == target else f" (in {target})"
            raise ConfigError(f"{what}: {candidate} is a file{what_is}; expected a directory to write into")
        if candidate.exists():
            break
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike[str], expected: str, error: type[Exception] | None = None) -> Any:
    """The content of a JSON file. A missing file, text that is not UTF-8 or invalid JSON raises ``error``
    (default ``DataError``) naming the file, and for invalid JSON the line and column; ``expected`` says what
    the file should have been."""
    from asymlora.errors import DataError

    path, error = Path(path), error or DataError
    text = _read_text(path, expected, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None


def _read_text(path: Path, expected: str, error: type[Exception]) -> str:
    """A UTF-8 file's text; a missing file or other bytes raise ``error`` naming the file and ``expected``."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: not found (expected {expected})") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}; expected {expected})") from None


def write_json_and_markdown(out_dir: str | os.PathLike[str], stem: str, obj: Any, markdown: str) -> None:
    """``<out_dir>/<stem>.json`` and ``<stem>.md``, each written atomically; ``out_dir`` is created."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{stem}.json", obj)
    write_text_atomic(out / f"{stem}.md", markdown)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 / 2E5 as floats (YAML 1.1 wants a dot: 1.0e-4)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no Python objects), with scientific-notation floats."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | os.PathLike[str], expected: str, error: type[Exception] | None = None) -> Any:
    """The content of a YAML file, parsed by :func:`load_yaml`. A missing file, text that is not UTF-8 or
    invalid YAML raises ``error`` (default ``ConfigError``) naming the file, and for invalid YAML the line,
    column and PyYAML's problem; ``expected`` says what the file should have been."""
    from asymlora.errors import ConfigError

    path, error = Path(path), error or ConfigError
    text = _read_text(path, expected, error)
    try:
        return load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", {_yaml_position(mark)}" if mark is not None else ""
        raise error(f"{path}{where}: not valid YAML ({_yaml_problem(err)})") from None


def _yaml_position(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's problem, after what it was reading and where that began (an unclosed quote's line)."""
    problem = getattr(err, "problem", None) or str(err)
    context, mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and mark is not None and mark != getattr(err, "problem_mark", None):
        return f"{context} at {_yaml_position(mark)}: {problem}"
    return problem
