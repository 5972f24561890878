"""The code sandbox: programs run, and malicious ones (loops, fork bombs, memory hogs, writes outside the
working directory, secret theft, network) cannot hurt the host. Every layer is tested on its own where this
machine has it: the audit-hook guard with the default settings, the kernel layers with guard=False."""

import os
import time
import uuid

import pytest

from stepflash.errors import UserError
from stepflash.tasks.sandbox import SandboxLimits, isolation_level, run_python

LEVELS = ["process"] + (["namespaces"] if isolation_level() == "namespaces" else [])
needs_namespaces = pytest.mark.skipif(isolation_level() != "namespaces", reason="no user namespaces here")
FAST = SandboxLimits(timeout_s=5.0)  # generous: these programs end by themselves


@pytest.fixture
def outside_path():
    path = f"/tmp/stepflash-sandbox-escape-{uuid.uuid4().hex}"
    yield path
    if os.path.exists(path):
        os.remove(path)


@pytest.mark.parametrize("level", LEVELS)
def test_runs_a_program_in_an_empty_private_directory(level):
    code = ("import os, sys\nprint(input()[::-1])\nprint(sorted(os.listdir('.')))\n"
            "print(os.getcwd() != %r)\n" % os.getcwd())
    r = run_python(code, stdin="hello\n", isolation=level, limits=FAST)
    assert r.ok, r.stderr
    assert r.stdout.splitlines() == ["olleh", "['main.py']", "True"]
    assert r.isolation == level


@pytest.mark.parametrize("level", LEVELS)
def test_exit_status_and_crash(level):
    r = run_python("raise ValueError('boom')", isolation=level, limits=FAST)
    assert r.returncode == 1 and not r.ok and "ValueError: boom" in r.stderr
    assert run_python("import sys; sys.exit(3)", isolation=level, limits=FAST).returncode == 3


@pytest.mark.parametrize("level", LEVELS)
def test_infinite_loop_is_killed_at_the_timeout(level):
    start = time.monotonic()
    r = run_python("while True:\n    pass", limits=SandboxLimits(timeout_s=1.0), isolation=level)
    assert r.timed_out and not r.ok
    assert time.monotonic() - start < 3.0


def test_sleeping_program_is_killed_at_the_timeout():
    r = run_python("import time\ntime.sleep(30)", limits=SandboxLimits(timeout_s=0.5))
    assert r.timed_out and r.wall_s < 2.0


def test_output_flood_is_capped():
    r = run_python("while True:\n    print('x' * 1000)", limits=SandboxLimits(timeout_s=5.0, max_output_bytes=10_000))
    assert r.output_limited and not r.ok and len(r.stdout) <= 10_000 and r.wall_s < 4.0


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("guard", [True, False])
def test_fork_bomb_is_refused(level, guard):
    code = ("import os\nn, err = 0, ''\nfor _ in range(100):\n    try:\n        pid = os.fork()\n"
            "    except OSError as e:\n        err = str(e)\n        continue\n    if pid == 0:\n        os._exit(0)\n"
            "    n += 1\nprint(n)\nprint(err)\n")
    r = run_python(code, limits=FAST, isolation=level, guard=guard)
    assert r.ok, r.stderr
    n, err = r.stdout.splitlines()
    assert n == "0"
    if guard:  # the audit hook refuses os.fork itself
        assert err == "sandbox: os.fork is not allowed"
    else:  # the kernel (seccomp) refuses every fork
        assert err == "[Errno 1] Operation not permitted"


def test_threads_still_work():
    code = ("import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]\n"
            "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(sorted(out))")
    r = run_python(code, guard=False, limits=FAST)
    assert r.ok and r.stdout.strip() == "[0, 1, 2, 3]", r.stderr


def test_subprocesses_for_root_are_refused():
    if os.geteuid() != 0:
        r = run_python("import os\npid = os.fork()\nos._exit(0) if pid == 0 else print('forked')",
                       limits=SandboxLimits(timeout_s=5.0, allow_subprocess=True))
        assert r.ok and "forked" in r.stdout
    else:  # the kernel does not apply the process limit to root: nothing would bound a fork bomb
        with pytest.raises(UserError, match="root"):
            run_python("print(1)", limits=SandboxLimits(allow_subprocess=True))


