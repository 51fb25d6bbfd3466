"""What every generation tab shares: the sampling controls, the results, and their wiring.

A tab is a dict of controls keyed by its request's field names (`prompt`, `steps`, `init_image`…).
`request_from_controls` turns their values into the task's request (pipelines/tasks/); the
public API takes them under the same names; restored settings (PNG Info, send-to) are written back
by name. A tab file (txt2img.py, img2img.py) adds its task's own controls and calls
`build_generation_tab`.

Generating is a job on the device worker (pipelines/jobs/worker.py). The handler follows the job's
events; the job's id goes to the page (and the browser's storage), so Stop cancels that job alone,
and a reloaded page picks the running job up again. Only the job's owner (studio/context.py) does
either.
"""

from __future__ import annotations

import inspect
import itertools
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields

import gradio as gr

from pipelines.core.checks import MAX_BATCH, MAX_SIDE, MAX_STEPS
from pipelines.core.fast import FAST_STEPS
from pipelines.core.guidance import GUIDANCE_FIELDS
from pipelines.core.requests import SamplingSettings, draw_seed
from pipelines.core.results import GeneratedImage, GenerationDone, Preview
from pipelines.core.schedules import SCHEDULES
from pipelines.core.samplers import (DEFAULT_DRAFT_LENGTH, DEFAULT_SAMPLER, DRAFTS, FROZEN_X0_DRAFT, MAX_DRAFT_LENGTH,
                                     SPECULATIVE_SAMPLER)
from pipelines.io.metadata import (clamp_to_request_limits, infotext_key, infotext_to_settings_and_dropped,
                                   parse_infotext)
from pipelines.jobs.worker import Job, JobCancelled, JobState
from pipelines.tasks import TASKS
from studio.context import StudioContext, owns, session_of
from studio.errors import name_input_errors, user_errors
from studio.tabs.guidance import guidance_controls
from studio.tabs.live import LIVE_TASKS, speed_controls, wire_speed
from studio.tabs.networks import network_pickers

# Generations are hardly held in Gradio's queue: each becomes a job at once, and the device worker runs
# jobs one at a time (pipelines/jobs/worker.py), so a waiting generation already has a job id to stop it by.
# The limit only keeps handlers that follow their jobs from taking every one of Gradio's threads.
# Progress shows in the status line and the previews; Gradio's own overlay is off because it replaces
# the shown images with "Error" badges when a generation fails, and the last images should stay.
JOB_QUEUE = {"concurrency_id": "jobs", "concurrency_limit": 16, "show_progress": "hidden"}
# An infotext leaves out what was off (A1111 writes what was in use): restored as off, not kept as set
OFF_WHEN_ABSENT = {item.name: item.default for item in fields(SamplingSettings)
                   if item.name in ("guidance_rescale", *GUIDANCE_FIELDS, "fast", "distilled_guidance")}
# how a status line starts that tells a failure (app.py clears it once a model is loaded again)
FAILED = "**Failed:**"


@dataclass
class TaskControls:
    """A tab's own controls. `fields` are keyed by request field and are the API's parameters too. A tab
    whose page builds a field from something else (inpainting's image editor holds the image and the
    painted mask) lists those components in `page`, with `to_fields` turning their values into fields;
    the page's Generate then goes through `to_fields`, and the API takes the fields themselves."""
    fields: dict[str, gr.components.Component]
    page: dict[str, gr.components.Component] = field(default_factory=dict)
    to_fields: Callable[[dict], dict] | None = None
    image_input: gr.components.Component | None = None    # where "send to" puts an image
    # restored settings (PNG Info) that are not fields -> {page component: value} (ControlNet's units)
    restore: Callable[[dict], dict] | None = None


@dataclass
class GenerationTab:
    task: str
    controls: dict[str, gr.components.Component]   # request field -> the component holding its value
    generate: gr.Button
    stop: gr.Button
    gallery: gr.Gallery
    infotext: gr.Textbox
    status: gr.Markdown
    job_id: gr.Textbox            # the running (or last) job, for the API and for Stop
    saved_job: gr.BrowserState    # the same id in the browser's storage, to find the job after a reload
    infotexts: gr.State
    selected: gr.State
    own: TaskControls = field(default_factory=lambda: TaskControls({}))

    @property
    def api_results(self) -> list:
        """What the API returns, in order: images, infotext, status, job id."""
        return [self.gallery, self.infotext, self.status, self.job_id]

    @property
    def results(self) -> list:
        """What a generation updates on the page: the API's results, then the page's state."""
        return [*self.api_results, self.infotexts, self.selected, self.saved_job]


