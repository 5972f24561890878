"""Runs before the untrusted program, in the process `sandbox.py` starts: confine it, then run the program.

Started as `python -I -S sandbox_boot.py REQUEST_FD` with stdin, stdout and stderr already in place. The request
(JSON in a sealed memfd, built by the trusted parent) holds the program's files, the limits, the mount plan and
the seccomp filter as BPF compiled by libseccomp in the parent. This script uses only the standard library and
never imports stepflash. Processes, for isolation "namespaces":

    boot (host side, the starting user)          writes the child's uid/gid maps, waits, relays the exit status
     └ keeper (new user, mount, net, IPC, UTS, cgroup and PID namespaces)   forks the init, waits, relays
        └ init (PID 1 of the new PID namespace)  builds the fresh root, drops every privilege, runs the program

The init: bind-mounts the interpreter, its stdlib and the system libraries read-only into a fresh tmpfs root
(installed packages hidden), adds /dev/null & co., a fresh /proc and a private size-limited tmpfs at /tmp (the
working directory), `pivot_root`s into it and detaches the host's tree; then sets the resource limits, clears
every capability (effective, permitted, inheritable, ambient, bounding), sets no_new_privs and loads the
seccomp filter; it runs as an unprivileged uid (host uid 65534 when the host user is root, else the host
user's own uid; inside the namespace uid 1000). Only then does it report "ok" on the status pipe, close it
and run the program as __main__. Any failure before that writes "error: ..." on the status pipe and exits,
so the parent never mistakes a half-built sandbox for a running one (the program cannot write there: the
pipe is closed in every process before the program starts).

Isolation "none" (`--unsafe-no-sandbox`): no namespaces and no seccomp; the working directory is a host
temporary directory, and only the resource limits and no_new_privs apply.
"""

import ctypes
import marshal
import os
import resource
import signal
import stat
import sys

EXIT_SETUP_FAILED = 97
INNER_ID = 1000  # the program's uid and gid inside its user namespace
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
NAMESPACES = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP | CLONE_NEWPID
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_NOATIME, MS_NODIRATIME = 1, 2, 4, 8, 32, 1024, 2048
MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 4096, 16384, 1 << 18, 1 << 21, 1 << 24
MNT_DETACH, AT_FDCWD, AT_RECURSIVE = 2, -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
PR_SET_PDEATHSIG, PR_GET_SECCOMP, PR_SET_SECCOMP, PR_CAPBSET_DROP = 1, 21, 22, 24
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 39, 47, 4
SECCOMP_MODE_FILTER = 2
SYSCALLS = {"x86_64": {"pivot_root": 155, "mount_setattr": 442}, "aarch64": {"pivot_root": 41, "mount_setattr": 442}}

libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")
    return ret


def _syscall(name: str, *args) -> int:
    return _check(libc.syscall(SYSCALLS[os.uname().machine][name], *args), name)


def _mount(src, target: str, fstype=None, flags: int = 0, data=None) -> None:
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    _check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _prctl(option: int, arg2=0, arg3=0) -> int:
    return _check(libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0),
                             ctypes.c_ulong(0)), f"prctl {option}")


# ---- the fresh root --------------------------------------------------------------------------------

