"""Decoding check of the image files that data records reference, run once per file when data is read.

An image counts as usable when Pillow opens it and decodes all of its pixels (``Image.open`` + ``load``),
which is what the collator does before each training step: a corrupt, truncated or empty file, or one that
is not an image at all, is found when the data is loaded instead of at the training step that draws it.
Nothing is kept but the verdict.
"""

from __future__ import annotations

import os

MISSING = "missing image file"
UNDECODABLE = "undecodable image"


def image_problem(path: str) -> tuple[str, str] | None:
    """None if ``path`` is an image file Pillow decodes, else (reason kind, message)."""
    from PIL import Image

    if not os.path.isfile(path):
        return MISSING, f"file not found: {path}"
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        reason = str(err) or type(err).__name__
        return UNDECODABLE, f"cannot decode {path}: {reason}"
    return None
