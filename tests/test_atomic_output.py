"""`merge` and `export` write --out atomically: killed at any point, --out is the old output or the new one,
complete; the next attempt cleans what the killed one left beside it."""

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llava

import asymlora
from asymlora.cli import main
from asymlora.errors import ConfigError
from asymlora.io import clean_leftovers, leftover_dirs, replacing_dir


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_replacing_dir_keeps_old_until_new_is_complete(tmp_path):
    out = tmp_path / "out"
    with replacing_dir(out) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(ConfigError, match="--force"), replacing_dir(out):
        pass
    with pytest.raises(RuntimeError), replacing_dir(out, force=True) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("failed mid-write")
    assert (out / "a").read_text() == "old" and leftover_dirs(out) == []
    with replacing_dir(out, force=True) as tmp:
        (tmp / "b").write_text("new")
    assert _digest(out).keys() == {"b"} and leftover_dirs(out) == []


def test_leftovers_are_cleaned_and_a_set_aside_output_comes_back(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.tmp-x1").mkdir()  # a killed attempt's incomplete output
    (tmp_path / ".out.old-x2").mkdir()  # an output set aside by a replacement killed before the rename in
    (tmp_path / ".out.old-x2" / "a").write_text("old")
    (tmp_path / ".outer.tmp-x3").mkdir()  # another target's: not ours
    clean_leftovers(out)
    assert (out / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".outer.tmp-x3", "out"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atomic")
    base = tiny_llava()
    base.save_pretrained(tmp / "base")
    model = asymlora.get_model(base, asymlora.AsymLoraConfig(method="asymlora", tasks=["vqa", "ocr"], r=4))
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.B_bank.normal_(std=0.2)
    model.save_pretrained(tmp / "adapter")
    return tmp


# Runs the CLI in a subprocess that SIGKILLs itself at one point of the write.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import asymlora.io as io
    point = os.environ["KILL_AT"]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "mid-save":  # some files of the new output written, not all
        import asymlora.merge
        import transformers.modeling_utils as mu
        mu.safe_save_file = lambda *args, **kwargs: die()  # merge: config.json written, the weights not
        asymlora.merge.write_json_atomic = lambda *args, **kwargs: die()  # export: weights, no adapter_config.json
    elif point == "before-swap":  # the new output complete in its temporary dir
        io._exchange = lambda a, b: die()
    elif point == "after-swap":  # the new output in place, the old one not yet deleted
        real = io._exchange
        def exchange(a, b):
            assert real(a, b)
            die()
        io._exchange = exchange
    elif point == "set-aside":  # no atomic swap (not Linux): the old output renamed aside, the new not yet in
        io._exchange = lambda a, b: False
        real_rename = io.Path.rename
        def rename(self, target):
            result = real_rename(self, target)
            if not self.name.startswith("."):
                die()
            return result
        io.Path.rename = rename
    from asymlora.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _cli(args, kill_at):
    env = {**os.environ, "KILL_AT": kill_at, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def outputs(saved):
    """Per command: the output for task vqa (the old one) and for task ocr (the new one), and their digests."""
    found = {}
    for command in ("merge", "export"):
        for task in ("vqa", "ocr"):
            out = saved / f"{command}-{task}"
            assert main([command, "--model", str(saved / "base"), "--adapter", str(saved / "adapter"), "--task", task,
                         "--out", str(out)]) == 0
            found[command, task] = out, _digest(out)
    return found


@pytest.mark.parametrize("command, point", [
    ("merge", "mid-save"), ("merge", "before-swap"), ("merge", "after-swap"), ("merge", "set-aside"),
    ("export", "mid-save"),
])
def test_killed_write_leaves_old_or_new_output(saved, outputs, tmp_path, command, point):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(outputs[command, "vqa"][0], out)
    common = [command, "--model", str(saved / "base"), "--adapter", str(saved / "adapter"), "--out"]
    old, new = outputs[command, "vqa"][1], outputs[command, "ocr"][1]
    assert old != new

    proc = _cli([*common, str(out), "--task", "ocr", "--force"], point)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert leftover_dirs(out)  # what the killed attempt left beside --out ...
    if point == "set-aside":  # only here is --out missing for a moment: the next attempt renames it back
        assert not out.exists()
        clean_leftovers(out)
    assert _digest(out) == (new if point == "after-swap" else old)
    assert main([*common, str(out), "--task", "ocr", "--force"]) == 0
    assert _digest(out) == new and leftover_dirs(out) == []  # ... the next attempt cleaned


def test_export_needs_force_to_replace(saved, tmp_path, capsys):
    out = tmp_path / "peft"
    args = ["export", "--model", str(saved / "base"), "--adapter", str(saved / "adapter"), "--task", "vqa",
            "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
