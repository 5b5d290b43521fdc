"""`ingestion.collector_paused`: the cyclic collector is off while any batch is ingested, on again
after the last one (only if it was on), and a long run of overlapping batches still collects."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator

import pytest

from services.emr_gateway.core import ingestion
from services.emr_gateway.core.ingestion import collector_paused


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    gc.enable()
    yield
    gc.enable()


def test_off_inside_on_after_and_off_stays_off() -> None:
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()  # a process that turned it off itself keeps it off
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_overlapping_batches_on_threads_turn_it_on_only_when_the_last_ends() -> None:
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with collector_paused():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        with collector_paused():
            second_in.set()
            first_out.wait(10)
            seen.append(gc.isenabled())  # the first batch has ended, this one has not

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    first_in.wait(10)
    threads[1].start()
    for t in threads:
        t.join(10)
    assert seen == [False]
    assert gc.isenabled()


def test_an_exception_in_the_batch_turns_it_back_on() -> None:
    with pytest.raises(ValueError), collector_paused():
        raise ValueError("a bad batch")
    assert gc.isenabled()


def test_batches_overlapping_past_the_limit_collect_cyclic_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingestion, "MAX_COLLECTOR_PAUSE_SECONDS", 1.0)

    class Node:
        def __init__(self) -> None:
            self.me = self  # a reference cycle: only the collector frees it

    gc.collect()
    with collector_paused():  # held throughout: the collector is never turned on again
        Node()
        with collector_paused():
            pass
        assert sum(isinstance(o, Node) for o in gc.get_objects()) == 1  # not yet past the limit
        time.sleep(1.5)
        with collector_paused():
            pass  # ends past the limit while the outer batch holds on: one collection
        assert sum(isinstance(o, Node) for o in gc.get_objects()) == 0
        assert not gc.isenabled()
