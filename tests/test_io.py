"""asymlora.io: the YAML reader every config file goes through, and the training config of an adapter's run."""

import re

import pytest
import yaml

from asymlora.config import AsymLoraConfig
from asymlora.data.mixture import load_mixture
from asymlora.errors import ConfigError, DataError
from asymlora.evaluate.run import trained_config
from asymlora.io import read_yaml
from asymlora.train import TrainConfig


def test_read_yaml_reads_scientific_floats_and_names_file_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nsteps: [1, 2]\n")
    assert read_yaml(path, "a config") == {"lr": 1e-4, "steps": [1, 2]}
    path.write_text("a: 1\n  b: 2\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}, line 2, column 4: not valid YAML "
                                          r"\(mapping values are not allowed here\)$"):
        read_yaml(path, "a config")
    path.write_text("name: x\nprompt: 'unclosed\n")  # where the quote opened, and where the file ended
    with pytest.raises(ConfigError, match=r", line 3, column 1: not valid YAML \(while scanning a quoted scalar "
                                          r"at line 2, column 9: found unexpected end of stream\)$"):
        read_yaml(path, "a config")
    path.write_bytes(b"a: \xff\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(invalid start byte at byte 3; "
                                        r"expected a mixture\)$"):
        read_yaml(path, "a mixture", DataError)
    with pytest.raises(ConfigError, match=r"missing\.yaml: not found \(expected a config\)$"):
        read_yaml(tmp_path / "missing.yaml", "a config")


@pytest.mark.parametrize("reader", [load_mixture, AsymLoraConfig.from_file, TrainConfig.load])
def test_every_yaml_config_reader_gives_the_same_file_line_message(tmp_path, reader):
    path = tmp_path / "bad.yaml"
    path.write_text("adapter:\n  method: asymlora\n  tasks: [a, b\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}, line 4, column 1: not valid YAML \(while "
                                          r"parsing a flow sequence at line 3, column 10: expected ',' or '\]'"):
        reader(path)
    path.write_bytes(b"adapter:\n  method: \xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not UTF-8 text"):
        reader(path)


def test_trained_config_of_a_run_and_of_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    assert trained_config(run) == {} and trained_config(run / "checkpoint-5") == {}  # save_pretrained output
    (run / "train_config.yaml").write_text(yaml.safe_dump({"model": {"path": "/models/m", "projector": None}}))
    assert trained_config(run)["model"]["path"] == "/models/m"
    assert trained_config(run / "checkpoint-5") == trained_config(run)  # one level up, as `asymlora train` writes
    (run / "checkpoint-5" / "train_config.yaml").write_text("model: [m]\n")
    with pytest.raises(ConfigError, match=r"checkpoint-5/train_config\.yaml: expected the training config of the "
                                          r"adapter's run, a mapping with a 'model' section; got \{'model': \['m'\]\}"):
        trained_config(run / "checkpoint-5")
    (run / "train_config.yaml").write_text("model: {path: m\n")
    with pytest.raises(ConfigError, match=r"run/train_config\.yaml, line 2, column 1: not valid YAML"):
        trained_config(run)
