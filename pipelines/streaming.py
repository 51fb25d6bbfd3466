"""Stream a blocking job's events: the job runs in a worker thread and emits into a queue."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_FINISHED = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def stream_events(work: Callable[[Callable[[Any], None]], Any], *, name: str = "worker") -> Iterator:
    """Run `work(emit)` in a thread; yield everything it emits as it happens, then its return value.

    An exception in `work` is re-raised in the consumer, after the events emitted before it.
    """
    events: queue.Queue = queue.Queue()

    def target():
        try:
            events.put(work(events.put))
        except BaseException as error:  # handed to the consumer, which re-raises it
            events.put(_Failure(error))
        finally:
            events.put(_FINISHED)

    worker = threading.Thread(target=target, name=name, daemon=True)
    worker.start()
    while (event := events.get()) is not _FINISHED:
        if isinstance(event, _Failure):
            raise event.error
        yield event
    worker.join()