def request_from_controls(task: str, values: dict) -> SamplingSettings:
    """The task's request from control values keyed by field name (None: the field's default, but Fast's 4 steps
    with `fast`; a required field left empty is passed on as None, for the request to say what it needs)."""
    request_class = TASKS[task].request_class
    kinds = typing.get_type_hints(request_class)
    required = {item.name for item in fields(request_class)
                if item.default is MISSING and item.default_factory is MISSING}
    arguments = {"steps": FAST_STEPS} if values.get("fast") and values.get("steps") is None else {}   # Fast's own
    for name, value in values.items():
        if name not in kinds:
            raise ValueError(f"{TASKS[task].label} has no setting `{name}`; its settings are "
                             f"{', '.join(k for k in kinds if k != 'task')}.")
        if value is None:
            if name in required:
                arguments[name] = None
            continue
        kind = kinds[name]
        try:
            if kind is int:
                value = _whole_number(value)
            elif kind is float:
                value = float(value)
        except (TypeError, ValueError):
            wanted = "a whole number" if kind is int else "a number"
            raise ValueError(f"`{name}` must be {wanted} but is {value!r}.") from None
        arguments[name] = value
    return request_class(**arguments)


def _whole_number(value) -> int:
    """An int from a control's value: ints as they are (a seed may be 2**63-1, past a float's 2**53), whole
    floats and text ("12", "12.0") as their int; anything else is a ValueError."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    if float(value) != int(float(value)):
        raise ValueError
    return int(float(value))


def _sampling_controls(task: str, defaults: dict) -> dict:
    """The SamplingSettings fields' components, laid out in rows (inside the caller's column)."""
    controls = {}
    entry = TASKS[task]       # what the task runs: its samplers, and whether speculative sampling is one
    with gr.Row():
        choices = list((defaults.get("samplers") or {}).get(task) or entry.samplers)
        sampler = defaults.get("sampler", DEFAULT_SAMPLER)
        controls["sampler"] = gr.Dropdown(choices, value=sampler if sampler in choices else choices[0],
                                          label="Sampler")
        controls["steps"] = gr.Slider(1, MAX_STEPS, value=defaults.get("steps", 25), step=1, precision=0,
                                      label="Steps", elem_id=f"{task}-steps")
        controls["schedule"] = gr.Dropdown(list(SCHEDULES), value="Default", label="Schedule type",
                                           info="the sampler's timesteps; Align Your Steps is tuned for few steps")
    if entry.supports(SPECULATIVE_SAMPLER):   # DDPM speculative's settings, shown when it is picked
        with gr.Row(visible=defaults.get("sampler") == SPECULATIVE_SAMPLER) as speculative_row:
            controls["draft"] = gr.Dropdown(list(DRAFTS), value=FROZEN_X0_DRAFT, label="Draft",
                                            info="what proposes the steps the model verifies; the image's law is "
                                                 "DDPM's whichever you pick")
            controls["draft_length"] = gr.Slider(1, MAX_DRAFT_LENGTH, value=DEFAULT_DRAFT_LENGTH, step=1, precision=0,
                                                 label="Draft length L", info="steps proposed per model call")
        controls["sampler"].change(lambda sampler: gr.Row(visible=sampler == SPECULATIVE_SAMPLER),
                                   controls["sampler"], speculative_row, api_visibility="private", queue=False)
    with gr.Row():
        controls["guidance_scale"] = gr.Slider(1.0, 20.0, value=defaults.get("guidance_scale", 7.5), step=0.5,
                                               label="CFG scale", info="1 turns guidance (and its extra pass) off")
        controls["guidance_rescale"] = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Guidance rescale")
        controls["distilled_guidance"] = gr.Slider(
            0.0, 20.0, value=3.5, step=0.5, label="Distilled CFG scale",
            visible=defaults.get("distilled_guidance_shown", False),
            info="Flux.1 dev's guidance, distilled into the model: one pass per step (CFG above 1 adds a second)")
    controls.update(guidance_controls(task))
    with gr.Row():
        native = size_hint(defaults.get("native_side"))
        controls["width"] = gr.Slider(64, MAX_SIDE, value=defaults.get("width", 512), step=8, precision=0,
                                      label="Width", info=native)
        controls["height"] = gr.Slider(64, MAX_SIDE, value=defaults.get("height", 512), step=8, precision=0,
                                       label="Height", info=native)
    return controls


def size_hint(native_side: int | None) -> str | None:
    return None if native_side is None else f"the model's native size is {native_side} px; past twice it, it repeats"


def build_generation_tab(context: StudioContext, task: str, defaults: dict,
                         task_controls: Callable[[], TaskControls] | None = None) -> GenerationTab:
    """Lay out one generation tab and wire its events. `task_controls()` builds the task's own controls
    at the top of the settings column."""
    # 1. Layout
    controls: dict[str, gr.components.Component] = {}
    with gr.Row():
        with gr.Column(scale=3):
            controls["prompt"] = gr.Textbox(label="Prompt", lines=2, max_lines=6, placeholder="e.g. red apple",
                                            elem_id=f"{task}-prompt")
            controls["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=1, max_lines=4,
                                                     elem_id=f"{task}-negative")
            network_pickers(context, task, controls["prompt"], controls["negative_prompt"])
        with gr.Column(scale=1, min_width=160):
            generate = gr.Button("Generate", variant="primary", elem_id=f"{task}-generate")
            stop = gr.Button("Stop", variant="stop", elem_id=f"{task}-stop")
            live = speed_controls(controls, defaults) if task in LIVE_TASKS else None
    with gr.Row():
        with gr.Column(scale=2):
            own = task_controls() if task_controls is not None else TaskControls({})
            controls.update(own.fields)
            controls.update(_sampling_controls(task, defaults))
            with gr.Row():
                # no minimum/maximum here: the request's check names the field, the value and the range (0 to
                # 2**63-1); an int from the API arrives exact, the browser's own input holds 2**53 exactly
                controls["seed"] = gr.Number(value=-1, precision=0, label="Seed",
                                             info="-1 draws one; image i of a batch uses seed + i",
                                             elem_id=f"{task}-seed")
                # icons drawn by the page's CSS (app.py), not emoji: those need an emoji font
                dice = gr.Button("", scale=0, min_width=48, elem_id=f"{task}-random-seed",
                                 elem_classes=["studio-icon-dice"])
                reuse = gr.Button("", scale=0, min_width=48, elem_id=f"{task}-reuse-seed",
                                  elem_classes=["studio-icon-reuse"])
            with gr.Row():
                controls["batch_size"] = gr.Slider(1, MAX_BATCH, value=1, step=1, precision=0, label="Batch size")
                controls["batch_count"] = gr.Slider(1, 16, value=1, step=1, precision=0, label="Batch count",
                                                    elem_id=f"{task}-batch-count")
                controls["preview_every"] = gr.Slider(0, 50, value=defaults.get("preview_every", 1), step=1,
                                                      precision=0, label="Preview every N steps", info="0 = off")
            # one sampler's settings come last in the API's parameter order, after what every sampler takes, and
            # then what came later (guidance, schedule), so that positional API callers keep their order
            for name in ("draft", "draft_length", *GUIDANCE_FIELDS, "fast", "distilled_guidance"):
                if name in controls:
                    controls[name] = controls.pop(name)
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", columns=3, height=460, object_fit="contain", allow_preview=False,
                                 elem_id=f"{task}-gallery", elem_classes=["studio-pixels"], format="png",
                                 interactive=False)
            status = gr.Markdown(label="Status", elem_id=f"{task}-status")
            infotext = gr.Textbox(label="Generation parameters", lines=4, elem_id=f"{task}-infotext",
                                  buttons=["copy"])
            job_id = gr.Textbox(label="Job id", visible=False, elem_id=f"{task}-job")
    tab = GenerationTab(task=task, controls=controls, generate=generate, stop=stop, gallery=gallery,
                        infotext=infotext, status=status, job_id=job_id,
                        saved_job=gr.BrowserState(None, storage_key=f"diffusion-studio-{task}-job"),
                        infotexts=gr.State([]), selected=gr.State(None), own=own)
    # 2. Wiring
    wire_generation(context, tab, task=task, button=generate, controls=controls, own=own)
    _wire_stop(context, tab)
    _wire_seed_buttons(tab, dice, reuse)
    if live is not None:
        wire_speed(context, tab, live, page_inputs(controls, own), own.to_fields, defaults)
    return tab


def page_inputs(controls: dict, own: TaskControls) -> dict:
    """What the page's Generate reads, by name: the tab's controls, or, where the page builds fields from other
    components (inpainting's editor), those components in their place."""
    if not own.page:
        return controls
    return {name: c for name, c in controls.items() if name not in own.fields or c.visible} | own.page


def wire_generation(context: StudioContext, tab: GenerationTab, *, task: str, button: gr.Button,
                    controls: dict, own: TaskControls) -> None:
    """`button` generates `task` from `controls` (request field -> component) into `tab`'s results, as a job;
    the API endpoint named after the task takes the same fields and returns `tab.api_results`."""
    def handler(to_fields, outputs: list):
        @user_errors
        def run(request: gr.Request = None, **values) -> Iterator[dict]:
            generation = request_from_controls(task, to_fields(values) if to_fields else values)
            job = context.generator.submit(generation, owner=session_of(request))
            waiting = len([other for other in context.worker.jobs() if other.state is JobState.QUEUED
                           and other is not job])
            # the job id goes out at once, so that Stop (and an API client) can name the job while it waits
            started = {tab.job_id: job.id, tab.saved_job: job.id,
                       tab.status: f"Queued behind {waiting} job(s)…" if waiting > 0 else "Starting…"}
            for update in itertools.chain([started], follow_job(tab, job)):
                yield {component: value for component, value in update.items() if component in outputs}
        return run

    button.click(handler(own.to_fields, tab.results), inputs_kwargs=page_inputs(controls, own),
                 outputs=tab.results, api_visibility="private", **JOB_QUEUE)
    # the API's own trigger: a button no one sees, on the request's fields; the page's state (the job id in
    # the browser's storage) is no business of a script
    name_input_errors(controls)
    api = handler(None, tab.api_results)
    api.__signature__ = _api_signature(TASKS[task].request_class, controls)
    gr.Button(visible=False, render=True).click(api, inputs_kwargs=controls, outputs=tab.api_results, api_name=task,
                                                **JOB_QUEUE)


def _wire_stop(context: StudioContext, tab: GenerationTab) -> None:
    @user_errors
    def stop_job(job_id: str | None, request: gr.Request = None) -> None:
        job = context.owned_job(job_id, request)
        if job is not None:
            job.cancel()

    # Stop is not queued behind the generation it stops
    tab.stop.click(stop_job, inputs=tab.job_id, outputs=None, queue=False, api_visibility="private")


def _api_signature(request_class: type[SamplingSettings], controls: dict) -> inspect.Signature:
    """The handler's signature as the API shows it: one keyword per control, named as the request's field.
    Fields with a default default to None here (Gradio's mark of an optional API parameter), which
    `request_from_controls` turns into the request's default; so only what the task cannot do without
    (the prompt, an image) is required."""
    required = {item.name for item in fields(request_class)
                if item.default is MISSING and item.default_factory is MISSING}
    parameters = [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                    annotation=gr.Request)]
    parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                     default=inspect.Parameter.empty if name in required else None)
                   for name in controls]
    return inspect.Signature(parameters)


