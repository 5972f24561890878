"""Run untrusted Python (model-written code) in a process the kernel confines.

Used by the code reward and `stepflash eval --task code`: a completion runs against its task's tests, and
nothing it does may reach the host. The threat model, the layers and what is not promised are in
`docs/sandbox.md`; in short (isolation "namespaces", the default):

- fresh user, mount, PID, network, IPC, UTS and cgroup namespaces (`sandbox_boot.py` sets them up);
- a fresh root holding only the interpreter, its stdlib and the system libraries, read-only, plus a private
  size-limited tmpfs at /tmp (the working directory); no host /tmp, /run, /home, /root, /etc, project tree or
  sockets; a fresh /proc that shows the sandbox's processes only; no network interface but a down loopback;
- an unprivileged uid (host uid 65534 when we are root), no capabilities in any set, no_new_privs, and a
  seccomp filter from libseccomp (`sandbox_policy.py`) that refuses mounts, namespaces, ptrace, bpf, keyrings,
  file handles, io_uring, other socket families and, unless `allow_subprocess`, new processes and exec;
- resource limits (CPU seconds, address space, file size, open files, processes) and, in the parent, a
  wall-clock timeout and an output cap, after which the whole process group is killed (the sandbox's init
  also dies with its parent, and with it every process of its PID namespace);
- a minimal environment: `python -I -S` with PATH, HOME, TMPDIR, LANG and single-thread BLAS settings only.

When the machine cannot build this (no unprivileged user namespaces, no seccomp, no libseccomp), the first
use raises a `UserError` saying so: untrusted code never silently runs unconfined. `set_unsafe_no_sandbox`
(the CLI's `--unsafe-no-sandbox`, for people who already run inside a container of their own) selects
isolation "none": a host temporary directory, the resource limits, the seccomp filter when libseccomp is
there, and nothing else.

Besides stdout and stderr the program has a third output, fd 3 (`SandboxResult.results`), which the code
verifier's test driver uses for the values of the tests' calls.
"""

from __future__ import annotations

import fcntl
import functools
import marshal
import math
import os
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from stepflash.errors import UserError
from stepflash.tasks.sandbox_policy import SUPPORTED_MACHINES, mount_plan, seccomp_bpf

_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_boot.py")
ISOLATION_LEVELS = ("namespaces", "none")
SANDBOX_HOST_ID = 65534  # the program's host uid and gid when the parent is root ("nobody"/"nogroup")
_STATUS_MAX = 4096
SETUP_TIMEOUT_S = 30.0  # building the sandbox may take this long on a loaded machine before it is a failure
_unsafe_no_sandbox = False


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 2.0  # wall clock, from the program's start to kill (the sandbox's setup is not counted)
    cpu_s: float | None = None  # CPU seconds (default: the wall-clock timeout, rounded up)
    memory_mb: int = 512  # address space
    max_processes: int = 16  # processes + threads of the sandbox
    max_file_mb: int = 16  # largest file the program may write (and, beyond its own files, the tmpfs size)
    max_output_bytes: int = 1 << 20  # stdout + stderr + results kept; more kills the program
    allow_subprocess: bool = False

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_processes <= 0 or self.max_file_mb <= 0:
            raise UserError(f"sandbox limits must be positive, got {self}")


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    results: bytes  # what the program wrote to fd 3
    returncode: int | None  # negative: killed by that signal
    timed_out: bool
    output_limited: bool
    wall_s: float
    isolation: str
    setup_error: str | None  # None once the program started; else why the sandbox could not be built

    @property
    def started(self) -> bool:
        return self.setup_error is None

    @property
    def ok(self) -> bool:
        return self.started and self.returncode == 0 and not self.timed_out and not self.output_limited

    @property
    def memory_limited(self) -> bool:
        """The program died of the address-space limit (Python raises MemoryError when an allocation fails)."""
        last = self.stderr.strip().rsplit("\n", 1)[-1]
        return self.started and self.returncode != 0 and last.startswith("MemoryError")


def set_unsafe_no_sandbox(enabled: bool) -> None:
    """Run programs without the namespaces and the fresh root (`--unsafe-no-sandbox`); see the module docstring."""
    global _unsafe_no_sandbox
    if enabled and not _unsafe_no_sandbox:
        print("stepflash: --unsafe-no-sandbox: model-written programs run without isolation, as "
              f"uid {os.geteuid()}, with the host's files and network in reach", file=sys.stderr)
    _unsafe_no_sandbox = enabled


