"""Checkpoints of a run: which ``checkpoint-N`` dirs are complete and resumable."""

from __future__ import annotations

import os
import re
from pathlib import Path


def last_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The run's last complete checkpoint: the ``checkpoint-N`` dir of the highest N that holds the Trainer's
    state (a dir without it was cut off while being written, and the Trainer cannot resume from it), or None
    when there is none (or no ``output_dir``)."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    names = (re.fullmatch(r"checkpoint-(\d+)", p.name) for p in out.iterdir())
    steps = {int(m[1]): out / m[0] for m in names if m and (out / m[0] / "trainer_state.json").is_file()}
    return steps[max(steps)] if steps else None
