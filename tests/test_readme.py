"""The README's snippets run as written: every ```python and ```bash block, in order, in one fresh folder.

Blocks fenced as ```sh (the set-up commands, which build the venv and run the suite itself) are shown, not
run. The blocks run with this interpreter's environment: `asymlora` and `python` resolve to it, and the
cache (`ASYMLORA_CACHE`) is a fresh folder, so the tiny model and the built-in OCR slice that the README
builds are built here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return [(m[1], m[2]) for m in FENCE.finditer(text)]


def test_fence_parser_keeps_order_and_language() -> None:
    text = "a\n```sh\n./run demo\n```\n```python\nprint(1)\n```\nb\n```bash\nls\n```\n"
    assert blocks(text) == [("sh", "./run demo\n"), ("python", "print(1)\n"), ("bash", "ls\n")]


def test_readme_is_short_and_leads_with_what_it_is() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 180
    first = text.split("\n## ")[0]
    assert "asymmetric LoRA" in first and len([b for b in blocks(text) if b[0] == "sh"]) == 1


def test_readme_snippets_run_as_written(tmp_path: Path) -> None:
    runnable = [(lang, code) for lang, code in blocks(README.read_text()) if lang in ("python", "bash")]
    assert any(lang == "python" for lang, _ in runnable) and any(lang == "bash" for lang, _ in runnable)
    bin_dir = str(Path(sys.executable).parent)
    if not (Path(bin_dir) / "asymlora").exists():
        pytest.skip("the asymlora console script is not installed beside this interpreter")
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "ASYMLORA_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    work = tmp_path / "work"
    work.mkdir()
    for number, (lang, code) in enumerate(runnable):
        if lang == "python":
            script = work / f"block{number}.py"
            script.write_text(code)
            command = [sys.executable, str(script)]
        else:
            command = ["bash", "-euo", "pipefail", "-c", code]
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README block {number} ({lang}) failed:\n{code}\n{result.stderr[-3000:]}"
