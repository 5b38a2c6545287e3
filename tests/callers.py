"""A call's caller as a waiting call sees it (``processor.errors.Caller``), ended on demand."""

from __future__ import annotations

import threading


class FakeCaller:
    """Active until :meth:`cancel` (time left) or :meth:`expire` (deadline passed)."""

    def __init__(self) -> None:
        self.asked = threading.Event()  # set once a waiting call has looked
        self._ended: str | None = None

    def is_active(self) -> bool:
        self.asked.set()
        return self._ended is None

    def time_remaining(self) -> float:
        return 0.0 if self._ended == "deadline" else 30.0

    def cancel(self) -> None:
        self._ended = "cancelled"

    def expire(self) -> None:
        self._ended = "deadline"
