"""Runs inside the sandbox process, before the untrusted program: lock it down, then run it.

`sandbox.py` starts `python -I sandbox_boot.py CONFIG_JSON` (inside fresh namespaces when the kernel
allows it). This script uses only the standard library and never imports stepflash. In order:
1. filesystem (namespaces mode only): a fresh /proc for the new PID namespace (host processes and their
   environments become invisible), the working directory bind-mounted writable, home directories covered
   with empty tmpfs, then every other mount remounted read-only. Any failure exits with status 97
   (fail closed: the host then reports a sandbox error instead of running the code unprotected);
2. resource limits: CPU seconds, address space, file size, processes/threads, open files, no core dumps;
   unless subprocesses are allowed, a seccomp filter makes the kernel refuse fork/vfork/clone of new
   processes (threads stay possible), which stops fork bombs also where the process limit does not apply;
3. an audit hook (PEP 578) that refuses network sockets, writes or links outside the working directory,
   opening directories outside it, ctypes calls, process creation and signals (unless subprocesses are allowed).
   The hook is defence in depth and stops casual misuse; it is not a security boundary on its own
   (Python code can be crafted around audit hooks). The kernel layers above are the boundary;
4. `runpy.run_path(entry)` as `__main__`, with the working directory first on sys.path.
"""

import json
import os
import resource
import runpy
import sys

