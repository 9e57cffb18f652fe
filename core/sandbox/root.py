"""The sandbox's filesystem: a fresh root holding only what the untrusted code needs.

build_minimal_root(read_only_paths) runs in the sandbox runner's own mount namespace, before the
target is loaded. It mounts a tmpfs as the new root, binds each of `read_only_paths` into it at
the same path (read-only, nosuid, nodev; a path reached through a symlink also at its real
path), adds a private writable /tmp, a /dev of null/zero/full/random/urandom, the namespace's
/proc and a generated /etc (passwd and group naming root and nobody, and the dynamic loader's
cache), then pivots into it and detaches the old root: whatever is not listed is not there at
all (no /home, /root, host /etc, /var, /run, run directories, caches, ~/.ray).

What a target sees is MOUNTS (every target) + the package of its factory + its own files (the
caller's list: reward_workers/sandbox.py for graders, rollout_workers/environments for
environments):

| mount (read-only)                               | why                                             |
|-------------------------------------------------|-------------------------------------------------|
| sys.base_prefix (+ sysconfig stdlib paths)      | the interpreter, libpython, stdlib, lib-dynload |
| /usr (+ /lib, /lib64, /bin, /sbin as on host)   | libc, libm, libssl, libsqlite3, libstdc++, ...  |
| /etc/ld.so.cache                                | the dynamic loader's index of those libraries   |
| sys.prefix (the virtualenv)                     | site-packages: torch, triton, pydantic, ...     |
| <checkout>/core                                 | the runner (core/sandbox/)                      |
| the factory's top-level package                 | e.g. reward_workers (the grader library)        |
| the target's own files                          | e.g. a python grader's file, an environment's   |
Writable: /tmp (tmpfs, 64 MiB: the per-sample and per-episode working directories, Triton's
cache). /proc is the sandbox's own pid namespace, read-only.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys
import sysconfig

libc = ctypes.CDLL(None, use_errno=True)

# Linux ABI constants (include/uapi/linux/mount.h, fcntl.h; the unified syscall table).
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x1, 0x2, 0x4, 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442  # same on x86-64 and arm64
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine())
OPEN_TREE_CLONE, O_CLOEXEC, MOVE_MOUNT_F_EMPTY_PATH = 0x1, 0o2000000, 0x4
DEVICES = ("null", "zero", "full", "random", "urandom")
TOP_LEVEL_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")  # /lib -> usr/lib on merged-/usr
SCRATCH_MB = 64
NOBODY = 65534
PASSWD = f"root:x:0:0:root:/tmp:/usr/sbin/nologin\nnobody:x:{NOBODY}:{NOBODY}:nobody:/tmp:/usr/sbin/nologin\n"
GROUP = f"root:x:0:\nnogroup:x:{NOBODY}:\n"


# -- the table ----------------------------------------------------------------------------------


def interpreter_paths() -> list[str]:
    """The interpreter's prefix and any stdlib directory sysconfig places elsewhere."""
    paths = [sys.base_prefix]
    for name in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths(vars={"installed_base": sys.base_prefix}).get(name)
        if path and not os.path.realpath(path).startswith(os.path.realpath(sys.base_prefix) + "/"):
            paths.append(path)
    return paths


def system_library_paths() -> list[str]:
    """/usr, and /lib* when they are directories of their own (not merged-/usr symlinks)."""
    lib_dirs = [f"/{n}" for n in TOP_LEVEL_LINKS if n.startswith("lib") and not os.path.islink(f"/{n}")]
    return ["/usr"] + [path for path in lib_dirs if os.path.isdir(path)] + ["/etc/ld.so.cache"]


def core_package() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # <checkout>/core


MOUNTS = (interpreter_paths, system_library_paths, lambda: [sys.prefix], lambda: [core_package()])


def package_location(module: str) -> tuple[str, str]:
    """(what to mount, what to put on sys.path) for the top-level package of `module`, found
    without importing it: its directory (or file) and the directory holding that."""
    top = module.split(".", 1)[0]
    spec = importlib.util.find_spec(top)
    if spec is None:
        raise ModuleNotFoundError(f"no module named {top!r}")
    if spec.submodule_search_locations:
        location = list(spec.submodule_search_locations)[0]
    elif spec.origin:
        location = spec.origin
    else:
        raise ModuleNotFoundError(f"{top!r} has no location on disk")
    return location, os.path.dirname(location)


