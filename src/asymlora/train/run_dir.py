"""One run per output dir: `RunDir` guards ``training.output_dir`` for the run about to train in it.

* A dir holds a run when it has a ``train_config.yaml``, a ``checkpoint-N`` dir or a final adapter. A run
  whose config differs from the recorded one (the dir's, else its newest checkpoint's;
  :func:`~asymlora.train.checkpoints.config_differences`: the checkpoint cadence, logging and ``resume``
  aside; a run without a recorded config counts as different)
  is refused with a ConfigError naming the dir and the differing keys, unless the config says
  ``replace_run: true``: the old run is then moved, whole, to ``<output_dir>.replaced-N`` (the first free
  N) right before training begins. Nothing is deleted.
* ``train_config.yaml`` and ``param_report.json`` are written (atomically) once the first optimizer step
  is done (:meth:`RunDir.record`), so a run that stops before that records nothing.
* A run that fails before its first step removes what it created (the dir itself when it made it, else
  the files and dirs that were not there before) and moves a replaced run back (:meth:`RunDir.abandon`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from asymlora.errors import ConfigError
from asymlora.io import write_json_atomic, write_text_atomic
from asymlora.train.checkpoints import (
    RUN_CONFIG_NAME,
    checkpoints,
    config_differences,
    read_run_config,
    run_config_text,
)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run: its recorded config, a checkpoint or a final adapter."""
    return (out / RUN_CONFIG_NAME).is_file() or bool(checkpoints(out)) or (out / ADAPTER_WEIGHTS_NAME).is_file()


class RunDir:
    """The output dir of one run (see the module docstring). ``writes``: whether this process writes files
    (the Trainer's ``should_save``); every process checks, so every rank refuses alike."""

    def __init__(self, output_dir: str | os.PathLike[str], config: dict[str, Any], replace: bool = False,
                 writes: bool = True, source: str = "config") -> None:
        self.out = Path(output_dir)
        self.config = config
        self.writes = writes
        self.replaced: Path | None = None  # where an old run was moved
        self._existed = self.out.exists()
        self._before: set[Path] = set()
        if self._existed and not self.out.is_dir():
            raise ConfigError(f"{source}: training.output_dir: {self.out} is a file, not a directory")
        self.replace = False
        if self._existed and holds_run(self.out):
            recorded = read_run_config(self.out)
            for checkpoint in checkpoints(self.out) if recorded is None else []:
                recorded = read_run_config(checkpoint)  # no run-level record (checkpoints copied in): the
                if recorded is not None:               # newest checkpoint's config stands for the run
                    break
            differences = ["its train_config.yaml is missing"] if recorded is None else \
                config_differences(recorded, config)
            if differences:
                if not replace:
                    raise ConfigError(
                        f"{source}: training.output_dir: {self.out} holds another run ({', '.join(differences)} "
                        "differ); give this run another output_dir, or set replace_run: true to move the old "
                        f"one to {self.out}.replaced-N")
                self.replace = True

    def begin(self) -> None:
        """Right before training: move a replaced run aside, and note what the dir holds."""
        if not self.writes:
            return
        if self.replace:
            n = 1
            while Path(f"{self.out}.replaced-{n}").exists():
                n += 1
            self.replaced = Path(f"{self.out}.replaced-{n}")
            os.replace(self.out, self.replaced)
            print(f"replace_run: moved the earlier run in {self.out} to {self.replaced}")
        self.out.mkdir(parents=True, exist_ok=True)
        self._before = set(self.out.rglob("*"))

    def record(self, param_report: dict[str, Any]) -> None:
        """After the first optimizer step: write ``train_config.yaml`` and ``param_report.json``."""
        if self.writes:
            write_text_atomic(self.out / RUN_CONFIG_NAME, run_config_text(self.config))
            write_json_atomic(self.out / "param_report.json", param_report)

    def abandon(self) -> None:
        """The run failed before its first step: remove what it created, and move a replaced run back."""
        if not self.writes or not self.out.is_dir():
            return
        if not self._existed or self.replaced is not None:
            shutil.rmtree(self.out)
            if self.replaced is not None:
                os.replace(self.replaced, self.out)
                print(f"replace_run: this run stopped before its first step; the earlier run is back in {self.out}")
            return
        for path in sorted(set(self.out.rglob("*")) - self._before, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
