"""One node per storage folder, and patient data readable by nobody else.

A second ``vcemri serve`` on the same ``storage.root`` would "resume" the first node's running
jobs and process them twice. :class:`StorageLock` holds an exclusive OS lock (``flock``) on
``<root>/node.lock`` for the node's life; the kernel drops it when the process dies however it
dies (kill -9 included), so a node that acquires it knows every job marked running belongs to a
node that is gone. The file holds the holder's PID, which the refusal names.

:func:`private_storage` makes what the node writes private: spool files, outputs and the
database (with its -wal and -shm files, which hold PatientID and headers) are created 0600 and
directories 0700 whatever the umask the node was started with, by setting the process umask
to 077; a storage root created earlier under a looser umask is closed to others (0700).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import config

LOCK_FILE = "node.lock"


class StorageLock:
    """The exclusive lock on a storage root; :meth:`acquire` refuses when another process
    holds it, :meth:`release` lets it go."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> StorageLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise config.StorageError(
                f"another vcemri node (PID {holder}) is using the storage folder "
                f"{self.path.parent}",
                hint="stop that node, or give this one its own storage.root") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def holder(root: Path) -> int | None:
    """The PID of the node holding ``root``'s lock, or None when no node runs on it (tried
    with a shared, non-blocking lock that is let go at once: it never stops a node starting)."""
    path = Path(root) / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def private_storage(root: Path) -> None:
    """Umask 077 for this process and the storage root closed to others (see the module
    docstring); creates the root if needed."""
    os.umask(0o077)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
