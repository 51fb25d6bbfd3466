"""Stream a blocking job's events: the job runs on the device thread and emits into a queue.

Every thread that runs a parallel torch kernel gets an OpenMP team of its own, and the teams
stay. On this 2-core CPU one generation took 0.47 s on the main thread, but 1.0 s on another
thread once the main thread had run any parallel kernel (loading a model is enough): the two
teams fight over the cores. So everything that touches model weights (loading, unloading,
generating, the explorer's encoding and decoding) runs on this one thread: `stream_events` for
jobs that report progress, `on_device_thread` for plain calls. `python -m bench.threads`
measures it.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

_FINISHED = object()
# One worker for all device work; jobs queue behind each other (the UI serialises them anyway).
_DEVICE_THREAD_IDENT: list[int] = []


def _start_device_thread() -> None:
    _DEVICE_THREAD_IDENT.append(threading.get_ident())
    torch.set_num_threads(torch.get_num_threads())  # the process-wide count, set for this thread's team


_DEVICE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device", initializer=_start_device_thread)


def _on_the_device_thread() -> bool:
    return threading.get_ident() in _DEVICE_THREAD_IDENT


def run_on_device_thread(function: Callable[..., Any], *args, **kwargs) -> Any:
    """Call `function(*args, **kwargs)` on the device thread and return its result (or raise its
    exception). Called from the device thread itself, it just calls the function."""
    if _on_the_device_thread():
        return function(*args, **kwargs)
    return _DEVICE_THREAD.submit(function, *args, **kwargs).result()


def on_device_thread(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator form of `run_on_device_thread`, for plain (non-generator) functions."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return run_on_device_thread(function, *args, **kwargs)
    return wrapper


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def stream_events(work: Callable[[Callable[[Any], None]], Any]) -> Iterator:
    """Run `work(emit)` on the device thread; yield everything it emits as it happens, then its return
    value. Called from the device thread itself, `work` runs at once and its events are yielded
    when it has finished (there is no other thread to run it on).

    An exception in `work` is re-raised in the consumer, after the events emitted before it.
    """
    if _on_the_device_thread():
        collected: list = []
        collected.append(work(collected.append))
        yield from collected
        return
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
