"""Atomic file writes: a hidden temp file beside the target, fsync, then one rename.

Every writer gets its own temp name (host, pid, random), so two writers of one path never share a
file: each writes a whole file and the last rename wins; readers see the old file or a complete new
one, never a torn one. A killed writer leaves its hidden temp behind; the next writer of the same
path on the same host removes it once its process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

from torchcycle.errors import StorageError

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _prefix(path: Path) -> str:
    """`.NAME.HOST.`; a long NAME is shortened (with a hash of it) so the temp name stays within the file
    system's 255 bytes whenever the target's own name does."""
    name = path.name
    if len(name.encode()) > 150:
        name = name.encode()[:100].decode(errors="ignore") + "-" + hashlib.sha256(path.name.encode()).hexdigest()[:12]
    return f".{name}.{_HOST}."


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside `path`: `.NAME.HOST.PID.RANDOM.partial` (same directory: same file system)."""
    return path.with_name(f"{_prefix(path)}{os.getpid()}.{secrets.token_hex(4)}.partial")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(path: Path) -> None:
    """Remove temps of `path` (files, or a distributed run's directory of parts) left by writers on this host
    whose process has ended (killed, crashed)."""
    import shutil

    prefix = _prefix(path)
    for temp in path.parent.glob(f"{glob.escape(prefix)}*.partial"):
        pid = temp.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if temp.is_dir() and not temp.is_symlink():
                shutil.rmtree(temp, ignore_errors=True)
            with contextlib.suppress(OSError):
                temp.unlink()


def check_writable_target(path: Path) -> None:
    """Refuse, before any work, a target that can never be written: a directory, or a parent that is a file."""
    if path.is_dir():
        raise StorageError(f"cannot write {path}: it is a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StorageError(f"cannot write {path}: {parent} is a file, not a directory")
            break


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it is fsynced and renamed onto `path`, on any error removed.
    File-system errors become StorageError naming the path and the cause."""
    check_writable_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
    except OSError as err:
        raise storage_error(err, path) from None
    temp = temp_path(path)
    try:
        yield temp
        with open(temp, "rb") as fh:
            os.fsync(fh.fileno())  # the bytes are on disk before the name says the file is complete
        os.replace(temp, path)
    except OSError as err:
        _discard(temp)
        raise storage_error(err, path) from None
    except BaseException:
        _discard(temp)
        raise


def _discard(temp: Path) -> None:
    # a read-only file system refuses even the unlink of a file that was never made (EROFS, not ENOENT)
    with contextlib.suppress(OSError):
        temp.unlink(missing_ok=True)


def storage_error(err: OSError, path: Path) -> StorageError:
    """`cannot write PATH: Read-only file system` — the OS's own reason, the user's path."""
    if isinstance(err, StorageError):
        return err
    code = err.errno
    if code is None:  # pyarrow's OSErrors carry the errno only in their text: "... Detail: [errno 13] ..."
        found = re.search(r"\[errno (\d+)\]", str(err))
        code = int(found.group(1)) if found else None
    # the errno's own words: pyarrow puts its whole message (temp file name included) in strerror
    reason = os.strerror(code) if code else (err.strerror or str(err).strip().splitlines()[0])
    return StorageError(f"cannot write {path}: {reason}")
