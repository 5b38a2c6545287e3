"""A parsed file that follows its source on disk: Kubernetes swaps mounted Secrets and
ConfigMaps in place (a symlink flip), so keys and tenants change without a restart.

The file is checked at most once per interval with one ``stat`` (mtime, size, inode,
device); a new version that fails to parse is logged and the last good one stays in use.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

Signature = tuple[int, int, int, int]


class InvalidFile(ValueError):
    """The file could not be read or does not hold what it should; the message says why."""


@dataclass(frozen=True)
class _Loaded(Generic[T]):
    value: T
    signature: Signature


def _signature(path: Path) -> Signature:
    st = os.stat(path)  # follows the symlink, so a swapped target shows a new inode
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class ReloadingFile(Generic[T]):
    """``parse(bytes) -> T``, re-run when the file changes; raises at construction if invalid."""

    def __init__(
        self,
        path: str | Path,
        parse: Callable[[bytes], T],
        what: str,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(path)
        self._parse = parse
        self._what = what
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._loaded = self._load()
        self._next_check = clock() + interval
        self._failed: Signature | None = None
        self._last_problem: tuple[Signature | None, str] | None = None

    @property
    def path(self) -> Path:
        return self._path

    def current(self) -> T:
        """The newest valid version; a stale check costs one stat, and only one thread does it."""
        if self._clock() >= self._next_check and self._lock.acquire(blocking=False):
            try:
                self._refresh()
            finally:
                self._lock.release()
        return self._loaded.value

    def _load(self) -> _Loaded[T]:
        try:
            signature = _signature(self._path)
            data = self._path.read_bytes()
        except OSError as exc:
            raise InvalidFile(f"{self._what} {self._path}: {exc.strerror or exc}") from exc
        try:
            return _Loaded(self._parse(data), signature)
        except InvalidFile as exc:
            raise InvalidFile(f"{self._what} {self._path}: {exc}") from exc
        except Exception as exc:  # e.g. RecursionError from deeply nested JSON or YAML
            raise InvalidFile(f"{self._what} {self._path}: unreadable: {exc}") from exc

    def _refresh(self) -> None:
        self._next_check = self._clock() + self._interval
        try:
            signature = _signature(self._path)
        except OSError as exc:
            self._report(None, f"{self._path}: {exc.strerror or exc}")
            return
        if signature in (self._loaded.signature, self._failed):
            return
        try:
            self._loaded = self._load()
        except InvalidFile as exc:
            self._failed = signature  # do not re-parse the same bad version every second
            self._report(signature, str(exc))
            return
        self._failed = None
        self._last_problem = None
        log.info("reloaded %s from %s", self._what, self._path)

    def _report(self, signature: Signature | None, problem: str) -> None:
        """Log each distinct problem once, not once per check."""
        if (signature, problem) != self._last_problem:
            self._last_problem = (signature, problem)
            log.error("keeping the last good %s: %s", self._what, problem)