def read_only_paths(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every read-only path of the sandbox root: MOUNTS, then `extra`, in order, without
    duplicates or paths that do not exist."""
    paths = [path for source in MOUNTS for path in source()] + list(extra)
    return list(dict.fromkeys(path for path in paths if os.path.lexists(path)))


# -- the builder ------------------------------------------------------------------------------


def check(ret: int, what: str) -> None:
    """Raise OSError (with errno) if a libc call returned an error (-1)."""
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    encode = lambda text: text.encode() if text is not None else None
    ret = libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))
    check(ret, f"mount {target}")


class MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def set_read_only(path: str | None, fd: int = AT_FDCWD, recursive: bool = True) -> None:
    """mount_setattr: read-only, nosuid, nodev (of the tree at `path`, or the detached tree `fd`)."""
    attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    flags = (AT_RECURSIVE if recursive else 0) | (AT_EMPTY_PATH if path is None else 0)
    target = b"" if path is None else path.encode()
    ret = libc.syscall(SYS_MOUNT_SETATTR, fd, target, flags, ctypes.byref(attr), ctypes.sizeof(attr))
    check(ret, f"make {path or 'a bind mount'} read-only")


def _clone(path: str) -> int:
    """A detached, read-only copy of the mount tree at `path` (a file or a directory)."""
    fd = libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | AT_RECURSIVE | O_CLOEXEC)
    check(fd, f"open_tree {path}")
    set_read_only(None, fd)
    return fd


def _attach(fd: int, root: str, path: str, is_dir: bool) -> None:
    target = root + path
    os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
    if not is_dir and not os.path.exists(target):
        open(target, "w").close()
    ret = libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH)
    check(ret, f"move_mount {path}")


def _build_dev(root: str) -> None:
    dev = root + "/dev"
    os.mkdir(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "size=64k,mode=0755")
    for name in DEVICES:
        open(f"{dev}/{name}", "w").close()
        mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{dev}/{name}")
    os.symlink("/proc/self/fd", f"{dev}/fd")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def build_minimal_root(read_only: list[str], staging: str = "/tmp", scratch_mb: int = SCRATCH_MB) -> None:
    """Replace this mount namespace's filesystem by a fresh root holding `read_only` (absolute
    paths, bound read-only at the same place), /tmp, /dev, /proc and a tiny /etc; pivot into it.
    Needs CAP_SYS_ADMIN over the mount namespace. /proc stays writable (the caller drops its
    privileges through it, then calls set_read_only("/proc")). The cwd becomes /."""
    if SYS_PIVOT_ROOT is None:
        raise RuntimeError(f"pivot_root: unknown syscall number on {platform.machine()}")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here may propagate to the host
    # Clone every source first: the staging tmpfs hides whatever lies under it (a venv in /tmp).
    clones = []
    for path in read_only:
        real = os.path.realpath(path)
        fd = _clone(real)
        clones += [(fd, real, os.path.isdir(real))]
        if os.path.abspath(path) != real:  # reached through a symlink: also at the given path
            clones += [(_clone(real), os.path.abspath(path), os.path.isdir(real))]
    mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    root = staging
    for name in TOP_LEVEL_LINKS:
        if os.path.islink(f"/{name}"):
            os.symlink(os.readlink(f"/{name}"), f"{root}/{name}")
    os.mkdir(f"{root}/etc")
    _write(f"{root}/etc/passwd", PASSWD)
    _write(f"{root}/etc/group", GROUP)
    os.mkdir(f"{root}/tmp")
    mount("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={scratch_mb}m,mode=1777")
    _build_dev(root)
    os.mkdir(f"{root}/proc")
    mount("/proc", f"{root}/proc", None, MS_BIND | MS_REC)
    for fd, path, is_dir in clones:  # after /tmp: a path under /tmp lands in the private one
        _attach(fd, root, path, is_dir)
        os.close(fd)
    set_read_only(root, recursive=False)  # the root tmpfs itself; /tmp below stays writable
    os.chdir(root)
    check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "detach the old root")  # the old root was stacked on "."
    os.chdir("/")
