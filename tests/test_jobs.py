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


def test_finished_jobs_let_go_of_their_results_then_are_forgotten_in_the_order_they_finished(worker, monkeypatch):
    """A job submitted first but finished last is the newest: expiry goes by finishing time."""
    from pipelines.jobs import worker as jobs

    monkeypatch.setattr(jobs, "KEEP_FINISHED_RESULTS", 2)
    monkeypatch.setattr(jobs, "KEEP_FINISHED_JOBS", 3)
    paused = threading.Event()

    def waits_for_the_others(job):
        job.emit("event first")
        job.pause()
        paused.set()
        job.checkpoint()          # paused: the jobs queued behind it run here, and finish before it
        return "first"

    first = worker.submit(waits_for_the_others, kind="small")
    assert paused.wait(WAIT)
    quick = [worker.submit(lambda job, n=n: (job.emit(f"event {n}"), n)[1], kind="small") for n in range(4)]
    for job in quick:
        job.result(WAIT)
    first.resume()
    assert first.result(WAIT) == "first"
    # finished in the order quick 0, 1, 2, 3, first: the 2 newest keep their results, the 3 newest are found
    done = [first, *quick]
    assert [worker.find(job.id) is not None for job in done] == [True, False, False, True, True]
    assert [job.expired for job in done] == [False, True, True, True, False]
    assert quick[2].result() is None and list(quick[2].events()) == []
    assert first.result() == "first" and list(first.events()) == ["event first"]
    assert quick[3].result() == 3 and list(quick[3].events()) == ["event 3"]


def test_a_training_keeps_its_result_while_a_stream_of_small_jobs_comes_and_goes(worker, monkeypatch):
    """Bug 3: finished jobs expired by submission order, so a training (submitted before the generations it let
    run at its checkpoints, finished after them) lost its result to newer small jobs, and a reloaded LoRA-training
    page found nothing. Background work's results are kept apart from the small jobs' cap."""
    from pipelines.jobs import worker as jobs

    monkeypatch.setattr(jobs, "KEEP_FINISHED_RESULTS", 2)
    monkeypatch.setattr(jobs, "KEEP_FINISHED_JOBS", 3)
    started, generations_queued = threading.Event(), threading.Event()

    def training(job):
        started.set()
        generations_queued.wait(WAIT)
        job.emit("loss 0.1")
        job.checkpoint()          # the queued generations run here
        return "models/lora/mine.safetensors"

    trained = worker.submit(training, kind="train-lora", owner="alice", priority=Priority.BACKGROUND)
    assert started.wait(WAIT)
    during = [worker.submit(lambda job, n=n: n, kind="txt2img", owner="bob") for n in range(3)]
    generations_queued.set()
    assert trained.result(WAIT) == "models/lora/mine.safetensors"
    after = [worker.submit(lambda job, n=n: n, kind="txt2img", owner="bob") for n in range(4)]
    for job in after:
        job.result(WAIT)
    # the page reloaded after all of them still finds the training, its events and its result
    assert worker.find(trained.id) is trained and not trained.expired
    assert list(trained.stream()) == ["loss 0.1", "models/lora/mine.safetensors"]
    small = during + after        # finished in this order; the cap holds for them alone
    assert [worker.find(job.id) is not None for job in small] == [False, False, False, False, True, True, True]
    assert [job.expired for job in small] == [True, True, True, True, True, False, False]


def test_current_never_fails_when_the_running_job_ends_between_the_check_and_the_read(worker):
    """Bug 8: `current` read the running list twice (`list[-1] if list else None`); a job ending in between (the
    device thread pops it) made `/progress` raise IndexError. The list here empties right after its first read,
    as if the job ended just then."""
    from pipelines.jobs.worker import Job

    class EndsAfterOneLook(list):
        def _look(self, read):
            seen = read()
            self.clear()          # the device thread finishes the job right after this read
            return seen

        def __bool__(self):
            return self._look(lambda: list.__len__(self) > 0)

        def __len__(self):
            return self._look(lambda: list.__len__(self))

        def __getitem__(self, index):
            return self._look(lambda: list.__getitem__(self, index))

    running = Job(lambda job: None, kind="txt2img", owner="alice", priority=Priority.INTERACTIVE, worker=worker)
    worker._running = EndsAfterOneLook([running])
    assert worker.current in (running, None)      # what one look saw: the job, or that it had ended
    assert worker.current is None                 # it has ended now