EXIT_SETUP_FAILED = 97
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_RELATIME = 1024, 2048, 4096, 1 << 21
# Flags a user namespace may not clear on a mount it inherited: a remount must repeat them.
_KEEP_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "noatime": _MS_NOATIME,
               "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME}


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _unescape(field: str) -> str:
    """/proc/self/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def _lock_filesystem(workdir: str, hide: list[str]) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def mount(src, target, fstype, flags, data=None):
        if libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None,
                      ctypes.c_ulong(flags), data.encode() if data else None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {target}: {os.strerror(err)}")

    if os.getpid() == 1:  # first process of a fresh PID namespace: give it its own /proc
        mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    mount(workdir, workdir, None, _MS_BIND)
    needed = [os.path.realpath(p) for p in sys.path if p] + [workdir, os.path.realpath(sys.executable)]
    for path in hide:
        if os.path.isdir(path) and not any(_inside(n, path) for n in needed):
            mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=755")
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    for _, target, _, opts, *_ in mounts:
        target, opts = _unescape(target), opts.split(",")
        if target == workdir:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for name, bit in _KEEP_FLAGS.items():
            flags |= bit if name in opts else 0
        try:
            mount("none", target, None, flags)
        except OSError:
            if "ro" not in opts:  # a mount we could not make read-only and that is writable
                raise


# seccomp: kernel-level "no new processes" (fork, vfork, clone without CLONE_THREAD; clone3 answers ENOSYS
# so that glibc falls back to clone for threads). Per architecture: (AUDIT_ARCH, fork/vfork numbers, clone, clone3).
_SECCOMP_ARCH = {"x86_64": (0xC000003E, (57, 58), 56, 435), "aarch64": (0xC00000B7, (), 220, 435)}
_CLONE_THREAD = 0x00010000


def _seccomp_program(arch: int, forks: tuple, clone: int, clone3: int) -> list[tuple[int, int, int, int]]:
    ld_w, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    prog = [(ld_w, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, eperm),  # another ABI (e.g. i386): refuse
            (ld_w, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # x32 syscall numbers: refuse
    for nr in forks:
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, clone3), (ret, 0, 0, enosys),
             (jeq, 0, 3, clone), (ld_w, 0, 0, 16), (jset, 1, 0, _CLONE_THREAD), (ret, 0, 0, eperm),
             (ret, 0, 0, allow)]
    return prog


def _block_new_processes() -> bool:
    """Install the seccomp filter; False when this architecture is not in the table."""
    import ctypes
    import platform

    spec = _SECCOMP_ARCH.get(platform.machine())
    if spec is None:
        return False

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Insn))]

    insns = _seccomp_program(*spec)
    table = (Insn * len(insns))(*[Insn(*i) for i in insns])
    prog = Prog(len(insns), table)
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0 or \
            libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")
    return True


def _set_limits(cfg: dict) -> None:
    mb = 1 << 20
    cpu = int(cfg["cpu_s"])
    for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                       (resource.RLIMIT_AS, (cfg["memory_mb"] * mb,) * 2),
                       (resource.RLIMIT_FSIZE, (cfg["max_file_mb"] * mb,) * 2),
                       (resource.RLIMIT_NOFILE, (64, 64)),
                       (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(res, value)
    if cfg["nproc_limit"] is not None:  # the kernel counts processes and threads of this user
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc_limit"],) * 2)


def _install_guard(workdir: str, allow_subprocess: bool) -> None:
    """PEP 578 audit hook: refuses the events listed in the module docstring with PermissionError."""
    import socket

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    fs_events = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                 "os.chmod", "os.chown", "os.utime", "os.chflags", "os.lchflags", "shutil.rmtree", "os.mkfifo",
                 "os.mknod"}
    process_events = {"os.fork", "os.forkpty", "os.system", "os.posix_spawn", "os.spawn", "os.exec",
                      "subprocess.Popen", "pty.spawn"}
    # ctypes may be imported (numpy does) but not used: calls and raw memory access are refused.
    ctypes_events = {"ctypes.call_function", "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.string_at",
                     "ctypes.wstring_at", "ctypes.PyObj_FromPtr", "ctypes.set_errno"}
    blocked_modules = {"_cffi_backend"}
    real, deny_dirs = os.path.realpath, os.path.isdir
    own_pid = os.getpid()
    pid_namespace = own_pid == 1
    standard_streams = {"/dev/stdin", "/dev/stdout", "/dev/stderr", "/proc/self/fd/0", "/proc/self/fd/1",
                        "/proc/self/fd/2"}

    def resolve(p):
        return real(os.fsdecode(os.fspath(p)))

    def deny(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def guard(event, args):
        if event == "open":
            path, _, flags = args
            if path is None or isinstance(path, int):
                return
            if os.fsdecode(os.fspath(path)) in standard_streams:
                return
            target = resolve(path)
            if _inside(target, workdir) or target == "/dev/null":
                return
            if flags & write_flags:
                deny(f"writing {target}")
            if deny_dirs(target):
                deny(f"opening directory {target}")
            pid = target.split("/")[2] if target.startswith("/proc/") else ""
            if pid.isdigit() and int(pid) != own_pid:
                deny(f"reading {target}")  # another process's memory maps, environment, ...
        elif event in fs_events:
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)) and not _inside(resolve(a), workdir):
                    deny(f"{event} on {os.fsdecode(os.fspath(a))}")
        elif event == "socket.__new__":
            if args[1] != socket.AF_UNIX:
                deny("network access")
        elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
            addr = args[1] if len(args) > 1 else None
            abstract = isinstance(addr, (str, bytes)) and addr[:1] in ("\0", b"\0")  # no path: a host-wide name
            if abstract or not (isinstance(addr, (str, bytes)) and addr and _inside(resolve(addr), workdir)):
                deny(f"{event} to {addr!r}")
        elif event.startswith(("socket.getaddrinfo", "socket.gethostby", "socket.getnameinfo")):
            deny("name resolution")
        elif event in ctypes_events:
            deny(f"ctypes ({event})")
        elif event == "import" and args[0] in blocked_modules:
            deny(f"importing {args[0]}")
        elif event in ("os.kill", "os.killpg"):
            # In a PID namespace only the sandbox's own processes are visible; otherwise only itself.
            if not (args[0] in (0, own_pid) or (allow_subprocess and pid_namespace)):
                deny(event)
        elif not allow_subprocess and (event in process_events or event.startswith(("os.exec", "os.spawn"))):
            deny(event)

    sys.addaudithook(guard)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    workdir = cfg["workdir"]
    if cfg["isolate_fs"]:
        try:
            _lock_filesystem(workdir, cfg["hide"])
        except OSError as e:
            print(f"sandbox: filesystem isolation failed: {e}", file=sys.stderr)
            os._exit(EXIT_SETUP_FAILED)
    secret = None
    if cfg.get("secret_fd") is not None:
        with os.fdopen(cfg["secret_fd"], "rb") as f:
            secret = f.read()
    try:
        _set_limits(cfg)
        if not cfg["allow_subprocess"]:
            _block_new_processes()
    except (ValueError, OSError) as e:
        print(f"sandbox: setting resource limits failed: {e}", file=sys.stderr)
        os._exit(EXIT_SETUP_FAILED)
    os.chdir(workdir)
    sys.path.insert(0, workdir)
    sys.argv = [cfg["entry"]]
    if cfg.get("guard", True):
        _install_guard(workdir, cfg["allow_subprocess"])
    init = {"__sandbox_secret__": secret} if secret is not None else None
    del cfg
    runpy.run_path(sys.argv[0], init_globals=init, run_name="__main__")


if __name__ == "__main__":
    main()
