"""`convert.read_ahead`: the converter reads the next source tensor in a thread while it quantizes the
current one; order, errors and an early stop behave as a plain loop's would."""

from __future__ import annotations

import threading
import time

import pytest

from toolkit.convert.read_ahead import read_ahead


def test_items_come_in_order_and_the_next_is_read_meanwhile():
    second_started = threading.Event()

    def source():
        yield 0
        second_started.set()
        yield 1
        yield 2

    got = []
    for item in read_ahead(source()):
        if item == 0:
            # a plain loop would read item 1 only after this body: the wait would time out
            assert second_started.wait(30), "the next item was not read while this one was processed"
        got.append(item)
    assert got == [0, 1, 2]


def test_the_reader_is_never_more_than_one_item_ahead():
    produced = []

    def source():
        for i in range(6):
            produced.append(i)
            yield i

    for item in read_ahead(source()):
        time.sleep(0.05)  # room for a reader that ran further ahead to do so
        # the caller's item and at most the next are alive: two items of memory, not three
        assert len(produced) <= item + 2, (item, produced)
    assert produced == list(range(6))


def test_a_read_error_surfaces_at_its_item():
    def source():
        yield "a"
        yield "b"
        raise ValueError("shard 3 is truncated")

    got = []
    with pytest.raises(ValueError, match="shard 3 is truncated"):
        for item in read_ahead(source()):
            got.append(item)
    assert got == ["a", "b"]


def test_stopping_early_stops_the_reader():
    produced = []

    def source():
        for i in range(1000):
            produced.append(i)
            yield i

    with pytest.raises(RuntimeError, match="quantize failed"):
        for item in read_ahead(source()):
            if item == 2:
                raise RuntimeError("quantize failed")
    # at most one item beyond the failing one (the read-ahead)
    assert len(produced) <= 4, len(produced)
    assert not any(t.name == "phi3-read-ahead" and t.is_alive() for t in threading.enumerate())