def wire_resume(app: gr.Blocks, context: StudioContext, tab: GenerationTab) -> None:
    """When the page loads, show the job this browser started last: followed live while it runs, its
    results once it has finished (while the studio still remembers it)."""
    @user_errors
    def resume(job_id: str | None, request: gr.Request = None) -> Iterator[dict]:
        job = context.find_job(job_id)
        if job is None:
            return
        if not owns(request, job):     # the browser's owner cookie was cleared, or another user logged in
            yield {tab.status: "The job this page started last belongs to another session; it is not shown."}
            return
        if job.state is JobState.FAILED:   # its error was shown when it happened
            yield {tab.job_id: job.id, tab.status: f"{FAILED} the last generation of this page did not finish."}
            return
        yield from follow_job(tab, job)

    app.load(resume, inputs=tab.saved_job, outputs=tab.results, api_visibility="private", **JOB_QUEUE)


def follow_job(tab: GenerationTab, job: Job) -> Iterator[dict]:
    """Render a generation job's events into the tab's results, as they come (each update names the job)."""
    for results in _job_results(tab, job):
        yield {tab.job_id: job.id, tab.saved_job: job.id, **results}


def _job_results(tab: GenerationTab, job: Job) -> Iterator[dict]:
    finished: list[GeneratedImage] = []
    for event in job.events():
        if isinstance(event, Preview):
            frames = [(item.path or item.image, _caption(item)) for item in finished]
            frames += [(image, f"step {event.step}/{event.total_steps}") for image in event.images]
            yield {tab.gallery: frames, tab.status: f"Step {event.step} of {event.total_steps}…"}
        elif isinstance(event, GeneratedImage):
            finished.append(event)
            yield {tab.gallery: [(i.path or i.image, _caption(i)) for i in finished],
                   tab.status: f"{len(finished)} image(s) done…"}
    try:
        done: GenerationDone | None = job.result()
    except JobCancelled:
        yield {tab.status: "Stopped before it started."}
        return
    except Exception as error:      # said in the status line too, then raised for the error boundary
        yield {tab.status: f"{FAILED} {error}"}
        raise
    if done is None:
        yield {tab.status: "That generation finished a while ago; its images are in the outputs folder."}
        return
    yield done_results(tab, done)


