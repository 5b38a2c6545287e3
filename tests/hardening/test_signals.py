"""``serving.wait_for_signal``: a burst of SIGTERMs ends the wait, every time.

A process group's SIGTERM followed by a supervisor's (``timeout make run``, then the demo
stopping its servers) left a processor deadlocked in its own signal handler: the handler set
an ``Event``, and the second signal re-entered ``Event.set`` while the first held its lock.
Without the fix the child below hung in about one round in thirty here, and a hundred rounds
found it in each of four runs.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 100
CHILD = """
import signal
from processor.serving import wait_for_signal
signal.signal(signal.SIGTERM, lambda *_: None)  # a burst before the wait must not kill us
print("ready", flush=True)
wait_for_signal()
print("done", flush=True)
"""


def burst_until_done(child: subprocess.Popen[str], lines: queue.Queue[str]) -> bool:
    """SIGTERMs in bursts of 500 until the child says "done" (True) or 10 s pass (False).
    More than one burst when the first lands before ``wait_for_signal`` has set up."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for _ in range(500):
            os.kill(child.pid, signal.SIGTERM)
        try:
            if lines.get(timeout=0.2) == "done\n":
                return True
        except queue.Empty:
            pass
    return False


def collect(stream: Iterable[str], into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def test_a_burst_of_sigterms_ends_the_wait_every_time() -> None:
    for round_ in range(ROUNDS):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert child.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=collect, args=(child.stdout, lines), daemon=True).start()
        try:
            assert lines.get(timeout=30) == "ready\n"
            assert burst_until_done(child, lines), f"round {round_}: the wait never ended"
            # later SIGTERMs of the burst may find it already exiting, handlers reset
            assert child.wait(30) in (0, -signal.SIGTERM)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