class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _read_only(path: str) -> None:
    """Make the bind mount at `path` (and everything below it) read-only, nosuid and nodev. Flags the host
    locked on the source (noexec, atime) must be repeated by a plain remount; mount_setattr only adds flags."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    if libc.syscall(SYSCALLS[os.uname().machine]["mount_setattr"], AT_FDCWD, path.encode(), AT_RECURSIVE,
                    ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
        return
    if ctypes.get_errno() != 38:  # anything but ENOSYS (kernels before 5.12)
        _check(-1, f"mount_setattr {path}")
    st = os.statvfs(path).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | (MS_NOEXEC if st & os.ST_NOEXEC else 0)
    flags |= MS_NOATIME if st & os.ST_NOATIME else MS_RELATIME if st & os.ST_RELATIME else MS_STRICTATIME
    flags |= MS_NODIRATIME if st & os.ST_NODIRATIME else 0
    _mount(None, path, None, flags)


def _mount_point(path: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def _open_sources(plan: dict) -> dict:
    """O_PATH fds of the host paths to bind, opened by the keeper before it takes the sandbox's uid, which
    could not reach a stdlib under /root (mode 700), say. Closed before the program starts."""
    def opened(path):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        return path, fd, stat.S_ISDIR(os.fstat(fd).st_mode)
    return {"binds": [opened(p) for p in plan["binds"]], "devices": [opened(d) for d in plan["devices"]]}


def _close_sources(sources: dict) -> None:
    for _, fd, _ in sources["binds"] + sources["devices"]:
        os.close(fd)


def _build_root(plan: dict, sources: dict, work_mb: int) -> None:
    base = plan["base"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    for src, fd, is_dir in sources["binds"]:  # through the fd: the unprivileged uid may not traverse the path
        dst = base + src
        _mount_point(dst, is_dir)
        _mount(f"/proc/self/fd/{fd}", dst, None, MS_BIND | MS_REC)
        _read_only(dst)
    for path in plan["hide"]:  # installed packages under a bound directory: covered by an empty directory
        _mount("tmpfs", base + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=555")
    for path, target in plan["symlinks"]:
        os.makedirs(os.path.dirname(base + path), exist_ok=True)
        os.symlink(target, base + path)
    os.makedirs(base + "/dev", exist_ok=True)
    for dev, fd, _ in sources["devices"]:  # bound writable: a read-only mount would refuse writes to /dev/null
        _mount_point(base + dev, False)
        _mount(f"/proc/self/fd/{fd}", base + dev, None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{base}/dev/{name}")
    os.mkdir(base + "/proc")
    try:  # the PID namespace's own /proc; refused where the host's /proc is partly masked (e.g. in Docker)
        _mount("proc", base + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        pass
    os.mkdir(base + "/tmp")
    _mount("tmpfs", base + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           f"size={work_mb}m,nr_inodes=1024,mode=700")
    libc.sethostname(b"sandbox", 7)
    os.chdir(base)
    _syscall("pivot_root", b".", b".")  # the host's tree is now stacked under "." ...
    _check(libc.umount2(b".", MNT_DETACH), "umount old root")  # ... and detached from this namespace
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


# ---- privileges -------------------------------------------------------------------------------------

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _drop_capabilities() -> None:
    """Clear the ambient, bounding, inheritable, permitted and effective sets (in the user namespace the
    keeper created, this process started with all of them)."""
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) != 0:
            if ctypes.get_errno() == 22:  # EINVAL: past the last capability this kernel knows
                break
            _check(-1, f"dropping capability {cap} from the bounding set")
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3, all zero
    _check(libc.capset(ctypes.byref(header), data), "capset")


def _capabilities_held() -> bool:
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    _check(libc.capget(ctypes.byref(header), data), "capget")
    return any(d.effective or d.permitted or d.inheritable for d in data)


def _drop_privileges(bpf: bytes | None, confined: bool) -> None:
    """no_new_privs, no capabilities (confined only: unconfined, a non-root user has none and root keeps its
    own), then the seccomp filter, which would refuse some of the calls before it. Checked afterwards."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if confined:
        _drop_capabilities()
    if bpf is not None:
        buf = ctypes.create_string_buffer(bpf, len(bpf))
        prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
        _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))
    if libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1 or \
            (bpf is not None and libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0) != 2) or \
            (confined and (_capabilities_held() or os.getuid() == 0)):
        raise SetupError("privileges are still held after dropping them")


def _set_limits(limits: dict) -> None:
    mb = 1 << 20
    for res, value in ((resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1)),
                       (resource.RLIMIT_AS, (limits["memory_mb"] * mb,) * 2),
                       (resource.RLIMIT_FSIZE, (limits["max_file_mb"] * mb,) * 2),
                       (resource.RLIMIT_NOFILE, (64, 64)),
                       (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(res, value)
    if limits["nproc"] is not None:  # processes + threads of this uid (in its own user namespace, the sandbox's)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"],) * 2)


# ---- the processes ------------------------------------------------------------------------------------

def _report(status_fd: int, text: str) -> None:
    try:
        os.write(status_fd, (text.replace("\n", " ") + "\n").encode())
    except OSError:
        pass


def _exit_like(wait_status: int) -> None:
    """End this process the way the child ended (its exit code, or the signal that killed it)."""
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(wait_status))