def done_results(tab: GenerationTab, done: GenerationDone) -> dict:
    saved = [item.path for item in done.images if item.path]
    summary = f"Seed {done.seed} · {sum(item.finished for item in done.images)} image(s)"
    if saved:
        summary += f" · saved as `{saved[0]}`" + (" …" if len(saved) > 1 else "")
    texts = [item.infotext for item in done.images]
    return {tab.gallery: [(item.path or item.image, _caption(item)) for item in done.images],
            tab.infotext: texts[0] if texts else "", tab.status: "  \n".join([summary, *done.messages]),
            tab.infotexts: texts, tab.selected: 0 if texts else None}


def _wire_seed_buttons(tab: GenerationTab, dice: gr.Button, reuse: gr.Button) -> None:
    seed = tab.controls["seed"]
    dice.click(lambda: draw_seed(), outputs=seed, api_visibility="private")
    reuse.click(lambda texts, index: _seed_of(texts, index), inputs=[tab.infotexts, tab.selected], outputs=seed,
                api_visibility="private")

    def on_select(texts, event: gr.SelectData):
        return (texts[event.index] if texts and event.index < len(texts) else ""), event.index
    tab.gallery.select(on_select, inputs=tab.infotexts, outputs=[tab.infotext, tab.selected],
                       api_visibility="private")


