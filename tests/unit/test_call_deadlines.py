"""The server's per-call lifetime limit: one watcher thread cancels each call at its deadline."""

from __future__ import annotations

import threading
import time

from fibemrss.platform.capacity import Deadlines


def test_a_call_is_cancelled_at_its_deadline_and_a_finished_one_is_not() -> None:
    deadlines = Deadlines()
    fired: list[str] = []
    done = threading.Event()
    finished = deadlines.add(0.2, lambda: fired.append("finished"))
    deadlines.add(0.3, lambda: (fired.append("overdue"), done.set()))
    deadlines.discard(finished)  # the call ended before its deadline
    assert done.wait(10)
    time.sleep(0.1)
    assert fired == ["overdue"]
    assert deadlines.pending() == 0


def test_an_earlier_deadline_added_later_wakes_the_watcher() -> None:
    deadlines = Deadlines()
    fired: list[str] = []
    early = threading.Event()
    deadlines.add(60.0, lambda: fired.append("late"))  # the watcher now sleeps for a minute
    time.sleep(0.1)
    started = time.monotonic()
    deadlines.add(0.2, lambda: (fired.append("early"), early.set()))
    assert early.wait(10)
    assert time.monotonic() - started < 5
    assert fired == ["early"]
    assert deadlines.pending() == 1


def test_a_failing_cancel_does_not_stop_the_others() -> None:
    deadlines = Deadlines()
    ok = threading.Event()

    def broken() -> None:
        raise RuntimeError("the call is gone")

    deadlines.add(0.1, broken)
    deadlines.add(0.2, ok.set)
    assert ok.wait(10)