def _prepare_program(req: dict, status_fd: int) -> str:
    """Write the files, apply the limits and drop the privileges, then say "ok" and close the status pipe.
    Returns the entry file, which the caller runs outside every `try` (the program's exceptions are its own)."""
    workdir = req["workdir"]
    for name, text in req["files"].items():
        path = os.path.join(workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    os.chdir(workdir)
    _set_limits(req["limits"])
    bpf = req["seccomp_bpf"]
    _drop_privileges(None if bpf is None else bytes.fromhex(bpf), confined=req["isolation"] == "namespaces")
    sys.path[:] = [workdir] + req["plan"]["sys_path"]
    sys.argv = [req["entry"]]
    sys.executable = req["plan"]["executable"]
    os.closerange(4, status_fd)  # only stdin, stdout, stderr and the results (fd 3) reach the program
    os.closerange(status_fd + 1, 1 << 16)
    _report(status_fd, "ok")
    os.close(status_fd)
    return req["entry"]


def _init(req: dict, sources: dict, status_fd: int) -> str:
    """PID 1 of the sandbox: the fresh root, then the program."""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the keeper dies with the process group: so do we
        _build_root(req["plan"], sources, req["limits"]["work_mb"])
        _close_sources(sources)
        return _prepare_program(req, status_fd)
    except (SetupError, OSError, ValueError) as e:
        _report(status_fd, f"error: {e}")
        os._exit(EXIT_SETUP_FAILED)


def _keeper(req: dict, status_fd: int, to_boot: int, from_boot: int) -> str:
    """In fresh namespaces (the PID namespace applies to its children): fork the init, relay its end."""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _check(libc.unshare(NAMESPACES), "unshare (user namespaces)")
        os.write(to_boot, b"u")
        if os.read(from_boot, 1) != b"m":  # boot could not write the id maps (it reported why)
            os._exit(EXIT_SETUP_FAILED)
        os.close(to_boot)
        os.close(from_boot)
        sources = _open_sources(req["plan"])  # in the new mount namespace, still as the host user
        os.setresgid(INNER_ID, INNER_ID, INNER_ID)
        os.setresuid(INNER_ID, INNER_ID, INNER_ID)
        pid = os.fork()
    except (SetupError, OSError) as e:
        _report(status_fd, f"error: {e}")
        os._exit(EXIT_SETUP_FAILED)
    if pid == 0:
        return _init(req, sources, status_fd)
    _close_sources(sources)
    os.close(status_fd)
    _exit_like(os.waitpid(pid, 0)[1])


def _write_id_maps(pid: int, host_uid: int, host_gid: int) -> None:
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    for name, inner, outer in (("uid_map", INNER_ID, host_uid), ("gid_map", INNER_ID, host_gid)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"{inner} {outer} 1\n")


def _boot_namespaces(req: dict, status_fd: int) -> str:
    """Host side: fork the keeper, give its user namespace its id maps, relay its end."""
    if os.geteuid() == 0:
        try:  # root's supplementary groups would otherwise stay with the program
            os.setgroups([])
        except PermissionError:  # root of a user namespace whose creator denied setgroups: nobody can change them
            pass
    to_boot_r, to_boot_w = os.pipe()
    from_boot_r, from_boot_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_boot_r)
        os.close(from_boot_w)
        return _keeper(req, status_fd, to_boot_w, from_boot_r)
    os.close(to_boot_w)
    os.close(from_boot_r)
    if os.read(to_boot_r, 1) == b"u":
        try:
            _write_id_maps(pid, req["host_uid"], req["host_gid"])
            os.write(from_boot_w, b"m")
        except OSError as e:
            _report(status_fd, f"error: mapping the sandbox's uid {req['host_uid']} into its user namespace: {e}")
    os.close(from_boot_w)
    os.close(to_boot_r)
    os.close(status_fd)
    _exit_like(os.waitpid(pid, 0)[1])


def _place_fds(req: dict) -> int:
    """The result channel becomes fd 3 (the driver writes there); every other inherited fd but the status
    pipe is closed. Returns the status pipe's fd."""
    status_fd, results_fd = req["status_fd"], req["results_fd"]
    if results_fd != 3:
        if status_fd == 3:
            status_fd = os.dup(3)
        os.dup2(results_fd, 3)
    os.closerange(4, status_fd)
    os.closerange(status_fd + 1, 1 << 16)
    return status_fd


def main() -> str:
    """Set everything up; returns the entry file in the one process that is to run it."""
    with os.fdopen(int(sys.argv[1]), "rb") as f:
        req = marshal.loads(f.read())
    status_fd = req["status_fd"]
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the parent died: nobody will collect the result
        status_fd = _place_fds(req)
        if req["isolation"] == "none":
            return _prepare_program(req, status_fd)
        return _boot_namespaces(req, status_fd)
    except (SetupError, OSError, ValueError) as e:
        _report(status_fd, f"error: {e}")
        os._exit(EXIT_SETUP_FAILED)


def run_main(entry: str) -> None:
    """Run the entry file as __main__ (what `python FILE` does; runpy would cost an import of importlib.util)."""
    with open(entry, "rb") as f:
        code = compile(f.read(), os.path.abspath(entry), "exec")
    module = type(sys)("__main__")
    module.__file__ = os.path.abspath(entry)
    sys.modules["__main__"] = module
    exec(code, module.__dict__)


if __name__ == "__main__":
    run_main(main())
