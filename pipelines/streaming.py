"""Stream a blocking job's events: the job runs on the device thread and emits into a queue.

All model work runs on one long-lived thread. PyTorch's CPU kernels keep an OpenMP thread team
per calling thread; a fresh thread per job (or Gradio's pool of handler threads) leaves idle teams
spinning against the busy one, which measured here as 2x slower generation on a 2-core CPU.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_FINISHED = object()
# One worker for all device work; jobs queue behind each other (the UI serialises them anyway).
_DEVICE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def stream_events(work: Callable[[Callable[[Any], None]], Any]) -> Iterator:
    """Run `work(emit)` on the device thread; yield everything it emits as it happens, then its return
    value. `work` must not itself call stream_events (it would wait behind itself).

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

    job = _DEVICE_THREAD.submit(target)
    while (event := events.get()) is not _FINISHED:
        if isinstance(event, _Failure):
            raise event.error
        yield event
    job.result()
