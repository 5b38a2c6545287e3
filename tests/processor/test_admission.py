"""Admission: a queued call whose caller has gone leaves the queue instead of taking a worker."""

from __future__ import annotations

import threading

import grpc
import pytest

from processor.errors import Cancelled, DeadlineExceeded, ServiceError
from processor.service import Admission
from tests.callers import FakeCaller


@pytest.mark.parametrize(
    ("end", "code"),
    [
        (FakeCaller.cancel, grpc.StatusCode.CANCELLED),
        (FakeCaller.expire, grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_a_queued_call_whose_caller_is_gone_leaves_the_queue(end, code) -> None:
    admission = Admission(workers=1, queue=1)
    caller = FakeCaller()
    outcome: list[object] = []

    def queued() -> None:
        try:
            with admission.admit(caller):
                outcome.append("ran")
        except ServiceError as exc:
            outcome.append(exc.code)

    with admission.admit():  # the only worker is busy
        waiter = threading.Thread(target=queued)
        waiter.start()
        assert caller.asked.wait(timeout=10), "the queued call never looked at its caller"
        end(caller)
        waiter.join(timeout=10)
        assert outcome == [code]
        gone = FakeCaller()
        gone.cancel()
        with pytest.raises(Cancelled), admission.admit(gone):
            pass  # its queue slot is free again: queued (not Overloaded), then gone
    with admission.admit():  # and the worker is free once the busy call is done
        pass


def test_a_call_whose_deadline_passed_while_queued_does_not_run() -> None:
    admission = Admission(workers=1, queue=1)
    late = FakeCaller()
    late.expire()
    with pytest.raises(DeadlineExceeded, match="deadline passed"), admission.admit(late):
        pytest.fail("ran for a caller whose deadline had passed")
