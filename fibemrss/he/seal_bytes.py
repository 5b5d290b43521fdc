"""Moves SEAL objects to and from bytes: TenSEAL's sealapi can only save to and load from a path."""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from typing import Any, Protocol


class _SavesToPath(Protocol):
    def save(self, path: str) -> None: ...


class _LoadsFromPath(Protocol):
    def load(self, context: Any, path: str) -> None: ...


def _close_and_remove(fd: int, path_to_remove: str | None) -> None:
    os.close(fd)
    if path_to_remove is not None:
        os.unlink(path_to_remove)


class SealBytes:
    """A private scratch file through which SEAL objects become bytes and back.

    On Linux it is an anonymous in-memory file (memfd) reached as /proc/self/fd/N, so nothing
    touches a disk; elsewhere a 0600 temporary file. One lock serializes its users.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        path_to_remove: str | None = None
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            self._fd = os.memfd_create("fibemrss-he", os.MFD_CLOEXEC)
            self._path = f"/proc/self/fd/{self._fd}"
        else:
            self._fd, self._path = tempfile.mkstemp(prefix="fibemrss-he-")
            path_to_remove = self._path
        self._finalizer = weakref.finalize(self, _close_and_remove, self._fd, path_to_remove)

    def dump(self, sealed: _SavesToPath) -> bytes:
        with self._lock:
            sealed.save(self._path)  # std::ofstream truncates first, so no stale tail remains
            return os.pread(self._fd, os.fstat(self._fd).st_size, 0)

    def load_into(self, target: _LoadsFromPath, context: Any, data: bytes) -> None:
        """Fill `target` from `data`; SEAL validates the content against `context` and raises on
        anything malformed (callers translate that into their own error)."""
        with self._lock:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            target.load(context, self._path)

    def close(self) -> None:
        self._finalizer()
