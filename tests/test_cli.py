import importlib

import pytest

from stepflash.cli import VERBS, build_parser, main


@pytest.mark.parametrize("verb", [v for v in VERBS if v != "recipe"])
def test_every_verb_builds_its_help(verb):
    module, cls, _ = VERBS[verb]
    help_text = build_parser(verb, getattr(importlib.import_module(module), cls)).format_help()
    assert f"stepflash {verb}" in help_text


def test_unknown_verb_and_user_error_are_one_line(capsys, tmp_path):
    assert main(["nope"]) == 2
    assert main(["generate", str(tmp_path / "missing"), "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stepflash generate: error:")
