"""Fault injection: a spool whose disk is full, on any machine (no mount, no privilege)."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path
from typing import Any


def _path_of(fd: int) -> Path | None:
    """The file an open descriptor refers to (Linux: /proc/self/fd), or None."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


class FullDisk:
    """While active (``with FullDisk(directory, capacity):``), ``os.fsync`` of a regular file
    under ``directory`` fails with ENOSPC once the regular files there hold more than
    ``capacity`` bytes, as on a file system of that size; ``capacity=0``: every such fsync
    fails. Other files (the audit log, SQLite, which does its own fsync in C) are untouched.

    fsync is where a file system that defers allocation reports a full disk, and the spool
    calls it for every instance whatever way it writes the bytes; :attr:`refused` lists the
    files whose fsync failed, so a test can check the fault was injected at all.
    """

    def __init__(self, directory: Path, capacity: int = 0) -> None:
        self.directory = Path(directory).resolve()
        self.capacity = capacity
        self.refused: list[Path] = []
        self._real_fsync = os.fsync
        self._lock = threading.Lock()

    def used(self) -> int:
        """Bytes held by the regular files under the directory now."""
        total = 0
        for path in self.directory.rglob("*"):
            try:
                info = path.lstat()
            except FileNotFoundError:  # renamed or removed meanwhile
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
        return total

    def _fsync(self, fd: Any) -> None:  # what os.fsync takes: a descriptor or a file
        number = fd if isinstance(fd, int) else fd.fileno()
        path = _path_of(number)
        if (path is not None and path.is_relative_to(self.directory)
                and stat.S_ISREG(os.fstat(number).st_mode)):
            with self._lock:  # the SCP stores from one thread per association
                if self.used() > self.capacity:
                    self.refused.append(path)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self._real_fsync(fd)

    def __enter__(self) -> FullDisk:
        os.fsync = self._fsync
        return self

    def __exit__(self, *exc: object) -> None:
        os.fsync = self._real_fsync
