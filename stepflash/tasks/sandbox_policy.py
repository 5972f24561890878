"""What the sandbox lets a program see and do, computed once in the trusted parent (see `sandbox.py`).

- `mount_plan()`: the host paths bound read-only into the sandbox's fresh root: the interpreter, its stdlib
  (installed packages hidden), the system library directories and the dynamic loader's cache, plus a few
  device nodes. Nothing else of the host exists there: no /home, /root, /etc, /run, /tmp, project tree or
  sockets.
- `seccomp_bpf(allow_subprocess)`: the seccomp filter, built with libseccomp (through `pyseccomp`, a ctypes
  binding) and exported as BPF bytes that `sandbox_boot.py` loads with one prctl. Default: allow; refused with
  EPERM: everything that changes mounts or namespaces (mount, umount2, pivot_root, chroot, the new mount API,
  unshare, setns, clone with CLONE_NEW* flags), that inspects or changes other processes or the kernel
  (ptrace, process_vm_*, kcmp, pidfd_getfd, bpf, perf_event_open, userfaultfd, keyctl & co., module and kexec
  loading, reboot, swap, accounting, quotas, clocks, hostname, syslog, I/O ports, personality), file handles
  (open_by_handle_at, name_to_handle_at), fanotify, io_uring (its operations bypass seccomp), terminal
  injection (ioctl TIOCSTI/TIOCLINUX) and sockets other than unix, IPv4 and IPv6 (netlink, packet, vsock, ...).
  Without subprocesses also fork, vfork, clone of a process (threads stay possible), execve and execveat.
  clone3 answers ENOSYS (its flags are out of a filter's reach), so the C library falls back to clone.
  Calls of another ABI (i386, x32) kill the process (libseccomp's bad-arch action).

The list follows the seccomp policies of Docker's default profile and flatpak; `docs/sandbox.md` compares.
"""

from __future__ import annotations

import errno
import functools
import glob
import os
import sys
import sysconfig

from stepflash.errors import UserError

SUPPORTED_MACHINES = ("x86_64", "aarch64")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
REFUSED_SYSCALLS = (
    "mount", "umount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "unshare", "setns",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "bpf", "perf_event_open",
    "userfaultfd", "keyctl", "add_key", "request_key", "init_module", "finit_module", "delete_module",
    "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    "lookup_dcookie", "syslog", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "iopl", "ioperm", "personality", "uselib", "nfsservctl", "vm86", "vm86old", "modify_ldt",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "move_pages", "migrate_pages",
)
PROCESS_SYSCALLS = ("fork", "vfork", "execve", "execveat")
CLONE_THREAD = 0x00010000
CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
SOCKET_FAMILIES_ALLOWED = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6 (the network namespace has no route out)
AF_MAX_CHECKED = 10


def _pyseccomp():
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError) as e:  # RuntimeError: libseccomp.so.2 is missing
        raise UserError(f"seccomp needs libseccomp and the pyseccomp package: {e}") from e
    return pyseccomp


@functools.lru_cache(maxsize=None)
def seccomp_bpf(allow_subprocess: bool) -> bytes:
    """The filter as BPF (8-byte instructions), for this machine's native ABI."""
    sc = _pyseccomp()
    f = sc.SyscallFilter(sc.ALLOW)
    eperm = sc.ERRNO(errno.EPERM)

    def refuse(name, *args, action=eperm):
        nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
        if nr >= 0:  # negative: the call does not exist on this architecture
            f.add_rule(action, nr, *args)

    for name in REFUSED_SYSCALLS + (() if allow_subprocess else PROCESS_SYSCALLS):
        refuse(name)
    refuse("clone3", action=sc.ERRNO(errno.ENOSYS))
    for flag in CLONE_NEW_FLAGS:  # clone's flags are its first argument on x86_64 and aarch64
        refuse("clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    if not allow_subprocess:
        refuse("clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    for request in (TIOCSTI, TIOCLINUX):  # compare 32 bits only: the kernel ignores the upper half
        refuse("ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    for family in range(AF_MAX_CHECKED + 1):
        if family not in SOCKET_FAMILIES_ALLOWED:
            refuse("socket", sc.Arg(0, sc.MASKED_EQ, 0xFFFFFFFF, family), action=sc.ERRNO(errno.EAFNOSUPPORT))
    refuse("socket", sc.Arg(0, sc.GT, AF_MAX_CHECKED), action=sc.ERRNO(errno.EAFNOSUPPORT))
    r, w = os.pipe()
    try:
        with os.fdopen(w, "wb", closefd=False) as out:
            f.export_bpf(out)
        os.close(w)
        w = -1
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    return b"".join(chunks)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@functools.lru_cache(maxsize=None)
def mount_plan() -> dict:
    """Host paths the fresh root shows (read-only), as sent to sandbox_boot.py."""
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    dynload = os.path.realpath(sysconfig.get_config_var("DESTSHARED") or stdlib)
    binds, symlinks = [], []
    for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/lib32"):
        if os.path.islink(d):
            symlinks.append((d, os.readlink(d)))
        elif os.path.isdir(d):
            binds.append(d)
    for d in (stdlib, dynload):
        if os.path.isdir(d) and not any(_inside(d, b) for b in binds):
            binds.append(d)
    executable = os.path.realpath(sys.executable)
    libpython = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
    for f in (executable, os.path.realpath(libpython), "/etc/ld.so.cache"):
        if os.path.isfile(f) and not any(_inside(f, b) for b in binds):
            binds.append(f)
    hide = {os.path.join(stdlib, "site-packages"), os.path.join(stdlib, "dist-packages"),
            *glob.glob("/usr/lib/python3*/*-packages"), *glob.glob("/usr/local/lib/python3*/*-packages")}
    hide = sorted(h for h in hide if os.path.isdir(h) and any(_inside(os.path.realpath(h), b) for b in binds))
    sys_path = [p for p in (stdlib, dynload) if os.path.isdir(p)]
    base = next((b for b in ("/tmp", "/media", "/srv", "/mnt", "/opt")
                 if os.path.isdir(b) and not any(_inside(s, b) for s in binds)), None)
    if base is None:
        raise UserError("the sandbox found no directory to build its root on (/tmp, /media, /srv, /mnt, /opt)")
    return {"base": base, "binds": binds, "hide": [os.path.realpath(h) for h in hide], "symlinks": symlinks,
            "devices": [d for d in DEVICES if os.path.exists(d)], "sys_path": list(dict.fromkeys(sys_path)),
            "executable": executable}
