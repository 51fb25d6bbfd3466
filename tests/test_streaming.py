"""All model work runs on one device thread: plain calls, streamed jobs, and calls made from it."""

import threading

import pytest

from pipelines.streaming import on_device_thread, run_on_device_thread, stream_events


def test_plain_calls_run_on_the_device_thread_and_return_their_result():
    caller = threading.get_ident()
    ident, value = run_on_device_thread(lambda x: (threading.get_ident(), x * 2), 21)
    assert value == 42
    assert ident != caller
    assert run_on_device_thread(threading.get_ident) == ident  # the same thread every time
    assert on_device_thread(threading.get_ident)() == ident


def test_an_exception_on_the_device_thread_reaches_the_caller_and_the_thread_keeps_serving():
    def fails():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run_on_device_thread(fails)
    assert run_on_device_thread(lambda: "still serving") == "still serving"


def test_streamed_jobs_share_the_thread_and_calls_from_it_do_not_deadlock():
    device_ident = run_on_device_thread(threading.get_ident)

    def job(emit):
        emit(threading.get_ident())
        inner = run_on_device_thread(threading.get_ident)  # would wait behind itself if it queued
        nested = list(stream_events(lambda inner_emit: (inner_emit("nested event"), "nested result")[1]))
        emit((inner, nested))
        return "done"

    events = list(stream_events(job))
    assert events == [device_ident, (device_ident, ["nested event", "nested result"]), "done"]


def test_events_arrive_while_the_job_is_still_running():
    release = threading.Event()

    def job(emit):
        emit("first")
        if not release.wait(timeout=30):
            raise TimeoutError("the consumer never saw the first event")
        return "last"

    events = stream_events(job)
    assert next(events) == "first"  # the job is blocked until we have seen it
    release.set()
    assert list(events) == ["last"]
