"""Exceptions raised for bad user input (configs, data, checkpoints).

Every message names what is wrong (field, file, line) and, where one exists, the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AsymLoraError(Exception):
    """Base class: a user-facing error with a message that says what to fix."""


class ConfigError(AsymLoraError, ValueError):
    """An invalid configuration value. The message names the field and the allowed values."""


class CheckpointError(AsymLoraError, ValueError):
    """An adapter directory that does not match the model it is loaded into."""


class DataError(AsymLoraError, ValueError):
    """A malformed data file. The message names the file and line."""


class NonFiniteLossError(AsymLoraError):
    """The training loss, a gradient or a trainable tensor became NaN or inf; training stopped."""


class MissingAssetError(AsymLoraError, FileNotFoundError):
    """An offline asset (package, model, dataset) is not installed. The message gives the command."""


def did_you_mean(word: object, choices: Iterable[object], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``word``, or "" when none is close;
    ``prefix`` is put before the match shown (e.g. the section of a config key), not matched."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {prefix + matches[0]!r}?)" if matches else ""
