"""Run untrusted Python (model-written code) in a separate, locked-down process.

Used by the code reward: a completion is executed against its task's tests, and nothing it does may hurt
the host. Layers, strongest first:

- Namespaces (when the kernel allows unprivileged user namespaces; probed once, see `isolation_level`):
  `unshare --user --map-root-user --net --pid --ipc --mount`: no network interfaces but a down loopback
  (kernel-enforced "no network"), a private process tree whose processes all die with it, a fresh /proc
  (host processes and their environment variables are invisible), the whole filesystem read-only except
  the empty temporary working directory, home directories hidden.
- No new processes: unless `allow_subprocess`, a seccomp filter makes the kernel refuse fork/vfork/clone
  of processes (threads still work), so a fork bomb gets EPERM on its first fork, also as root.
- Resource limits (`sandbox_boot.py` sets them before the program starts): CPU seconds, address space,
  largest file written, open files, no core dumps, and the process/thread count (RLIMIT_NPROC; inside
  the user namespace it counts the sandbox's tasks only).
- The parent enforces a wall-clock timeout and an output cap and then kills the whole process group
  (`start_new_session`), so an infinite loop, a sleeping program or a chatty one cannot stall training.
- Minimal environment: `python -I` (ignores PYTHON* variables and the user site directory) with only
  PATH, HOME, TMPDIR, LANG and single-thread BLAS settings; nothing is inherited, so no secret in the
  trainer's environment reaches the program.
- An audit hook (defence in depth, see `sandbox_boot.py`): no sockets other than local Unix ones inside the
  working directory, no writes or links outside it, no ctypes calls, no reading other processes' /proc
  entries, no subprocesses or signals to other processes unless `allow_subprocess`.

Limitations, stated honestly: without user namespaces (some containers and hardened kernels forbid them;
`isolation_level()` then says "process" and warns) there is no kernel-level network or filesystem
isolation, only the audit hook, which determined code can get around; files the host user may write are
then at risk. The kernel never applies RLIMIT_NPROC to root (nor to root mapped from the host's root), so
on a root host `allow_subprocess=True` is refused rather than left unbounded. Reads are not restricted
beyond hiding /proc and home directories. With subprocesses allowed but no PID namespace, a child that
starts its own session escapes the final process-group kill. Seccomp needs x86_64 or aarch64 (elsewhere
only the hook stops forks). For adversarial code at scale, run the trainer's sandbox inside a container
or VM as well.
"""

from __future__ import annotations

import functools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

from stepflash.errors import UserError

_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_boot.py")
EXIT_SETUP_FAILED = 97  # sandbox_boot.py could not establish the isolation it was asked for
ISOLATION_LEVELS = ("namespaces", "process")
_UNSHARE_FLAGS = ["--user", "--map-root-user", "--net", "--pid", "--ipc", "--mount", "--fork", "--kill-child"]


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 2.0  # wall clock, from start to kill
    cpu_s: float | None = None  # CPU seconds (default: the wall-clock timeout, rounded up)
    memory_mb: int = 512  # address space
    max_processes: int = 16  # processes + threads of the sandbox (kernel process limit; see _nproc_limit)
    max_file_mb: int = 16  # largest file the program may write
    max_output_bytes: int = 1 << 20  # stdout + stderr kept; more kills the program
    allow_subprocess: bool = False

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_processes <= 0 or self.max_file_mb <= 0:
            raise UserError(f"sandbox limits must be positive, got {self}")


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int | None  # negative: killed by that signal
    timed_out: bool
    output_limited: bool
    wall_s: float
    isolation: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_limited

    @property
    def setup_failed(self) -> bool:
        return self.returncode == EXIT_SETUP_FAILED and self.stderr.startswith("sandbox:")


def _minimal_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _hidden_dirs() -> list[str]:
    dirs = {"/root", "/home", os.path.expanduser("~")}
    return sorted(d for d in dirs if d and d != "/")


@functools.lru_cache(maxsize=None)
def isolation_level() -> str:
    """"namespaces" when unshare can build the full sandbox on this machine (tried once), else "process".
    The environment variable STEPFLASH_SANDBOX=process forces the weaker level (e.g. for debugging)."""
    if os.environ.get("STEPFLASH_SANDBOX") == "process" or shutil.which("unshare") is None:
        return "process"
    probe = run_python("print('ok')", limits=SandboxLimits(timeout_s=10.0), isolation="namespaces")
    if probe.ok and probe.stdout == "ok\n":
        return "namespaces"
    warnings.warn("sandbox: user namespaces are not available here, so untrusted code runs with process-level "
                  f"isolation only (no kernel-level network or filesystem isolation): {probe.stderr.strip()[-300:]}")
    return "process"


def _user_threads() -> int:
    """Threads the kernel's RLIMIT_NPROC already counts for this user (all of its processes' threads)."""
    uid, total = os.getuid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return total


def _nproc_limit(level: str, limits: SandboxLimits) -> int | None:
    """RLIMIT_NPROC for the sandbox. In its own user namespace the kernel counts only the sandbox's tasks;
    without one it counts every task of the host user, so the limit is set above the current count, and
    only when subprocesses are allowed (otherwise seccomp already forbids new processes). The kernel never
    applies the limit to root, hence the refusal: there would be nothing bounding a fork bomb."""
    if limits.allow_subprocess and os.geteuid() == 0:
        raise UserError("allow_subprocess needs the kernel's process limit, which does not apply to root; "
                        "run the sandbox as a non-root user or keep subprocesses off")
    if level == "namespaces":
        return limits.max_processes
    return _user_threads() + limits.max_processes if limits.allow_subprocess else None


