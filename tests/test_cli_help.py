"""Every command has complete help, and the small commands of the README run."""

import pytest

from asymlora.cli import build_parser, main


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: asymlora " + name)
    parser = subcommands()[name]
    for action in parser._actions:
        if action.dest not in ("help", "command") and action.option_strings:
            assert action.help, f"{name} {action.option_strings} has no help text"


def test_main_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in subcommands():
        assert name in text


def test_setup_check_and_data_list(capsys):
    main(["setup", "--check"])
    assert "smollm2" in capsys.readouterr().out
    assert main(["data", "list"]) == 0
    assert "easyvqa" in capsys.readouterr().out


def test_build_tiny(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert main(["build-tiny", "--out", str(tmp_path / "tiny")]) == 0
    AutoModelForImageTextToText.from_pretrained(tmp_path / "tiny")
    AutoProcessor.from_pretrained(tmp_path / "tiny")


def test_missing_default_model_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASYMLORA_CACHE", str(tmp_path / "empty"))
    assert main(["eval", "--out", str(tmp_path / "e"), "--tasks", "ocr"]) == 2
    assert "asymlora build-default" in capsys.readouterr().err