def _caption(item: GeneratedImage) -> str:
    return f"seed {item.seed}" if item.finished else f"stopped at step {item.steps_done}"


def _seed_of(texts: list[str], index: int | None) -> int:
    if not texts:
        return -1
    _, _, parameters = parse_infotext(texts[index or 0])
    return int(parameters.get("Seed", -1))


def _fit_to_sliders(settings: dict, controls: dict) -> list[str]:
    """Move restored numbers onto their sliders (a narrower range than a request's, and a step: sizes in 8s), so
    that the next Generate takes them; a note for each one moved."""
    notes = []
    for name, value in settings.items():
        slider = controls.get(name)
        if not isinstance(slider, gr.Slider) or not isinstance(value, (int, float)):
            continue
        fitted = min(max(value, slider.minimum), slider.maximum)
        if slider.step and slider.step >= 1:
            fitted = slider.minimum + round((fitted - slider.minimum) / slider.step) * slider.step
            fitted = int(min(fitted, slider.maximum))
        if fitted != value:
            settings[name] = fitted
            notes.append(f"{infotext_key(name)}: {value:g} is not on this tab's slider "
                         f"({slider.minimum:g} to {slider.maximum:g}); restored as {fitted:g}.")
    return notes


def settings_from_infotext(text: str, tab: GenerationTab) -> dict:
    """{component: value} for the settings an infotext (ours or A1111's) restores into `tab`'s controls. What it
    cannot restore is named to the user: keys this studio has no setting for, and settings this tab lacks."""
    prompt, negative, parameters = parse_infotext(text or "")
    if not parameters:
        raise gr.Error("These are not generation parameters: no `Steps: …, Sampler: …` line was found.")
    restored_settings, dropped = infotext_to_settings_and_dropped(parameters)
    restored_settings, clamped = clamp_to_request_limits(restored_settings)   # an infotext is anyone's text
    clamped += _fit_to_sliders(restored_settings, tab.controls)
    if clamped:
        gr.Warning("Out of range, so changed: " + " ".join(clamped))
    settings = {"prompt": prompt, "negative_prompt": negative, **OFF_WHEN_ABSENT, **restored_settings}
    sampler = settings.get("sampler")
    if sampler is not None and sampler not in [value for _, value in tab.controls["sampler"].choices]:
        gr.Warning(f"Sampler {sampler!r} is not available here; keeping the current one.")
        del settings["sampler"]
    if dropped:
        gr.Warning("Not restored, this studio has no such setting or value: "
                   + ", ".join(f"{key}: {value}" for key, value in dropped.items()) + ".")
    restored = {tab.controls[name]: value for name, value in settings.items() if name in tab.controls}
    restored |= tab.own.restore(settings) if tab.own.restore is not None else {}
    # the model is picked in Models & memory; ControlNet units go to a tab that restores them
    elsewhere = {"model", "model_hash"} | ({"controlnet_units"} if tab.own.restore is not None else set())
    missing = dict.fromkeys(infotext_key(name) for name in settings
                            if name not in tab.controls and name not in elsewhere)
    if missing:
        label = TASKS[tab.task].label
        gr.Info(f"Not restored, {label} has no such setting: "
                + ", ".join(f"{key}: {parameters[key]}" if key in parameters else key for key in missing) + ".")
    return restored
