"""The benchmark scripts of the README run and write their result files."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_layer_speed_script_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "layer_speed.py"), "--preset", "tiny",
                           "--iters", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "layer_speed_tiny_cpu.json").read_text())
    impls = {(row["method"], row["impl"]) for row in data["rows"]}
    assert ("asymlora_moe (dense)", "loop") in impls and ("asymlora_moe (dense)", "fused") in impls
    assert "| lora | 1 | fused |" in (tmp_path / "layer_speed_tiny_cpu.md").read_text()
