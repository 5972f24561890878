"""Where the kernel cannot confine programs, `eval --task code` (and the RL code reward) refuse with one line
instead of running model-written code unconfined; `--unsafe-no-sandbox` is the explicit way round.

The machine without user namespaces is real, not simulated: the CLI runs inside a user namespace whose
`user.max_user_namespaces` is 0, so the sandbox's own unshare fails there. The missing-libseccomp case is
simulated (the library is a dependency, present wherever the tests run)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from stepflash.errors import UserError
from stepflash.tasks import sandbox

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_userns_command(args: list[str]) -> list[str]:
    inner = "echo 0 > /proc/sys/user/max_user_namespaces && exec " + " ".join(map(repr, args))
    return ["unshare", "--user", "--map-root-user", "sh", "-c", inner]


def _can_build_the_no_userns_machine() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(_no_userns_command(["true"]), capture_output=True)
    return probe.returncode == 0


needs_unshare = pytest.mark.skipif(not _can_build_the_no_userns_machine(),
                                   reason="cannot create a user namespace to play a machine without them")


def _eval_in_machine_without_userns(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    canary = tmp_path / "ran-unconfined"
    data, preds = tmp_path / "items.jsonl", tmp_path / "preds.jsonl"
    data.write_text(json.dumps({"prompt": "add", "tests": ["assert add(1, 2) == 3"]}) + "\n")
    program = f"open({str(canary)!r}, 'w').write('x')\ndef add(a, b):\n    return a + b"
    preds.write_text(json.dumps({"completion": f"```python\n{program}\n```"}) + "\n")
    args = [sys.executable, "-m", "stepflash.cli", "eval", "--task", "code", "--data", str(data),
            "--predictions", str(preds), "--out", str(tmp_path / "out"), *extra]
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(_no_userns_command(args), capture_output=True, text=True, env=env, timeout=300)


@needs_unshare
def test_eval_refuses_in_one_line_when_user_namespaces_are_missing(tmp_path):
    r = _eval_in_machine_without_userns(tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("stepflash eval: error: the code sandbox cannot confine")
    assert "--unsafe-no-sandbox" in r.stderr and "unshare" in r.stderr
    assert not (tmp_path / "ran-unconfined").exists() and not (tmp_path / "out").exists()


@needs_unshare
def test_unsafe_no_sandbox_runs_the_program_unconfined(tmp_path):
    r = _eval_in_machine_without_userns(tmp_path, "--unsafe-no-sandbox")
    assert r.returncode == 0, r.stderr
    assert "--unsafe-no-sandbox" in r.stderr  # the warning
    assert (tmp_path / "ran-unconfined").exists()  # what the flag means: the program reached the host
    assert json.loads((tmp_path / "out" / "results.json").read_text())["correct"] == 1


def test_missing_libseccomp_is_a_refusal_too(monkeypatch):
    def no_libseccomp(allow_subprocess):
        raise UserError("seccomp needs libseccomp and the pyseccomp package: Unable to find libseccomp")

    monkeypatch.setattr(sandbox, "seccomp_bpf", no_libseccomp)
    sandbox._namespaces_unavailable.cache_clear()
    try:
        with pytest.raises(UserError, match="cannot confine programs on this machine .seccomp needs libseccomp"):
            sandbox.isolation_level()
        with pytest.raises(UserError):
            sandbox.run_python("print(1)")
    finally:
        sandbox._namespaces_unavailable.cache_clear()