def isolation_level() -> str:
    """"namespaces", or "none" after set_unsafe_no_sandbox(True). Raises UserError (one line) when this
    machine cannot confine programs; the check runs a probe program once per process."""
    if _unsafe_no_sandbox:
        return "none"
    reason = _namespaces_unavailable()
    if reason:
        raise UserError(f"the code sandbox cannot confine programs on this machine ({reason}); it needs "
                        "unprivileged user namespaces and seccomp (libseccomp). Run where the kernel allows them, "
                        "or pass --unsafe-no-sandbox if this already runs inside a container you trust")
    return "namespaces"


@functools.lru_cache(maxsize=None)
def _namespaces_unavailable() -> str | None:
    """Why isolation "namespaces" does not work here, or None when a probe program ran in it."""
    if platform.system() != "Linux" or platform.machine() not in SUPPORTED_MACHINES:
        return f"{platform.system()} on {platform.machine()} is not supported"
    try:
        seccomp_bpf(False)
    except UserError as e:
        return str(e)
    probe = run_python("import json, math\nprint('ok')", limits=SandboxLimits(timeout_s=20.0), isolation="namespaces")
    if probe.ok and probe.stdout == "ok\n":
        return None
    return probe.setup_error or f"the probe program failed: {probe.stderr.strip()[-300:]}"


def _minimal_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


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
    """RLIMIT_NPROC. In its own user namespace the kernel counts only the sandbox's tasks (its uid is not root,
    and it has no capabilities, so the limit applies). Unconfined it counts every task of the host user,
    and never applies to root: there, subprocesses are refused rather than left unbounded."""
    if level == "namespaces":
        return limits.max_processes
    if limits.allow_subprocess and os.geteuid() == 0:
        raise UserError("allow_subprocess without the sandbox needs the kernel's process limit, which does not "
                        "apply to root; run as a non-root user or keep subprocesses off")
    return None if os.geteuid() == 0 else _user_threads() + limits.max_processes


def _sealed_memfd(data: bytes) -> int:
    """A read-only in-memory file (sealed: nobody, the program included, can change it)."""
    fd = os.memfd_create("stepflash-sandbox", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _check_files(files: dict[str, str], entry: str) -> None:
    if entry not in files:
        raise UserError(f"sandbox entry {entry!r} is not among the files {sorted(files)}")
    for name in files:
        norm = os.path.normpath(name)
        if os.path.isabs(norm) or norm == ".." or norm.startswith("../") or norm == ".":
            raise UserError(f"sandbox file name {name!r} leaves the working directory")


def _request(level: str, files: dict[str, str], entry: str, limits: SandboxLimits, workdir: str) -> dict:
    size_mb = math.ceil(sum(len(t.encode()) for t in files.values()) / (1 << 20))
    try:
        bpf = seccomp_bpf(limits.allow_subprocess).hex()
    except UserError:
        if level != "none":
            raise
        bpf = None  # unconfined and without libseccomp: the resource limits are all there is
    plan = mount_plan()
    host_uid, host_gid = (SANDBOX_HOST_ID, SANDBOX_HOST_ID) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    return {"isolation": level, "files": files, "entry": entry, "workdir": workdir, "seccomp_bpf": bpf,
            "plan": plan,
            "host_uid": host_uid, "host_gid": host_gid,
            "limits": {"cpu_s": math.ceil(limits.cpu_s or limits.timeout_s), "memory_mb": limits.memory_mb,
                       "max_file_mb": limits.max_file_mb, "nproc": _nproc_limit(level, limits),
                       "work_mb": limits.max_file_mb + size_mb + 1}}


def run_python(code: str | dict[str, str], stdin: str = "", limits: SandboxLimits = SandboxLimits(),
               entry: str = "main.py", isolation: str | None = None) -> SandboxResult:
    """Run `code` (the text of main.py, or {file name: text} with `entry` the one to run) with `stdin`, in a
    fresh private working directory that disappears afterwards. isolation: "namespaces" or "none" (None: the
    level `isolation_level()` allows)."""
    level = isolation or isolation_level()
    if level not in ISOLATION_LEVELS:
        raise UserError(f"sandbox isolation must be one of {ISOLATION_LEVELS}, got {level!r}")
    files = {entry: code} if isinstance(code, str) else dict(code)
    _check_files(files, entry)
    workdir = "/tmp" if level == "namespaces" else tempfile.mkdtemp(prefix="stepflash-sandbox-")
    fds = []
    try:
        results_r, results_w = os.pipe()
        status_r, status_w = os.pipe()
        fds += [results_r, results_w, status_r, status_w]
        req = _request(level, files, entry, limits, workdir)
        req.update(status_fd=status_w, results_fd=results_w)
        req_fd = _sealed_memfd(marshal.dumps(req))
        stdin_fd = _sealed_memfd(stdin.encode())
        fds += [req_fd, stdin_fd]
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-I", "-S", _BOOT, str(req_fd)], stdin=stdin_fd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=_minimal_env(workdir),
                                start_new_session=True, close_fds=True, pass_fds=(req_fd, results_w, status_w))
        for fd in (req_fd, stdin_fd, results_w, status_w):  # the child has its copies
            os.close(fd)
            fds.remove(fd)
        try:
            out, err, results, status, timed_out, limited = _collect(proc, results_r, status_r, limits)
        finally:
            _kill_group(proc.pid)
            proc.stdout.close()
            proc.stderr.close()
            proc.wait()
        return SandboxResult(stdout=out.decode("utf-8", "replace"), stderr=err.decode("utf-8", "replace"),
                             results=results, returncode=proc.returncode, timed_out=timed_out, output_limited=limited,
                             wall_s=time.monotonic() - start, isolation=level,
                             setup_error=_setup_error(status, timed_out, err))
    finally:
        for fd in fds:
            os.close(fd)
        if level == "none":
            _remove_tree(workdir)


