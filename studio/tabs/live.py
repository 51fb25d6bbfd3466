"""Fast and Live: the few-step model as a switch, and generation that follows every change.

**Fast (4 steps)** is the request's `fast` field (pipelines/core/fast.py: the model's LCM-LoRA, the LCM
sampler, CFG 1). Ticking it shows those settings on the page (4 steps; unticking restores the defaults),
so what runs is what the page says.

**Live** regenerates on every change of the tab's settings: a key typed in the prompt, the seed, a slider,
a mask stroke, a control drawing. It is the page's alone (no API: a script sends each request itself). Each
change is a request of its own, handled at once (`trigger_mode="multiple"`):

- it supersedes the one before: that one's job is cancelled (between two steps, or before it starts), and
  what it would show is dropped, so the queue holds at most one live job per user and the page never goes
  back to an older image;
- it waits `DEBOUNCE_S` first, and a change inside that time supersedes it before it costs anything, so a
  burst of keys is one generation;
- it runs with previews off and saves nothing (a draft: Generate keeps the image as always), and turns Fast
  on at `LIVE_STEPS` when Live is switched on (Fast can be unticked, the steps changed).

Other users' jobs keep their share: a user's live changes replace their own queued job instead of adding one.
With Live off a change starts nothing (the page's own script checks the switch first; only a page's first change
reaches the handler, which answers it with nothing to do): nothing changes for anyone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import gradio as gr

from pipelines.core.fast import FAST_GUIDANCE, FAST_SAMPLER, FAST_STEPS, is_distilled
from pipelines.core.results import GenerationDone
from pipelines.jobs.worker import Job, JobCancelled
from studio.context import StudioContext, session_of

LIVE_TASKS = ("txt2img", "inpaint", "controlnet")
DEBOUNCE_S = 0.06       # a change this soon after another replaces it before it runs
# Live turns Fast on at 2 steps: as good as 4 on the held-out evaluation (top-5 70.0% both, assets/fast-eval.json)
# and 60-80 ms quicker to follow typing here (bench.live: medians 248-296 ms at 2 steps, 322-341 ms at 4)
LIVE_STEPS = 2
LIVE_QUEUE = {"concurrency_id": "live", "concurrency_limit": 16, "show_progress": "hidden"}
# on the page, at every change: with Live on, the hidden tick becomes the change's time (its change event then runs
# the live handler); with Live off it stays as it is (only its first setting, from empty, reaches the handler)
TICK = "(on, tick) => on ? performance.timeOrigin + performance.now() : tick"


class LiveRuns:
    """Per user: the newest live change and the job it started; older changes are superseded. A change is known by
    the page's clock when it was made (its `stamp`): requests may reach the handlers out of order, changes may not."""

    def __init__(self):
        self._lock = threading.Lock()
        self._newest: dict[str | None, float] = {}
        self._jobs: dict[str | None, Job] = {}

    def begin(self, owner: str | None, number: float) -> bool:
        """Change `number` (its stamp) by `owner`: if it is their newest, it supersedes their last one, whose job is
        cancelled; False for a change older than one already begun (it arrived late: it is dropped)."""
        with self._lock:
            if number <= self._newest.get(owner, float("-inf")):
                return False
            self._newest[owner] = number
            job = self._jobs.pop(owner, None)
        if job is not None:
            job.cancel()
        return True

    def finish(self, owner: str | None, job: Job) -> None:
        """Forget `job` once it has finished (a newer change has nothing left to cancel)."""
        with self._lock:
            if self._jobs.get(owner) is job:
                del self._jobs[owner]

    def newest(self, owner: str | None, number: float) -> bool:
        with self._lock:
            return self._newest.get(owner) == number

    def attach(self, owner: str | None, number: float, job: Job) -> bool:
        """Record `job` as change `number`'s; False (and the job cancelled) if a newer change came meanwhile."""
        with self._lock:
            if self._newest.get(owner) == number:
                self._jobs[owner] = job
                return True
        job.cancel()
        return False


def speed_controls(controls: dict, defaults: dict) -> gr.Checkbox:
    """The Fast switch (a request field, in `controls`) and the Live switch (returned), under Generate."""
    controls["fast"] = gr.Checkbox(False, label="Fast (4 steps)", elem_classes=["studio-fast"],
                                   info="the model's LCM version: LCM sampler, CFG 1")
    return gr.Checkbox(False, label="Live", elem_classes=["studio-live"], info="regenerate on every change")


