import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A fresh asymlora cache (datasets, models) that still sees the installed offline assets."""
    from asymlora.assets import assets_dir

    monkeypatch.setenv("ASYMLORA_ASSETS", str(assets_dir()))
    monkeypatch.setenv("ASYMLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