def _setup_error(status: bytes, timed_out: bool, stderr: bytes) -> str | None:
    line = status.decode("utf-8", "replace").split("\n", 1)[0]
    if line == "ok":
        return None
    if line.startswith("error: "):
        return line[len("error: "):]
    if timed_out:
        return f"the sandbox was not ready within {SETUP_TIMEOUT_S:g} s"
    return "the sandbox ended before the program started: " + (stderr.decode("utf-8", "replace").strip()[-300:]
                                                               or "no message")


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


def _collect(proc: subprocess.Popen, results_fd: int, status_fd: int, limits: SandboxLimits):
    """Read stdout, stderr, the results and the status pipe until all close, the deadline passes or the output
    cap is hit; always ends with the process group killed (which also ends children that kept pipes open).
    The program's timeout starts when the status pipe says "ok", so a slow setup on a busy machine does not
    eat the program's time (and turn a correct program into a timeout)."""
    deadline = time.monotonic() + SETUP_TIMEOUT_S + limits.timeout_s
    started = False
    capped = [proc.stdout.fileno(), proc.stderr.fileno(), results_fd]
    bufs = {fd: bytearray() for fd in capped + [status_fd]}
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
            if key.fd != status_fd or len(bufs[key.fd]) < _STATUS_MAX:
                bufs[key.fd] += data
            if key.fd == status_fd and not started and bufs[status_fd].startswith(b"ok\n"):
                started = True
                deadline = time.monotonic() + limits.timeout_s
        if sum(len(bufs[fd]) for fd in capped) > limits.max_output_bytes:
            limited = True
            break
        if not killed and _exited(proc.pid):
            _kill_group(proc.pid)  # leftovers; the pipes then close and the loop drains them
            killed = True
    _kill_group(proc.pid)
    sel.close()
    out, err, results = (bytes(bufs[fd][: limits.max_output_bytes]) for fd in capped)
    return out, err, results, bytes(bufs[status_fd]), timed_out, limited


def _remove_tree(root: str) -> None:
    """Delete the unconfined run's directory even if the program took the permissions off its subdirectories."""
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            path = os.path.join(dirpath, d)
            if not os.path.islink(path):  # chmod follows links: never touch anything outside
                try:
                    os.chmod(path, 0o700)
                except OSError:
                    pass
    shutil.rmtree(root, ignore_errors=True)
