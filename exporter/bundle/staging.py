"""Writing outputs without losing anything: build in a hidden sibling folder, swap it into place
when done (`publish`); a bundle that failed its gate is kept at `<output>.rejected` (`keep_rejected`).

A staging folder is `.NAME.partial-PID-RANDOM` beside the output. A build that is killed (SIGKILL,
OOM killer, a lost session) cannot remove its own, and each holds the build's graphs and engine
(261 MB apiece in the report that found them piling up), so every `new_staging` first removes the
stale siblings of the same NAME (`remove_stale`).

Which sibling is stale: each staging folder holds OWNER_FILE, and its builder keeps an exclusive
flock(2) on that file for as long as the folder is in use. The kernel drops the lock when the
process dies, however it dies, so a folder whose lock can be taken has no builder left. That is
robust where the PID in the name is not: PIDs are reused (pid_max is 32768 on many systems, and
containers restart from 1), so "a process with that PID is alive" may name an unrelated process,
and comparing start times from /proc/PID/stat is Linux-only and still racy. The PID check remains
as the fallback for a folder without OWNER_FILE (killed between mkdir and the lock; a folder whose
lock was dropped on publish; a filesystem without flock), where it errs on the side of keeping:
a live PID, or one of another user (PermissionError), keeps the folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; stale folders are judged by their PID alone
    fcntl = None  # type: ignore[assignment]

OWNER_FILE = ".enginekit-owner.lock"
_HELD: dict[str, int] = {}  # staging folder of this process → the fd whose flock marks it in use
# renameat2(2) constants from <fcntl.h> / <linux/fs.h>.
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def new_staging(dest: Path) -> Path:
    """Create and return a hidden, unique sibling folder of `dest` (its parents created too), locked
    by this process until `release_staging`/`remove_staging` (or its exit); stale siblings of
    earlier, killed builds into `dest` are removed first."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    _lock(staging)
    return staging


def _lock(staging: Path) -> None:
    """Hold an exclusive flock on staging/OWNER_FILE. The file is locked under a temporary name and
    then renamed into place (the lock follows the inode), so no other build ever sees an unlocked
    OWNER_FILE in a live folder."""
    if fcntl is None:
        return
    tmp = staging / f"{OWNER_FILE}.{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # no flock on this filesystem: the PID in the folder's name is all there is
        os.close(fd)
        tmp.unlink(missing_ok=True)
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.replace(tmp, staging / OWNER_FILE)
    _HELD[str(staging)] = fd


def release_staging(folder: Path) -> None:
    """Drop the owner file and lock of a staging folder that is about to become a bundle (publish,
    keep_rejected), so the published folder holds only the bundle's files."""
    fd = _HELD.pop(str(folder), None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        (Path(folder) / OWNER_FILE).unlink()
    os.close(fd)


def remove_staging(folder: Path) -> None:
    """Remove a staging folder and release its lock."""
    fd = _HELD.pop(str(folder), None)
    shutil.rmtree(folder, ignore_errors=True)  # removed while still locked: no other build takes it meanwhile
    if fd is not None:
        os.close(fd)


def remove_stale(dest: Path) -> list[Path]:
    """Remove `.NAME.partial-PID-*` and `.NAME.old-PID-*` siblings of `dest` left by builds that are
    gone (see the module docstring); returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(partial|old)-(\d+)-[0-9a-f]+")
    removed = []
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        m = pattern.fullmatch(path.name)
        if m is None or str(path) in _HELD:
            continue
        try:
            if path.is_symlink() or not path.is_dir() or path.stat().st_uid != getattr(os, "getuid", lambda: 0)():
                continue  # another user's folder is theirs to remove (and we could not)
        except OSError:
            continue
        if _remove_if_stale(path, int(m.group(2))):
            removed.append(path)
    return removed


def _remove_if_stale(path: Path, pid: int) -> bool:
    owner = path / OWNER_FILE
    try:
        fd = os.open(owner, os.O_RDONLY) if fcntl is not None else None
    except FileNotFoundError:
        fd = None
    except OSError:
        return False
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # its builder holds the lock: alive
        except OSError:
            os.close(fd)  # no flock here: fall back to the PID
            fd = None
        else:
            try:  # removed while we hold its lock, so two cleaners never race on it
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)
            return True
    if not _pid_gone(pid):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def _pid_gone(pid: int) -> bool:
    """True only when no process has this PID (a live one, or one we may not signal, keeps it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False


def publish(bundle: Path, output: Path) -> None:
    """Move the finished bundle to `output`. An existing `output` (--force) is replaced atomically:
    there is never a moment without a bundle at `output`, and a kill leaves either the old or the new one."""
    release_staging(bundle)
    if not os.path.lexists(output):
        os.replace(bundle, output)
        return
    if _exchange(bundle, output):
        _remove(bundle)  # the staging name now holds the old bundle
        return
    # No renameat2 exchange here (not Linux, glibc < 2.28, or a filesystem that returns EINVAL, such
    # as some FUSE and network filesystems): two renames, the old bundle aside first. A kill between
    # them leaves nothing at `output` (the old bundle is in the .old- sibling, removed as stale later).
    trash = output.with_name(f".{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(output, trash)
    os.replace(bundle, output)
    _remove(trash)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths `a` and `b` (renameat2 RENAME_EXCHANGE, Linux ≥ 3.15, glibc ≥ 2.28).
    False where that is not available; other failures raise OSError."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOENT):
        return False  # ENOENT: `b` vanished meanwhile; a plain rename will do
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def keep_rejected(bundle: Path, output: Path) -> Path:
    """Move a bundle that failed its gate to `<output>.rejected` (replacing an older one); returns that path."""
    rejected = output.with_name(output.name + ".rejected")
    publish(bundle, rejected)
    return rejected