@pytest.mark.parametrize("level", LEVELS)
def test_memory_hog_fails_inside(level):
    r = run_python("x = bytearray(8 * 1024 ** 3)\nprint('allocated')",
                   limits=SandboxLimits(timeout_s=5.0, memory_mb=256), isolation=level)
    assert not r.ok and "MemoryError" in r.stderr and "allocated" not in r.stdout


def test_large_file_is_refused():
    r = run_python("with open('big', 'wb') as f:\n    for _ in range(8):\n        f.write(b'x' * (1 << 20))",
                   limits=SandboxLimits(timeout_s=5.0, max_file_mb=2))
    assert not r.ok and "File too large" in r.stderr


@pytest.mark.parametrize("level", LEVELS)
def test_write_outside_the_working_directory_is_refused(level, outside_path):
    for code in (f"open({outside_path!r}, 'w').write('pwned')",
                 f"import os\nos.close(os.open({outside_path!r}, os.O_WRONLY | os.O_CREAT))",
                 f"import os\nos.symlink({outside_path!r}, 'link')\nopen('link', 'w').write('pwned')",
                 "open('../escape', 'w').write('pwned')"):
        r = run_python(code, isolation=level, limits=FAST)
        assert not r.ok and "not allowed" in r.stderr, (code, r.stderr)
        assert not os.path.exists(outside_path)


@needs_namespaces
def test_filesystem_is_read_only_at_kernel_level(outside_path):
    r = run_python(f"open('ok', 'w').write('fine')\nopen({outside_path!r}, 'w').write('pwned')",
                   isolation="namespaces", guard=False, limits=FAST)
    assert not r.ok and "Read-only file system" in r.stderr
    assert not os.path.exists(outside_path)


@pytest.mark.parametrize("level", LEVELS)
def test_environment_secrets_do_not_leak(level, monkeypatch):
    monkeypatch.setenv("STEPFLASH_TEST_SECRET", "hunter2")
    code = ("import os\nprint(os.environ.get('STEPFLASH_TEST_SECRET'))\n"
            "found = False\nfor pid in os.listdir('/proc'):\n    try:\n"
            "        found |= b'hunter2' in open(f'/proc/{pid}/environ', 'rb').read()\n"
            "    except Exception:\n        pass\nprint(found)\n")
    r = run_python(code, isolation=level, limits=FAST)
    assert r.ok, r.stderr
    assert r.stdout.split() == ["None", "False"]


@pytest.mark.parametrize("level", LEVELS)
def test_network_is_refused(level):
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=0.5)\nprint('connected')",
                   isolation=level, limits=FAST)
    assert not r.ok and "not allowed" in r.stderr


@needs_namespaces
def test_no_network_at_kernel_level():
    code = ("import socket\ns = socket.socket()\ns.settimeout(0.5)\ntry:\n    s.connect(('1.1.1.1', 53))\n"
            "    print('connected')\nexcept OSError as e:\n    print(e.errno)\n")
    r = run_python(code, isolation="namespaces", guard=False, limits=FAST)
    assert r.ok and r.stdout.strip() == "101"  # ENETUNREACH: the namespace has no interfaces


def test_cannot_signal_the_parent():
    r = run_python("import os\nos.kill(os.getppid(), 9)", isolation="process", limits=FAST)
    assert not r.ok and "os.kill is not allowed" in r.stderr


def test_working_directory_is_removed_and_no_process_is_left():
    marker = uuid.uuid4().hex
    r = run_python(f"import os, time\nprint(os.getcwd())\n# {marker}\ntime.sleep(30)",
                   limits=SandboxLimits(timeout_s=0.5))
    assert r.timed_out
    assert not os.path.exists(os.path.dirname(r.stdout.strip()) or "/nonexistent")
    time.sleep(0.1)
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    leftovers.append(pid)
        except OSError:
            pass
    assert leftovers == []


def test_secret_is_handed_over_in_memory():
    r = run_python("print(__sandbox_secret__.decode())", secret=b"s3cr3t", limits=FAST)
    assert r.ok and r.stdout.strip() == "s3cr3t"


def test_bad_arguments():
    with pytest.raises(UserError):
        run_python("print(1)", isolation="docker", limits=FAST)
    with pytest.raises(UserError):
        run_python({"a.py": "print(1)"}, entry="main.py", limits=FAST)
    with pytest.raises(UserError):
        run_python({"../x.py": "print(1)"}, entry="../x.py", limits=FAST)
    with pytest.raises(UserError):
        SandboxLimits(timeout_s=0)