def wire_speed(context: StudioContext, tab, live: gr.Checkbox, page: dict, to_fields, defaults: dict) -> None:
    """Fast's page settings, and Live's handler on every change of `page` (the components Generate reads)."""
    controls = tab.controls
    sampling = [controls["sampler"], controls["steps"], controls["guidance_scale"]]

    def fast_settings(fast: bool):
        if fast:   # an LCM UNet reads CFG as its embedded w: left as it is (pipelines/core/fast.py)
            model = context.models.current
            distilled = model is not None and is_distilled(model.pipeline)
            return FAST_SAMPLER, FAST_STEPS, gr.skip() if distilled else FAST_GUIDANCE
        return defaults.get("sampler", controls["sampler"].value), defaults.get("steps", 25), \
            defaults.get("guidance_scale", 7.5)

    runs = LiveRuns()
    names = list(page)
    tick = gr.Number(visible=False)      # the newest change's time, on the page's clock (set by TICK)
    bump = dict(fn=None, inputs=[live, tick], outputs=tick, js=TICK, api_visibility="private", queue=False)

    def run(number: float, live_on: bool, *values, request: gr.Request = None) -> Iterator[dict]:
        # a handler that ends without a word would blank every output: it says "nothing" (gr.skip(); an empty dict
        # is refused by Gradio as too few values: a traceback in the server's terminal at each superseded change,
        # and at a page's first change with Live off)
        owner = session_of(request)
        page_of = f"{owner}|{getattr(request, 'session_hash', None)}"   # one page: a user's two pages are apart
        if live_on and runs.begin(page_of, float(number or 0)):
            time.sleep(DEBOUNCE_S)   # the debounce: a newer change in this time supersedes this one before it runs
            if runs.newest(page_of, number):
                yield from _live_generation(context, tab, runs, (owner, page_of), number, dict(zip(names, values)),
                                            to_fields)
                return
        yield gr.skip()

    # the two switches set the page first, and Live then reads it (the settings Fast shows are the ones it runs)
    controls["fast"].input(fast_settings, controls["fast"], sampling, api_visibility="private",
                           queue=False).then(**bump)
    def live_switched(on: bool, fast: bool, steps: int):
        if not on:     # Live off: Fast's own 4 steps again, if Live's 2 are still set
            return gr.skip(), gr.skip(), FAST_STEPS if fast and steps == LIVE_STEPS else gr.skip(), gr.skip()
        if fast:       # Fast already on: its settings stay as the user set them
            return (gr.skip(),) * 4
        sampler, _, guidance = fast_settings(True)
        return True, sampler, LIVE_STEPS, guidance
    live.input(live_switched, [live, controls["fast"], controls["steps"]], [controls["fast"], *sampling],
               api_visibility="private", queue=False).then(**bump)
    gr.on([_change_event(component) for component in page.values() if component is not controls["fast"]],
          **bump)     # one listener for every change (one per component made every page of the app heavier)
    tick.change(run, inputs=[tick, live, *page.values()], outputs=_outputs(tab), api_visibility="private",
                trigger_mode="multiple", **LIVE_QUEUE)


def _change_event(component):
    """The event a person's change of `component` fires: a text's `change` (its `input` misses deletions), else
    `input` (not fired by the page's own updates, such as Fast's settings), else `change`."""
    if isinstance(component, gr.Textbox):
        return component.change
    return getattr(component, "input", None) or component.change


def _outputs(tab) -> list:
    """What a live image updates: the gallery, infotext and status, and the gallery's state (so Reuse seed and Send
    to read the live image); not the job id, which Stop reads for the tab's Generate."""
    return [tab.gallery, tab.infotext, tab.status, tab.infotexts, tab.selected]


def _live_generation(context: StudioContext, tab, runs: LiveRuns, owners: tuple, number: float, values: dict,
                     to_fields) -> Iterator[dict]:
    """Change `number`'s generation: its image and status, unless a newer change superseded it (gr.skip()
    then: nothing changes on the page). `owners`: the job's owner, and the page's key in `runs`."""
    from studio.tabs.generate import done_results, request_from_controls
    owner, page_of = owners
    try:
        fields = to_fields(values) if to_fields else values
        generation = request_from_controls(tab.task, fields | {"preview_every": 0, "batch_count": 1})
    except Exception as error:    # half-typed input: said in the status line, not as a pop-up per key
        yield {tab.status: f"Live: {error}"}
        return
    job = context.generator.submit(generation, owner=owner, save=False)
    if not runs.attach(page_of, number, job):
        yield gr.skip()
        return
    try:
        done: GenerationDone | None = job.result()
    except JobCancelled:
        done = None
    except Exception as error:
        done = None
        if runs.newest(page_of, number):
            yield {tab.status: f"Live: {error}"}
            return
    finally:
        runs.finish(page_of, job)
    if done is None or done.stopped or not runs.newest(page_of, number):
        yield gr.skip()
        return
    results = done_results(tab, done)
    results[tab.status] = f"Live · {results[tab.status]} · not saved: Generate keeps an image"
    yield {component: value for component, value in results.items() if component in _outputs(tab)}
