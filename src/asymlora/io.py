"""Atomic writes: a file (or a whole output directory) is written under a temporary name beside its
target, then renamed onto it.

A crash or error mid-write leaves the previous file or directory (or nothing) in place, never half of one.
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def leftover_dirs(target: str | os.PathLike[str]) -> list[Path]:
    """The hidden ``.<name>.*`` directories beside ``target`` that an interrupted :func:`replacing_dir` left."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}."
    return sorted(p for p in target.parent.iterdir()
                  if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink())


def clean_leftovers(target: str | os.PathLike[str]) -> list[Path]:
    """Remove what interrupted writes of ``target`` left beside it; returns the paths removed.

    A ``.<name>.old-*`` dir is the previous output, set aside by a replacement that could not swap the two
    in one step: where ``target`` is missing (the writer was killed between its two renames) the newest one
    is renamed back, so the old output returns. Every other leftover is a temporary dir that was never
    renamed in (an incomplete output) or the old output after a swap, and is deleted."""
    import shutil

    target = Path(target)
    stale = leftover_dirs(target)
    set_aside = [p for p in stale if p.name.startswith(f".{target.name}.old-")]
    if set_aside and not target.exists():
        newest = max(set_aside, key=lambda p: p.stat().st_mtime)
        newest.rename(target)
        stale.remove(newest)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def check_output_dir(path: str | os.PathLike[str], what: str = "--out", force: bool = True) -> Path:
    """``path`` as a Path, once it is known to be usable as an output directory: it and every existing
    parent are directories (or do not exist yet), and, unless ``force``, it is absent or empty; otherwise
    ConfigError naming ``what`` (e.g. ``--out``)."""
    from asymlora.errors import ConfigError

    target = Path(path).expanduser()
    for candidate in (target, *target.parents):
        if candidate.exists() and not candidate.is_dir():
            what_is = "" if candidate == target else f" (in {target})"
            raise ConfigError(f"{what}: {candidate} is a file{what_is}; expected a directory to write into")
        if candidate.exists():
            break
    if not force and target.is_dir() and any(target.iterdir()):
        raise ConfigError(f"{what} {target}: exists and is not empty (use --force to replace it)")
    return target


@contextlib.contextmanager
def replacing_dir(target: str | os.PathLike[str], force: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; once the block completes it becomes ``target``.

    At every moment ``target`` is either what it was before or the complete new directory: the new one is
    written under a hidden ``.<name>.tmp-*`` name and renamed in; an existing ``target`` (replaced only with
    ``force``; ConfigError otherwise) is swapped with it in one atomic step where the OS can (Linux
    ``renameat2``), else set aside as ``.<name>.old-*`` first, and deleted after. Leftovers of interrupted
    attempts are cleaned first (:func:`clean_leftovers`). An error in the block removes the temporary dir.
    One writer per ``target`` at a time: a second one would clean the first one's temporary dir."""
    import shutil
    import uuid

    target = Path(target)
    clean_leftovers(target)
    check_output_dir(target, flag, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 dirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists():
        tmp.rename(target)
    elif _exchange(tmp, target):  # target is the new dir, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)


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
