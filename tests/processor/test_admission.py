"""Admission: a queued call whose caller has gone leaves the queue instead of taking a worker."""

from __future__ import annotations

import threading

import grpc
import pytest

from processor.errors import DeadlineExceeded
from processor.service import Admission


def test_a_queued_call_whose_caller_is_gone_leaves_the_queue() -> None:
    admission = Admission(workers=1, queue=1)
    asked, gone = threading.Event(), threading.Event()
    outcome: list[object] = []

    def alive() -> bool:
        asked.set()  # only a call waiting for a worker asks
        return not gone.is_set()

    def queued() -> None:
        try:
            with admission.admit(alive):
                outcome.append("ran")
        except DeadlineExceeded as exc:
            outcome.append(exc.code)

    with admission.admit():  # the only worker is busy
        waiter = threading.Thread(target=queued)
        waiter.start()
        assert asked.wait(timeout=10), "the queued call never looked at its caller"
        gone.set()
        waiter.join(timeout=10)
        assert outcome == [grpc.StatusCode.DEADLINE_EXCEEDED]
        with pytest.raises(DeadlineExceeded), admission.admit(lambda: False):
            pass  # its queue slot is free again: queued (not Overloaded), then gone
    with admission.admit():  # and the worker is free once the busy call is done
        pass
