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


# ---- the thread policy -------------------------------------------------------------------------

def test_computing_verbs_get_one_threads_flag():
    from stepflash.cli import THREADED

    for verb in [v for v in THREADED if v in VERBS]:
        module, cls, _ = VERBS[verb]
        parser = build_parser(verb, getattr(importlib.import_module(module), cls))
        flags = [a for a in parser._actions if "--threads" in a.option_strings]
        assert len(flags) == 1 and flags[0].default == 0, verb  # a verb's own `threads` field is replaced
    assert not any("--threads" in a.option_strings for a in build_parser("info", _cls("info"))._actions)


def _cls(verb):
    module, cls, _ = VERBS[verb]
    return getattr(importlib.import_module(module), cls)


@pytest.fixture
def fake_verb(monkeypatch):
    """A `generate` whose run records the thread count it ran with and the `threads` field it was given."""
    import dataclasses
    import sys
    import types

    import torch

    @dataclasses.dataclass
    class Args:
        device: str = "cpu"
        threads: int = 0
        seconds: float = 0.0

    seen = {}

    def run(args):
        import time

        seen.update(torch_threads=torch.get_num_threads(), field=args.threads)
        time.sleep(args.seconds)
        return 0

    module = types.SimpleNamespace(Args=Args, run=run)
    monkeypatch.setitem(sys.modules, "fake_verb_module", module)
    monkeypatch.setitem(VERBS, "generate", ("fake_verb_module", "Args", "fake"))
    before = torch.get_num_threads()
    yield seen
    torch.set_num_threads(before)


def test_threads_flag_is_applied_before_the_verb_runs(fake_verb, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["generate", "--threads", "1"]) == 0
    assert fake_verb == {"torch_threads": 1, "field": 1}
    assert main(["generate", "--threads", "2"]) == 0
    assert fake_verb == {"torch_threads": 2, "field": 2}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets for several processes per machine
    assert main(["generate"]) == 0
    assert fake_verb == {"torch_threads": 1, "field": 1}
    assert main(["generate", "--threads", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "stepflash generate: error: --threads must be >= 1 (or 0 to measure), got -1"]


def test_default_is_the_measured_faster_count(fake_verb, monkeypatch, capsys):
    import stepflash.threads as threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 2)  # torch's default on a 2-core machine
    monkeypatch.setattr(threads.torch, "set_num_threads", lambda n: fake_verb.setdefault("set", []).append(n))
    monkeypatch.setattr(threads, "measure", lambda work, counts: {1: 0.5, 2: 0.1} if work == "decode" else None)
    assert main(["generate", "--seconds", "1.6"]) == 0
    assert fake_verb["field"] == 2 and fake_verb["set"][-1] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["threads: 2 (measured fastest for decode work here: 1 thread 500 ms vs 2 threads 100 ms; "
                   "set with --threads N)"]  # printed once, after the verb has run for a second
    assert main(["generate"]) == 0  # done within the second: nothing printed
    assert capsys.readouterr().err == ""


def test_probe_picks_one_thread_when_other_threads_are_slow(monkeypatch):
    import stepflash.threads as threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 4)
    calls = []

    def probe(n):
        calls.append(n)
        return 0.01 if n == 1 else 0.2  # 20x slower: dropped after the first round

    monkeypatch.setitem(threads.PROBES, "train", probe)
    monkeypatch.setattr(threads.torch, "set_num_threads", lambda n: None)
    choice = threads.choose_threads(0, "train", "cpu")
    assert choice.threads == 1 and "1 thread 10 ms vs 4 threads 200 ms" in choice.reason
    assert calls == [1, 4, 1, 1]
    assert threads.choose_threads(0, "train", "cuda").reason.startswith("torch's default")
    assert threads.choose_threads(3, "train", "cpu").threads == 3


def test_probes_run_and_restore_the_thread_count():
    import torch

    from stepflash.threads import measure

    before = torch.get_num_threads()
    times = measure("decode", [1], rounds=1) | measure("train", [1], rounds=1)
    assert all(0 < t < 60 for t in times.values()) and torch.get_num_threads() == before


def test_serve_says_what_is_wrong_with_the_checkpoint_path(tmp_path, capsys):
    (tmp_path / "README.md").write_text("# not a checkpoint\n")
    (tmp_path / "empty").mkdir()
    for path, what in [("README.md", "it is a file"), ("empty", "it has no config.json"),
                       ("missing", "it does not exist")]:
        assert main(["serve", str(tmp_path / path), "--threads", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"stepflash serve: error: no checkpoint at {str(tmp_path / path)!r}: {what} "
                       "(expected a directory with config.json)"]
