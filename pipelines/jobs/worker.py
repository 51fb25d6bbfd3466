"""Device work as jobs: one worker thread runs them, one at a time, in priority order.

Why one thread: every thread that runs a parallel torch kernel keeps an OpenMP team of its own,
and two teams fight over the cores. On a 2-core CPU one generation took 0.47 s on the main thread
but 1.0 s on another thread once the main thread had loaded a model (`python -m bench.threads`).
So everything that touches model weights (loading, placing, generating, the explorer's encoding
and decoding, training) runs on the `DeviceWorker`'s thread.

A `Job` is one piece of that work: an id, a kind, an owner (a browser session or an API client),
a priority, the events it emits (progress, previews, finished images), a result, and `cancel()`.
Interactive jobs (a generation) queue before background ones (LoRA training); a long job calls
`job.checkpoint()` between its steps, and there queued jobs that outrank it run before it goes on,
so a generation gets in between two training steps. A paused job waits at its next checkpoint
(and lets every queued job run meanwhile). The worker keeps recent jobs by id, so a page that was
reloaded, or an API client, finds a running job again and follows or cancels it.

Finished jobs are let go of in the order they finished, not the order they came: a training that
let twenty generations run at its checkpoints finishes after them, and is the newest. Interactive
and background jobs are counted apart, so a stream of generations never pushes out the result of
the training a reloaded LoRA page is looking for.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

# Per class of work (interactive, background), newest finished first:
KEEP_FINISHED_JOBS = 100      # finished jobs the worker still answers for (by id) ...
KEEP_FINISHED_RESULTS = 8     # ... and how many of them keep their events and result (images, traces)


class Priority(enum.IntEnum):
    """Lower runs first."""
    INTERACTIVE = 0     # a person is waiting: generation, explorer, loading a model
    BACKGROUND = 10     # long work that yields at checkpoints: training


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"     # cancelled before it ran, or stopped early at the owner's request


class JobCancelled(Exception):
    """The job was cancelled before it started, so it has no result."""


@dataclass
class Progress:
    done: int
    total: int
    message: str = ""


_END = object()


class Job:
    """One piece of device work. `work(job)` runs on the worker thread; it reports through
    `job.emit` / `job.report`, looks at `job.stop` (set by `cancel()`), and returns the result."""

    def __init__(self, work: Callable[["Job"], Any], *, kind: str, owner: str | None, priority: int,
                 worker: "DeviceWorker", stop: threading.Event | None = None, listed: bool = True):
        self.id = uuid.uuid4().hex[:12]
        self.kind = kind
        self.owner = owner
        self.priority = int(priority)
        self.created = time.time()
        self.stop = stop or threading.Event()
        self.state = JobState.QUEUED
        self.progress: Progress | None = None
        self.listed = listed
        self._work = work
        self._worker = worker
        self._lock = threading.Lock()
        self._history: list = []             # every lasting event, for subscribers that come late
        self._transient: Any = None          # only the latest transient event (a preview) is kept ...
        self._transient_at = -1              # ... and where in the history it came
        self._subscribers: list[queue.Queue] = []
        self._finished = threading.Event()
        self._paused = False
        self._result: Any = None
        self._error: BaseException | None = None
        self.expired = False                 # finished long enough ago that its events and result were let go

    # -- reporting (from the work) --------------------------------------------------------------
    def emit(self, event: Any, *, transient: bool = False) -> None:
        """Hand `event` to every follower. A transient event (a preview) replaces the previous one
        in the history, so a late follower gets the latest preview, not all of them."""
        with self._lock:
            if transient:
                self._transient, self._transient_at = event, len(self._history)
            else:
                self._history.append(event)
            if isinstance(event, Progress):
                self.progress = event
            for subscriber in self._subscribers:
                subscriber.put(event)

    def report(self, done: int, total: int, message: str = "") -> None:
        """Progress: `done` of `total` units (steps, images) finished."""
        self.emit(Progress(done, total, message), transient=True)

    def checkpoint(self) -> bool:
        """Call between the steps of long work: queued jobs that outrank this one run now, and a
        paused job waits here. Only outside a diffusers pipeline call: a job run here may change the
        pipeline's scheduler and flags under that call. Returns whether another job ran."""
        return self._worker.checkpoint(self)

    # -- control (from anywhere) ----------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the job to stop at its next step; a queued job is taken off the queue and ends now."""
        self.stop.set()
        self.resume()
        self._worker._unqueue(self)

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._worker._wake()

    @property
    def latest_transient(self) -> Any:
        """The latest transient event (a preview) while it is the newest thing the job said; None otherwise."""
        with self._lock:
            return self._transient if self._transient_at == len(self._history) else None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    # -- following ------------------------------------------------------------------------------
    def events(self, *, caught_up: Any = None) -> Iterator:
        """Everything emitted so far (the latest preview only), then live events until the job ends. With
        `caught_up`, that object is yielded once between the two, so that a follower that holds updates back can
        show what it holds once it has read the past."""
        follower: queue.Queue = queue.Queue()
        with self._lock:
            backlog = list(self._history)
            if self._transient is not None and self._transient_at == len(self._history):
                backlog.append(self._transient)
            finished = self._finished.is_set()
            if not finished:
                self._subscribers.append(follower)
        yield from backlog
        if caught_up is not None:
            yield caught_up
        if finished:
            return
        try:
            while (event := follower.get()) is not _END:
                yield event
        finally:
            with self._lock:
                if follower in self._subscribers:
                    self._subscribers.remove(follower)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job and return its result (None once `expired`), or raise its error."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"Job {self.id} ({self.kind}) has not finished after {timeout} s.")
        if self._error is not None:
            raise self._error
        return self._result

    def stream(self) -> Iterator:
        """`events()`, then the result (when not None); raises the job's error after its events."""
        yield from self.events()
        result = self.result()
        if result is not None:
            yield result

    def _finish(self, *, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            self._result, self._error = result, error
            self.state = (JobState.FAILED if error is not None and not isinstance(error, JobCancelled)
                          else JobState.CANCELLED if self.stop.is_set() else JobState.DONE)
            self._work = None                # let go of what the work closed over (requests, images)
        if self.listed:    # before anyone waiting sees the end, so that older jobs are already let go of then
            self._worker._retire(self)
        with self._lock:
            self._finished.set()
            for subscriber in self._subscribers:
                subscriber.put(_END)
            self._subscribers.clear()

    def _expire(self) -> None:
        with self._lock:
            self._history, self._transient, self._result, self.expired = [], None, None, True

    def __repr__(self) -> str:
        return f"Job({self.id}, {self.kind}, owner={self.owner}, {self.state.value})"


class DeviceWorker:
    """Runs jobs on one thread, started with the first job. Create one per app (in launch.py)."""

    def __init__(self, name: str = "device"):
        self.name = name
        self._queue: list[tuple[int, int, Job]] = []
        self._order = itertools.count()
        self._condition = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._finished_jobs: dict[str, Job] = {}   # the listed finished jobs, in the order they finished
        self._running: list[Job] = []      # a stack: jobs run inside another's checkpoint sit on top
        self._thread: threading.Thread | None = None
        self._thread_ident: int | None = None
        self._closed = False

    # -- submitting -----------------------------------------------------------------------------
    def submit(self, work: Callable[[Job], Any], *, kind: str, owner: str | None = None,
               priority: int = Priority.INTERACTIVE, stop: threading.Event | None = None,
               listed: bool = True) -> Job:
        """Queue `work(job)`. Submitted from the worker thread itself (device work starting device
        work), it runs at once: queued, it would wait behind its own caller."""
        if self._closed:
            raise RuntimeError("The device worker has been closed.")
        job = Job(work, kind=kind, owner=owner, priority=priority, worker=self, stop=stop, listed=listed)
        with self._condition:
            if listed:
                self._remember(job)
            if not self.on_worker_thread():
                heapq.heappush(self._queue, (job.priority, next(self._order), job))
                self._start()
                self._condition.notify_all()
                return job
        self._run(job)
        return job

    def call(self, function: Callable[..., Any], *args, **kwargs) -> Any:
        """Run `function(*args, **kwargs)` on the worker thread and return its result (or raise its
        error). From the worker thread itself it is a plain call."""
        if self.on_worker_thread():
            return function(*args, **kwargs)
        name = getattr(function, "__name__", "call")
        return self.submit(lambda job: function(*args, **kwargs), kind=name, listed=False).result()

    def on_worker_thread(self) -> bool:
        return threading.get_ident() == self._thread_ident

    # -- finding --------------------------------------------------------------------------------
    def find(self, job_id: str) -> Job | None:
        with self._condition:
            return self._jobs.get(job_id)

    def jobs(self, *, owner: str | None = None, active: bool = True) -> list[Job]:
        """Listed jobs, oldest first: of one owner (None: everyone's), unfinished only when `active`."""
        with self._condition:
            jobs = list(self._jobs.values())
        return [job for job in jobs if (owner is None or job.owner == owner) and not (active and job.finished)]

    @property
    def current(self) -> Job | None:
        """The job whose step is running now (the innermost, when one runs at another's checkpoint). Read from
        any thread while the device thread pushes and pops: one read of the stack, since a job may end between
        two (`/progress` polls this)."""
        top = self._running[-1:]
        return top[0] if top else None

    def cancel(self, *, owner: str) -> list[Job]:
        """Cancel every unfinished job of `owner` (a browser session's Stop); returns them."""
        jobs = self.jobs(owner=owner)
        for job in jobs:
            job.cancel()
        return jobs

    # -- running --------------------------------------------------------------------------------
    def checkpoint(self, job: Job) -> bool:
        if not self.on_worker_thread():
            raise RuntimeError("checkpoint() is called by a running job, on the worker thread.")
        ran = False
        while True:
            with self._condition:
                waiting = self._queue[0][2] if self._queue else None
                if waiting is not None and (waiting.priority < job.priority or job.paused):
                    heapq.heappop(self._queue)
                elif job.paused and not job.stop.is_set():
                    self._condition.wait()
                    continue
                else:
                    return ran
            self._run(waiting)
            ran = True

    def close(self, *, wait: bool = False) -> None:
        """Let the thread end once the queue is empty; with `wait`, until it has. (A process that exits while
        its torch thread is still alive can abort at exit, "terminate called without an active exception".)"""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if wait and self._thread is not None:
            self._thread.join()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _wake(self) -> None:
        with self._condition:
            self._condition.notify_all()

    def _unqueue(self, job: Job) -> None:
        with self._condition:
            entries = [entry for entry in self._queue if entry[2] is job]
            for entry in entries:
                self._queue.remove(entry)
            heapq.heapify(self._queue)
            self._condition.notify_all()
        if entries:
            job._finish(error=JobCancelled(f"Job {job.id} ({job.kind}) was cancelled before it started."))

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job

    def _retire(self, job: Job) -> None:
        """`job` has finished: it is the newest finished job of its class (interactive or background). The
        older ones of that class past KEEP_FINISHED_RESULTS let go of their results, past KEEP_FINISHED_JOBS
        are forgotten."""
        background = job.priority >= Priority.BACKGROUND
        with self._condition:
            self._finished_jobs[job.id] = job
            same_class = [known for known in self._finished_jobs.values()
                          if (known.priority >= Priority.BACKGROUND) == background]   # oldest finished first
            for old in same_class[:max(0, len(same_class) - KEEP_FINISHED_RESULTS)]:
                old._expire()
            for old in same_class[:max(0, len(same_class) - KEEP_FINISHED_JOBS)]:
                del self._finished_jobs[old.id]
                self._jobs.pop(old.id, None)

    def _loop(self) -> None:
        self._thread_ident = threading.get_ident()
        torch.set_num_threads(torch.get_num_threads())  # the process-wide count, for this thread's team
        while True:
            with self._condition:
                while not self._queue and not self._closed:
                    self._condition.wait()
                if not self._queue:
                    return
                _, _, job = heapq.heappop(self._queue)
            self._run(job)

    def _run(self, job: Job) -> None:
        if job.stop.is_set():
            job._finish(error=JobCancelled(f"Job {job.id} ({job.kind}) was cancelled before it started."))
            return
        job.state = JobState.RUNNING
        self._running.append(job)
        try:
            result = job._work(job)
        except BaseException as error:  # handed to whoever waits on the job; the worker keeps serving
            job._finish(error=error)
        else:
            job._finish(result=result)
        finally:
            self._running.pop()