def _command(isolation: str, cfg: dict) -> list[str]:
    cmd = [sys.executable, "-I", _BOOT, json.dumps(cfg)]
    if isolation == "namespaces":
        cmd = [shutil.which("unshare") or "unshare", *_UNSHARE_FLAGS, *cmd]
    return cmd


def _exited(pid: int) -> bool:
    """Has the child exited? (without reaping it, so its process group id cannot be reused yet)"""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc: subprocess.Popen, limits: SandboxLimits) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout/stderr until both close, the deadline passes or the output cap is hit; always ends
    with the process group killed (which also ends background children that kept the pipes open)."""
    deadline = time.monotonic() + limits.timeout_s
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    timed_out = limited = killed = False
    while sel.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in sel.select(timeout=min(remaining, 0.05)):
            try:
                data = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(key.fd)
                continue
            bufs[key.fd] += data
        if sum(len(b) for b in bufs.values()) > limits.max_output_bytes:
            limited = True
            break
        if not killed and _exited(proc.pid):
            _kill_group(proc.pid)  # leftovers; the pipes then close and the loop drains them
            killed = True
    _kill_group(proc.pid)
    sel.close()
    proc.wait()
    out, err = (bytes(b[: limits.max_output_bytes]) for b in bufs.values())
    return out, err, timed_out, limited


def _write_files(root: str, files: dict[str, str], stdin: str) -> tuple[str, str]:
    """root/work (the program's working directory, holding `files`) and root/stdin (outside it)."""
    workdir = os.path.join(root, "work")
    os.mkdir(workdir)
    for name, text in files.items():
        path = os.path.realpath(os.path.join(workdir, name))
        if not path.startswith(workdir + os.sep):
            raise UserError(f"sandbox file name {name!r} leaves the working directory")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    stdin_path = os.path.join(root, "stdin")
    with open(stdin_path, "w", encoding="utf-8") as f:
        f.write(stdin)
    return workdir, stdin_path


def _remove_tree(root: str) -> None:
    """Delete the sandbox directory even if the program took the permissions off its subdirectories."""
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            path = os.path.join(dirpath, d)
            if not os.path.islink(path):  # chmod follows links: never touch anything outside
                try:
                    os.chmod(path, 0o700)
                except OSError:
                    pass
    shutil.rmtree(root, ignore_errors=True)


def run_python(code: str | dict[str, str], stdin: str = "", limits: SandboxLimits = SandboxLimits(),
               entry: str = "main.py", secret: bytes | None = None, isolation: str | None = None,
               guard: bool = True) -> SandboxResult:
    """Run `code` (the text of main.py, or {file name: text} with `entry` the one to run) with `stdin`,
    in a fresh empty working directory that is deleted afterwards.

    secret: bytes handed to the entry program as the global `__sandbox_secret__` (never on disk, argv or
    environment), e.g. a nonce the test driver prints only after the tests ran.
    isolation: "namespaces" or "process"; None picks the strongest this machine supports.
    guard=False leaves out the audit hook (only for testing the kernel-level layers on their own)."""
    level = isolation or isolation_level()
    if level not in ISOLATION_LEVELS:
        raise UserError(f"sandbox isolation must be one of {ISOLATION_LEVELS}, got {level!r}")
    files = {entry: code} if isinstance(code, str) else dict(code)
    if entry not in files:
        raise UserError(f"sandbox entry {entry!r} is not among the files {sorted(files)}")
    if secret is not None and len(secret) > 4096:
        raise UserError(f"sandbox secret is limited to 4096 bytes, got {len(secret)}")
    nproc_limit = _nproc_limit(level, limits)
    root = tempfile.mkdtemp(prefix="stepflash-sandbox-")
    secret_r = None
    try:
        workdir, stdin_path = _write_files(root, files, stdin)
        if secret is not None:
            secret_r, secret_w = os.pipe()
            os.write(secret_w, secret)  # small: fits the pipe buffer, no writer thread needed
            os.close(secret_w)
        cfg = {"workdir": workdir, "entry": entry, "isolate_fs": level == "namespaces", "hide": _hidden_dirs(),
               "cpu_s": limits.cpu_s or math.ceil(limits.timeout_s), "memory_mb": limits.memory_mb,
               "max_file_mb": limits.max_file_mb, "nproc_limit": nproc_limit,
               "allow_subprocess": limits.allow_subprocess, "secret_fd": secret_r, "guard": guard}
        start = time.monotonic()
        with open(stdin_path, "rb") as stdin_f:
            proc = subprocess.Popen(_command(level, cfg), stdin=stdin_f, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=workdir, env=_minimal_env(workdir),
                                    start_new_session=True, close_fds=True,
                                    pass_fds=() if secret_r is None else (secret_r,))
        try:
            out, err, timed_out, limited = _collect(proc, limits)
        finally:
            _kill_group(proc.pid)
            proc.stdout.close()
            proc.stderr.close()
        return SandboxResult(stdout=out.decode("utf-8", "replace"), stderr=err.decode("utf-8", "replace"),
                             returncode=proc.returncode, timed_out=timed_out, output_limited=limited,
                             wall_s=time.monotonic() - start, isolation=level)
    finally:
        if secret_r is not None:
            os.close(secret_r)
        _remove_tree(root)
