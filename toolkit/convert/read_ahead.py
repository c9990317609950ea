"""Read the next source tensor while the current one is quantized and written.

Reading a tensor (a GGUF's blocks dequantized by gguf-py, a safetensors bf16 cast) runs mostly on one core;
quantizing and writing run in numpy loops that leave the GIL. One tensor read ahead lets both cores work
through a conversion, for the memory of one more source tensor (the next is read only once the caller has
taken this one, not queued behind it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def read_ahead(items: Iterable[T]) -> Iterator[T]:
    """Yield `items` in order, producing the next one in a thread while the caller works on this one, and
    never more than that one: at most two items are alive (the caller's and the next). The producer's
    exception is raised at the item it failed on; closing the generator early (the caller's own error)
    stops the producer and waits for it, so nothing reads the source after this returns."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    turn = threading.Semaphore(1)  # a permit per item to produce: the caller returns one per item taken
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            it = iter(items)
            while True:
                while not turn.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(it, _END)
                if not put((True, item)) or item is _END:
                    return
                del item
        except BaseException as e:  # handed to the caller's thread
            put((False, e))

    worker = threading.Thread(target=produce, name="phi3-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item
            if item is _END:
                return
            turn.release()
            yield item
            del item  # the caller's tensor is not held here while the next one is read
    finally:
        stop.set()
        while worker.is_alive():
            try:
                ready.get(timeout=0.1)  # free a producer blocked on a full queue
            except queue.Empty:
                pass
        worker.join()
