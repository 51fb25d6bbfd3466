"""The device worker: one thread for all model work, jobs with ids, events, priorities, cancel, pause."""

from __future__ import annotations

import threading

import pytest

from pipelines.jobs.worker import DeviceWorker, JobCancelled, JobState, Priority, Progress

WAIT = 30  # seconds a test waits for the worker before it counts as hung


@pytest.fixture
def worker():
    worker = DeviceWorker(name="test-device")
    yield worker
    worker.close()


def test_plain_calls_run_on_one_worker_thread_and_return_their_result(worker):
    caller = threading.get_ident()
    ident, value = worker.call(lambda x: (threading.get_ident(), x * 2), 21)
    assert value == 42 and ident != caller
    assert worker.call(threading.get_ident) == ident  # the same thread every time


def test_an_error_reaches_the_caller_and_the_worker_keeps_serving(worker):
    def fails():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        worker.call(fails)
    job = worker.submit(lambda job: fails(), kind="failing")
    with pytest.raises(ValueError, match="bad input"):
        job.result(WAIT)
    assert job.state is JobState.FAILED
    assert worker.call(lambda: "still serving") == "still serving"


def test_work_started_from_the_worker_runs_at_once_instead_of_waiting_behind_itself(worker):
    def outer(job):
        inner_ident = worker.call(threading.get_ident)
        nested = worker.submit(lambda inner: (inner.emit("nested event"), "nested result")[1], kind="nested")
        return inner_ident, list(nested.stream())

    inner_ident, nested = worker.submit(outer, kind="outer").result(WAIT)
    assert inner_ident == worker.call(threading.get_ident)
    assert nested == ["nested event", "nested result"]


def test_events_arrive_while_the_job_runs_and_a_late_follower_gets_the_backlog(worker):
    release = threading.Event()

    def work(job):
        job.emit("first")
        job.report(1, 3)
        job.report(2, 3)
        if not release.wait(WAIT):
            raise TimeoutError("the follower never saw the first event")
        job.emit("second")
        return "result"

    job = worker.submit(work, kind="demo", owner="alice")
    live = job.events()
    assert next(live) == "first"          # the job is blocked until we have seen it
    late = list(_until_progress(job.events(), done=2))
    assert late == ["first", Progress(2, 3)]   # history, and only the latest transient event
    release.set()
    assert job.result(WAIT) == "result" and job.state is JobState.DONE
    assert [event for event in job.stream() if not isinstance(event, Progress)] == ["first", "second", "result"]
    assert worker.find(job.id) is job and job.progress == Progress(2, 3)


def _until_progress(events, *, done):
    for event in events:
        yield event
        if isinstance(event, Progress) and event.done == done:
            return


def test_cancel_stops_one_job_and_a_queued_job_never_starts(worker):
    started, release = threading.Event(), threading.Event()

    def long_work(job):
        started.set()
        release.wait(WAIT)
        return "stopped early" if job.stop.is_set() else "ran to the end"

    mine = worker.submit(long_work, kind="generate", owner="alice")
    theirs = worker.submit(lambda job: "theirs ran", kind="generate", owner="bob")
    queued = worker.submit(lambda job: "should not run", kind="generate", owner="alice")
    assert started.wait(WAIT)
    queued.cancel()                                      # ends at once: it never started
    assert worker.cancel(owner="alice") == [mine]        # alice's unfinished jobs
    release.set()
    assert mine.result(WAIT) == "stopped early" and mine.state is JobState.CANCELLED
    with pytest.raises(JobCancelled):
        queued.result(WAIT)
    assert theirs.result(WAIT) == "theirs ran" and theirs.state is JobState.DONE  # bob's job was not stopped


def test_an_interactive_job_runs_between_the_steps_of_a_background_job(worker):
    order: list[str] = []
    first_step_done, generation_queued = threading.Event(), threading.Event()

    def training(job):
        for step in range(3):
            order.append(f"train {step}")
            if step == 0:
                first_step_done.set()
                generation_queued.wait(WAIT)
            job.checkpoint()
        return "trained"

    background = worker.submit(training, kind="train", priority=Priority.BACKGROUND)
    assert first_step_done.wait(WAIT)
    interactive = worker.submit(lambda job: order.append("generate") or "image", kind="generate")
    generation_queued.set()
    assert interactive.result(WAIT) == "image" and background.result(WAIT) == "trained"
    assert order == ["train 0", "generate", "train 1", "train 2"]


def test_a_paused_job_waits_at_its_checkpoint_and_lets_queued_work_run(worker):
    order: list[str] = []
    paused_at_step = threading.Event()

    def training(job):
        for step in range(2):
            order.append(f"train {step}")
            if step == 0:
                job.pause()
                paused_at_step.set()
            job.checkpoint()
        return "trained"

    background = worker.submit(training, kind="train", priority=Priority.BACKGROUND)
    assert paused_at_step.wait(WAIT)
    later = worker.submit(lambda job: order.append("other background work"), kind="other",
                          priority=Priority.BACKGROUND)
    later.result(WAIT)            # ran while the training job was paused, though it does not outrank it
    assert order == ["train 0", "other background work"] and not background.finished
    background.resume()
    assert background.result(WAIT) == "trained" and order[-1] == "train 1"


def test_jobs_are_listed_by_owner_and_plain_calls_are_not(worker):
    worker.call(lambda: None)
    done = worker.submit(lambda job: 1, kind="a", owner="alice")
    done.result(WAIT)
    assert worker.jobs(owner="alice", active=False) == [done]
    assert worker.jobs(owner="alice") == []  # finished
    assert worker.jobs(active=False) == [done]


def test_cancelling_a_queued_job_ends_it_at_once_while_another_runs(worker):
    release = threading.Event()
    running = worker.submit(lambda job: release.wait(WAIT), kind="long")
    queued = worker.submit(lambda job: "should not run", kind="queued")
    queued.cancel()
    with pytest.raises(JobCancelled):
        queued.result(timeout=WAIT)          # returns while `running` still holds the worker
    assert queued.state is JobState.CANCELLED and not running.finished
    release.set()
    assert running.result(WAIT) is True


def test_old_finished_jobs_let_go_of_their_results_then_are_forgotten(worker, monkeypatch):
    from pipelines.jobs import worker as jobs

    monkeypatch.setattr(jobs, "KEEP_FINISHED_RESULTS", 2)
    monkeypatch.setattr(jobs, "KEEP_FINISHED_JOBS", 3)
    done = []
    for number in range(5):
        job = worker.submit(lambda job, n=number: (job.emit(f"event {n}"), n)[1], kind="small")
        job.result(WAIT)
        done.append(job)
    worker.submit(lambda job: None, kind="last").result(WAIT)   # each submit prunes what finished before it
    assert [worker.find(job.id) is not None for job in done] == [False, False, True, True, True]
    assert [job.expired for job in done] == [True, True, True, False, False]
    assert done[2].result() is None and list(done[2].events()) == []
    assert done[4].result() == 4 and list(done[4].events()) == ["event 4"]
