"""The Diffusion Explorer's reverse panel: a real text-to-image run of the loaded model, recorded step by step
(x_t, x̂_0 and the noise predictions), scrubbed or played; branched at any step with other settings; its
frames exported. The comparison and speculative panels (explorer_compare.py, explorer_speculative.py) sit
inside it and run its settings; `/explorer_record` records for API clients.

A recorded trace lives in this browser session's gr.State, and so does the id of the job the session started
last, which Stop cancels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gradio as gr

from pipelines.core.checks import MAX_STEPS
from pipelines.core.samplers import DEFAULT_SAMPLER, STEPWISE_SAMPLER_NAMES
from pipelines.explorer.comparison import difference_map, rms_distance
from pipelines.explorer.formulas import FORMULAS_REVERSE
from pipelines.explorer.service import Explorer, StepViews
from pipelines.explorer.trace import Trace
from studio.context import StudioContext, session_of
from studio.errors import user_errors
from studio.tabs.explorer_compare import ComparePanel, layout_compare, wire_compare
from studio.tabs.explorer_shared import DEVICE_QUEUE, PIXELS, PRIVATE, follow, formulas_markdown, reverse_request
from studio.tabs.explorer_speculative import SpeculativePanel, layout_speculative, wire_speculative

# 8 frames/s, the export's default. Each tick is one event that brings its step's views (a tick is dropped while
# the last one is pending, so a slow device plays slower, never queues up ticks)
PLAY_INTERVAL_S = 0.125
NOISE_CHOICES = [("ε_u (negative prompt)", "eps_uncond"), ("ε_c (prompt)", "eps_cond"),
                 ("ε̂ (guided)", "eps_guided")]
EXPORT_CHOICES = [("x_t", "x_t"), ("x̂_0", "x0_pred"), ("ε_u", "eps_uncond"), ("ε_c", "eps_cond"),
                  ("ε̂", "eps_guided")]


@dataclass
class Player:
    """The recorded steps: a slider, play and step buttons, and the views of the step shown."""
    step: gr.Slider
    previous: gr.Button
    play: gr.Button
    pause: gr.Button
    following: gr.Button
    noise_kind: gr.Radio
    info: gr.Markdown
    x_t: gr.Image
    x0_pred: gr.Image
    noise: gr.Image
    final: gr.Image
    timer: gr.Timer
    playing: gr.State

    @property
    def views(self) -> set:
        return {self.x_t, self.x0_pred, self.noise, self.info}


@dataclass
class BranchPanel:
    changes: dict[str, gr.components.Component]  # the branch's settings (BRANCH_FIELDS) -> their controls
    button: gr.Button
    scrub: gr.Button
    original: gr.Image
    result: gr.Image
    difference: gr.Image
    status: gr.Markdown


@dataclass
class TraceExport:
    kind: gr.Radio
    fps: gr.Slider
    gif: gr.Button
    mp4: gr.Button
    file: gr.File
    shown: gr.Image       # the GIF, playing on the page


@dataclass
class ReverseTab:
    settings: dict[str, gr.components.Component]  # the recorded request's settings -> their controls
    record: gr.Button
    stop: gr.Button
    status: gr.Markdown
    player: Player
    branch: BranchPanel
    compare: ComparePanel
    speculative: SpeculativePanel
    export: TraceExport
    trace: gr.State        # the Trace shown
    branched: gr.State     # the latest branch, until it is scrubbed
    job_id: gr.State       # the job this session started last: what Stop cancels


# ----------------------------------------------------------------------------- layout


def layout_reverse(side: int) -> ReverseTab:
    settings: dict[str, gr.components.Component] = {}
    with gr.Row():
        with gr.Column(scale=3):
            settings["prompt"] = gr.Textbox(label="Prompt", lines=2, placeholder="e.g. red apple",
                                            elem_id="explorer-prompt")
            settings["negative_prompt"] = gr.Textbox(label="Negative prompt", elem_id="explorer-negative")
        with gr.Column(scale=1, min_width=160):
            record = gr.Button("Record", variant="primary", elem_id="explorer-record")
            stop = gr.Button("Stop", variant="stop", elem_id="explorer-stop")
    with gr.Row():
        settings["sampler"] = gr.Dropdown(list(STEPWISE_SAMPLER_NAMES), value=DEFAULT_SAMPLER, label="Sampler",
                                          elem_id="explorer-sampler")
        settings["steps"] = gr.Slider(1, MAX_STEPS, value=20, step=1, precision=0, label="Steps",
                                      elem_id="explorer-steps")
        settings["guidance_scale"] = gr.Slider(1.0, 20.0, value=7.5, step=0.5, label="CFG scale",
                                               info="1 turns guidance off", elem_id="explorer-cfg")
        settings["seed"] = gr.Number(value=-1, precision=0, label="Seed", info="-1 draws one", elem_id="explorer-seed")
        settings["size"] = gr.Slider(64, 1024, value=side, step=8, precision=0, label="Size (px)",
                                     elem_id="explorer-size")
    status = gr.Markdown(label="Status", elem_id="explorer-status")
    player = _layout_player()
    with gr.Accordion("Branch: change the settings from this step on", open=False):
        branch = _layout_branch()
    with gr.Accordion("Compare samplers, step counts and CFG scales (same seed)", open=False):
        compare = layout_compare()
    with gr.Accordion("Speculative sampling, round by round (DDPM speculative)", open=False):
        speculative = layout_speculative()
    with gr.Accordion("Export the recorded frames", open=False):
        export = _layout_trace_export()
    with gr.Accordion("The formulas", open=True):
        formulas_markdown(FORMULAS_REVERSE)
    return ReverseTab(settings=settings, record=record, stop=stop, status=status, player=player, branch=branch,
                      compare=compare, speculative=speculative, export=export, trace=gr.State(None),
                      branched=gr.State(None), job_id=gr.State(None))


def _layout_player() -> Player:
    with gr.Row():
        step = gr.Slider(0, 1, value=0, step=1, precision=0, label="Step (0: pure noise)", scale=4,
                         elem_id="explorer-step-slider")
        previous = gr.Button("Step −", scale=0, min_width=80, elem_id="explorer-step-prev")
        play = gr.Button("▶ Play", scale=0, min_width=80, elem_id="explorer-play")
        pause = gr.Button("Pause", scale=0, min_width=80, elem_id="explorer-pause")
        following = gr.Button("Step +", scale=0, min_width=80, elem_id="explorer-step-next")
    with gr.Row():   # right under the slider, so that a recorded run plays above the fold
        x_t = gr.Image(label="x_t (what the UNet sees)", interactive=False, height=256, elem_id="explorer-frame",
                       **PIXELS)
        x0_pred = gr.Image(label="x̂_0 (its guess of the clean image)", interactive=False, height=256, **PIXELS,
                           elem_id="explorer-x0")
        noise = gr.Image(label="Noise prediction, |ε| per pixel", interactive=False, height=256, **PIXELS,
                         elem_id="explorer-noise")
        final = gr.Image(label="Final image", interactive=False, height=256, elem_id="explorer-final", **PIXELS)
    with gr.Row():
        info = gr.Markdown(label="The step shown", elem_id="explorer-step-info")
        noise_kind = gr.Radio(NOISE_CHOICES, value="eps_guided", label="Noise prediction shown",
                              elem_id="explorer-noise-kind")
    return Player(step=step, previous=previous, play=play, pause=pause, following=following, noise_kind=noise_kind,
                  info=info, x_t=x_t, x0_pred=x0_pred, noise=noise, final=final,
                  timer=gr.Timer(PLAY_INTERVAL_S, active=False), playing=gr.State(False))


def _layout_branch() -> BranchPanel:
    changes: dict[str, gr.components.Component] = {}
    with gr.Row():
        changes["prompt"] = gr.Textbox(label="Prompt", elem_id="explorer-branch-prompt")
        changes["negative_prompt"] = gr.Textbox(label="Negative prompt", elem_id="explorer-branch-negative")
        changes["sampler"] = gr.Dropdown(list(STEPWISE_SAMPLER_NAMES), value=DEFAULT_SAMPLER, label="Sampler",
                                         elem_id="explorer-branch-sampler")
        changes["guidance_scale"] = gr.Slider(1.0, 20.0, value=7.5, step=0.5, label="CFG scale",
                                              elem_id="explorer-branch-cfg")
    with gr.Row():
        button = gr.Button("Branch at this step", variant="primary", elem_id="explorer-branch")
        scrub = gr.Button("Scrub the branch", elem_id="explorer-branch-scrub")
    with gr.Row():
        original = gr.Image(label="Original", interactive=False, elem_id="explorer-branch-original", height=256,
                            **PIXELS)
        result = gr.Image(label="Branch", interactive=False, elem_id="explorer-branch-result", height=256, **PIXELS)
        difference = gr.Image(label="Difference (×4)", interactive=False, elem_id="explorer-branch-difference",
                              height=256, **PIXELS)
    status = gr.Markdown(elem_id="explorer-branch-status")
    return BranchPanel(changes=changes, button=button, scrub=scrub, original=original, result=result,
                       difference=difference, status=status)


def _layout_trace_export() -> TraceExport:
    with gr.Row():
        kind = gr.Radio(EXPORT_CHOICES, value="x_t", label="Frames", elem_id="explorer-export-kind")
        fps = gr.Slider(1, 30, value=8, step=1, label="Frames per second")
        gif = gr.Button("Export GIF", elem_id="explorer-export-gif")
        mp4 = gr.Button("Export MP4", elem_id="explorer-export-mp4")
    with gr.Row():
        shown = gr.Image(label="The GIF", interactive=False, height=256, elem_id="explorer-export-preview")
        file = gr.File(label="Animation (download)", elem_id="explorer-export-file")
    return TraceExport(kind=kind, fps=fps, gif=gif, mp4=mp4, file=file, shown=shown)


# ----------------------------------------------------------------------------- wiring


def wire_reverse(context: StudioContext, explorer: Explorer, tab: ReverseTab) -> None:
    """Record, Stop, the player, Branch, Compare, the speculative run and the exports."""
    _wire_record(explorer, tab)
    _wire_stop(context, tab)
    _wire_scrub(explorer, tab)
    _wire_playback(explorer, tab)
    _wire_branch(explorer, tab)
    wire_compare(explorer, tab.compare, reverse_settings=tab.settings, job_id=tab.job_id)
    wire_speculative(explorer, tab.speculative, reverse_settings=tab.settings, job_id=tab.job_id)
    _wire_trace_export(explorer, tab)


def _views(player: Player, views: StepViews) -> dict:
    return {player.x_t: views.x_t, player.x0_pred: views.x0_pred, player.noise: views.noise, player.info: views.info}


def _step_slider(trace: Trace, value: int) -> gr.Slider:
    return gr.Slider(minimum=0, maximum=max(trace.num_steps - 1, 1), value=value, step=1)


def _wire_record(explorer: Explorer, tab: ReverseTab) -> None:
    player, changes = tab.player, tab.branch.changes

    @user_errors
    def record_reverse(prompt: str, negative_prompt: str | None = None, noise_kind: str = "eps_guided",
                       request: gr.Request = None, **settings) -> Iterator[dict]:
        job = explorer.record(reverse_request(prompt=prompt, negative_prompt=negative_prompt, **settings),
                              owner=session_of(request))
        yield {tab.job_id: job.id}
        trace = yield from follow(job, tab.status, "Recording step {done} of {total}…")
        if trace is None:
            return
        recorded = trace.request
        summary = "  \n".join([f"Recorded {trace.num_steps} UNet evaluations (steps 0–{trace.num_steps - 1}) · "
                                f"seed {recorded.seed} · "
                               f"{recorded.sampler}, CFG {recorded.guidance_scale:g}", *trace.notes])
        yield {tab.trace: trace, player.step: _step_slider(trace, 0),
               **_views(player, explorer.step_views(trace, 0, noise_kind)), player.final: trace.final_image,
               tab.status: summary, changes["prompt"]: recorded.prompt,
               changes["negative_prompt"]: recorded.negative_prompt, changes["sampler"]: recorded.sampler,
               changes["guidance_scale"]: recorded.guidance_scale}

    tab.record.click(record_reverse, inputs_kwargs={**tab.settings, "noise_kind": player.noise_kind},
                     outputs={tab.job_id, tab.trace, player.step, *player.views, player.final, tab.status,
                              *changes.values()},
                     api_name="explorer_record", **DEVICE_QUEUE)


def _wire_stop(context: StudioContext, tab: ReverseTab) -> None:
    def stop_job(job_id: str | None, request: gr.Request = None) -> None:
        job = context.owned_job(job_id, request)
        if job is not None:
            job.cancel()

    # Stop is not queued behind the job it stops
    tab.stop.click(stop_job, inputs_kwargs={"job_id": tab.job_id}, outputs=None, queue=False, **PRIVATE)


def _wire_scrub(explorer: Explorer, tab: ReverseTab) -> None:
    player = tab.player

    @user_errors
    def render_step(trace, step, noise_kind) -> dict:
        if trace is None:
            return {player.x_t: None, player.x0_pred: None, player.noise: None,
                    player.info: "Record a run to scrub through its steps."}
        return _views(player, explorer.step_views(trace, step, noise_kind))

    # the user's moves of the slider; a handler that moves it (the step buttons, playback, a branch scrubbed)
    # returns the step's views with it: one event per step shown, not a second one chained on the slider's change
    shown = {"trace": tab.trace, "step": player.step, "noise_kind": player.noise_kind}
    for trigger in (player.step.input, player.noise_kind.change):
        trigger(render_step, inputs_kwargs=shown, outputs=player.views, **PRIVATE, **DEVICE_QUEUE)

    def stepper(delta: int) -> Callable[..., dict]:
        @user_errors
        def move(trace, step, noise_kind) -> dict:
            if trace is None:
                return {player.step: gr.skip()}
            moved = max(0, min(int(step) + delta, trace.num_steps - 1))
            return {player.step: moved, **_views(player, explorer.step_views(trace, moved, noise_kind))}
        return move

    for button, delta in ((player.previous, -1), (player.following, +1)):
        button.click(stepper(delta), inputs_kwargs=shown, outputs={player.step, *player.views}, **PRIVATE,
                     **DEVICE_QUEUE)


def _wire_playback(explorer: Explorer, tab: ReverseTab) -> None:
    player = tab.player

    @user_errors
    def start_playing(trace, step, noise_kind) -> dict:
        if trace is None:
            raise gr.Error("Record a run first, then play it.")
        playing = {player.timer: gr.Timer(active=True), player.playing: True}
        if int(step) < trace.num_steps - 1:
            return playing
        return playing | {player.step: 0, **_views(player, explorer.step_views(trace, 0, noise_kind))}

    def stop_playing() -> dict:
        return {player.timer: gr.Timer(active=False), player.playing: False}

    @user_errors
    def tick(trace, step, playing, noise_kind) -> dict:
        if not playing or trace is None:
            return stop_playing()
        following = min(int(step) + 1, trace.num_steps - 1)
        shown = {player.step: following, **_views(player, explorer.step_views(trace, following, noise_kind))}
        return shown | (stop_playing() if following == trace.num_steps - 1 else {})   # the last step, then stop

    position = {"trace": tab.trace, "step": player.step, "noise_kind": player.noise_kind}
    player.play.click(start_playing, inputs_kwargs=position,
                      outputs={player.timer, player.playing, player.step, *player.views}, **PRIVATE, **DEVICE_QUEUE)
    player.pause.click(stop_playing, outputs={player.timer, player.playing}, **PRIVATE)
    player.timer.tick(tick, inputs_kwargs=position | {"playing": player.playing},
                      outputs={player.step, *player.views, player.timer, player.playing}, **PRIVATE, **DEVICE_QUEUE)


def _wire_branch(explorer: Explorer, tab: ReverseTab) -> None:
    panel, player = tab.branch, tab.player

    @user_errors
    def branch_reverse(trace, step, prompt, negative_prompt, sampler, guidance_scale,
                       request: gr.Request = None) -> Iterator[dict]:
        changes = {"prompt": prompt or "", "negative_prompt": negative_prompt or "", "sampler": sampler,
                   "guidance_scale": float(guidance_scale)}
        job = explorer.branch(trace, step, changes, owner=session_of(request))
        yield {tab.job_id: job.id}
        result = yield from follow(job, panel.status, "Branch: step {done} of {total}…")
        if result is None:
            return
        yield {panel.original: trace.final_image, panel.result: result.final_image,
               panel.difference: difference_map(trace.final_image, result.final_image),
               panel.status: _branch_summary(trace, result), tab.branched: result}

    panel.button.click(branch_reverse, inputs_kwargs={"trace": tab.trace, "step": player.step, **panel.changes},
                       outputs={tab.job_id, panel.original, panel.result, panel.difference, panel.status,
                                tab.branched},
                       **PRIVATE, **DEVICE_QUEUE)

    @user_errors
    def scrub_the_branch(branched, noise_kind) -> dict:
        if branched is None:
            raise gr.Error("Make a branch first.")
        step = branched.branched_at or 0
        return {tab.trace: branched, player.step: _step_slider(branched, step), player.final: branched.final_image,
                **_views(player, explorer.step_views(branched, step, noise_kind))}

    panel.scrub.click(scrub_the_branch, inputs_kwargs={"branched": tab.branched, "noise_kind": player.noise_kind},
                      outputs={tab.trace, player.step, player.final, *player.views}, **PRIVATE)


def _branch_summary(trace: Trace, branched: Trace) -> str:
    step = branched.branched_at
    changed = ", ".join(f"{key} {getattr(trace.request, key)!r} → {value!r}"
                        for key, value in branched.changes.items()) or "nothing (a replay of the original)"
    distance = rms_distance(trace.final_image, branched.final_image)
    return "  \n".join([f"Branched at step {step} ({trace.steps[step].describe()}); changed {changed}. "
                        f"RMS difference {distance:.2f} (0–255).", *branched.notes])


def _wire_trace_export(explorer: Explorer, tab: ReverseTab) -> None:
    panel = tab.export

    def exporter(suffix: str) -> Callable[..., dict]:
        @user_errors
        def export_trace(trace, kind, fps) -> dict:
            path = str(explorer.export_trace(trace, kind, fps=fps, suffix=suffix))
            return {panel.file: path} | ({panel.shown: path} if suffix == ".gif" else {})   # a GIF plays on the page
        return export_trace

    for button, suffix in ((panel.gif, ".gif"), (panel.mp4, ".mp4")):
        button.click(exporter(suffix), inputs_kwargs={"trace": tab.trace, "kind": panel.kind, "fps": panel.fps},
                     outputs={panel.file, panel.shown}, **PRIVATE, **DEVICE_QUEUE)
