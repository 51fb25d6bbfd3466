"""Diffusion Explorer: watch the forward (noising) and reverse (denoising) processes step by step.

Forward: your image noised in closed form at any t of several schedules, in pixel space and in the
loaded model's latent space, with the schedule curves, the value histogram and a check that the
Markov chain and the closed form agree.
Reverse: a real text-to-image run of the loaded model, recorded step by step (x_t, x̂_0 and the
noise predictions), scrubbed or played; branched at any step with other settings; compared across
samplers, step counts and CFG scales.

The handlers build arguments, call the `Explorer` service (pipelines/explorer.py) and render what
comes back; the service does the math and picks the device thread. A recorded trace lives in this
browser session's gr.State, and so does the id of the job the session started last, which Stop
cancels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr

from pipelines.core.checks import MAX_STEPS
from pipelines.core.samplers import (
    DEFAULT_DRAFT_LENGTH,
    DEFAULT_SAMPLER,
    DRAFTS,
    FROZEN_X0_DRAFT,
    MAX_DRAFT_LENGTH,
    SPECULATIVE_SAMPLER,
    STEPWISE_SAMPLER_NAMES,
)
from pipelines.explorer import forward as forward
from pipelines.explorer import reverse as reverse
from pipelines.explorer.service import Explorer, MarkovCheck, StepViews
from pipelines.explorer.speculative_view import ROUND_COLUMNS
from pipelines.jobs.worker import Job, JobCancelled, Progress
from pipelines.tasks.txt2img import Txt2ImgRequest
from studio.context import StudioContext, session_of
from studio.errors import user_errors

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"
FALLBACK_SIDE = 512
PLAY_INTERVAL_S = 0.6
SAME_SAMPLER = "same sampler"
NOISE_CHOICES = [("ε_u (negative prompt)", "eps_uncond"), ("ε_c (prompt)", "eps_cond"),
                 ("ε̂ (guided)", "eps_guided")]
EXPORT_CHOICES = [("x_t", "x_t"), ("x̂_0", "x0_pred"), ("ε_u", "eps_uncond"), ("ε_c", "eps_cond"),
                  ("ε̂", "eps_guided")]
# Gradio's progress overlay is off (the status lines report progress): on an error it would replace the
# shown images with "Error" badges.
DEVICE_QUEUE = {"concurrency_id": "device", "concurrency_limit": 1, "show_progress": "hidden"}
PRIVATE = {"api_visibility": "private"}
# Small images shown whole and enlarged by whole numbers (studio/app.py's CSS and script), saved as PNG
PIXELS = {"elem_classes": ["studio-pixels"], "format": "png"}


# ----------------------------------------------------------------------------- the components


@dataclass
class ForwardTab:
    inputs: dict[str, gr.components.Component]  # Explorer.forward_view's arguments -> their controls
    pixel: gr.Image
    latent: gr.Image
    caption: gr.Markdown
    plot: gr.Plot
    histogram: gr.Plot
    markov: gr.Button
    closed_mean: gr.Image
    chain_mean: gr.Image
    moments: gr.Markdown
    export_gif: gr.Button
    export_mp4: gr.Button
    animation: gr.File

    @property
    def view(self) -> set:
        return {self.pixel, self.latent, self.caption, self.plot, self.histogram}


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
class ComparePanel:
    inputs: dict[str, gr.components.Component]  # the comparison's own arguments -> their controls
    button: gr.Button
    status: gr.Markdown
    grid: gr.Image
    table: gr.Dataframe


@dataclass
class SpeculativePanel:
    inputs: dict[str, gr.components.Component]   # draft, draft_length
    button: gr.Button
    status: gr.Markdown
    timeline: gr.Image
    rounds: gr.Gallery
    table: gr.Dataframe


@dataclass
class TraceExport:
    kind: gr.Radio
    fps: gr.Slider
    gif: gr.Button
    mp4: gr.Button
    file: gr.File


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


@dataclass
class ExplorerTab:
    explorer: Explorer
    forward: ForwardTab
    reverse: ReverseTab


def build_explorer_tab(context: StudioContext) -> ExplorerTab:
    """Lay out the Forward and Reverse sub-tabs and wire their events."""
    explorer = Explorer(context.models)
    side = (context.models.current.native_side if context.models.current else None) or FALLBACK_SIDE
    # 1. Layout
    with gr.Tabs():
        with gr.Tab("Forward: noising", id="explorer-forward"):
            forward_tab = _layout_forward()
        with gr.Tab("Reverse: denoising", id="explorer-reverse"):
            reverse_tab = _layout_reverse(side)
    # 2. Wiring
    _wire_forward(explorer, forward_tab)
    _wire_forward_api(explorer, forward_tab)
    _wire_markov(explorer, forward_tab)
    _wire_forward_export(explorer, forward_tab)
    _wire_record(explorer, reverse_tab)
    _wire_stop(context, reverse_tab)
    _wire_scrub(explorer, reverse_tab)
    _wire_playback(reverse_tab)
    _wire_branch(explorer, reverse_tab)
    _wire_compare(explorer, reverse_tab)
    _wire_speculative(explorer, reverse_tab)
    _wire_trace_export(explorer, reverse_tab)
    return ExplorerTab(explorer=explorer, forward=forward_tab, reverse=reverse_tab)


def _formulas(formulas: dict[str, str]) -> gr.Markdown:
    return gr.Markdown("\n\n".join(formulas.values()), latex_delimiters=reverse.LATEX_DELIMITERS,
                       elem_classes=["explorer-formulas"])


# ----------------------------------------------------------------------------- forward


def _layout_forward() -> ForwardTab:
    gr.Markdown("Noise your own image: $x_t$ for any $t$, always with the same $\\varepsilon$, so only "
                "$\\bar\\alpha_t$ changes as you move $t$.", latex_delimiters=reverse.LATEX_DELIMITERS)
    with gr.Row():
        with gr.Column(scale=2):
            examples = sorted(EXAMPLES_DIR.glob("*.png")) if EXAMPLES_DIR.is_dir() else []
            # opens on an example, so the view and the plots are there before anything is uploaded
            image = gr.Image(value=str(examples[0]) if examples else None, label="Your image", type="pil",
                             height=256, elem_id="explorer-forward-image", format="png")
            if examples:
                gr.Examples([[str(path)] for path in examples], inputs=[image], label="Example images")
            schedules = gr.CheckboxGroup(list(forward.SCHEDULE_NAMES), value=["linear", "cosine"],
                                         label="Schedules (the first checked one noises the image)",
                                         info="model: the loaded model's own betas",
                                         elem_id="explorer-forward-schedules")
            num_steps = gr.Slider(10, forward.MAX_NUM_STEPS, value=forward.DEFAULT_NUM_STEPS, step=1, precision=0,
                                  label="T", elem_id="explorer-forward-T")
            t = gr.Slider(0, forward.DEFAULT_NUM_STEPS - 1, value=250, step=1, precision=0, label="t",
                          elem_id="explorer-forward-t")
            seed = gr.Number(value=0, precision=0, label="Noise seed (the fixed ε)")
        with gr.Column(scale=3):
            with gr.Row():
                pixel = gr.Image(label="x_t in pixel space", interactive=False, height=256,
                                 elem_id="explorer-forward-pixel", **PIXELS)
                latent = gr.Image(label="x_t in latent space (decoded by the model's VAE)", interactive=False,
                                  height=256, elem_id="explorer-forward-latent", **PIXELS)
            caption = gr.Markdown(label="Caption", elem_id="explorer-forward-caption")
            _formulas(forward.FORMULAS)
    plot = gr.Plot(label="Schedules", elem_id="explorer-forward-plot")
    histogram = gr.Plot(label="Values of x_t against theory", elem_id="explorer-forward-histogram")
    with gr.Row():
        markov = gr.Button("Markov chain vs closed form", elem_id="explorer-forward-markov")
        export_gif = gr.Button("Export GIF", elem_id="explorer-forward-gif")
        export_mp4 = gr.Button("Export MP4", elem_id="explorer-forward-mp4")
    with gr.Row():
        closed_mean = gr.Image(label="Mean over draws: closed form", interactive=False, height=200, **PIXELS)
        chain_mean = gr.Image(label="Mean over draws: Markov chain", interactive=False, height=200, **PIXELS)
        moments = gr.Markdown(elem_id="explorer-forward-moments")
    animation = gr.File(label="Animation", elem_id="explorer-forward-file")
    return ForwardTab(inputs={"image": image, "schedule_names": schedules, "num_steps": num_steps, "t": t,
                              "seed": seed},
                      pixel=pixel, latent=latent, caption=caption, plot=plot, histogram=histogram, markov=markov,
                      closed_mean=closed_mean, chain_mean=chain_mean, moments=moments, export_gif=export_gif,
                      export_mp4=export_mp4, animation=animation)


def _forward_handler(explorer: Explorer, tab: ForwardTab):
    @user_errors
    def show_forward(image, **settings) -> dict:
        if image is None:
            return {tab.pixel: None, tab.latent: None, tab.plot: None, tab.histogram: None,
                    tab.caption: "Upload an image (or pick an example) to noise it."}
        view = explorer.forward_view(image, **settings)
        return {tab.pixel: view.x_t, tab.latent: view.latent_x_t, tab.plot: view.schedule_figure,
                tab.histogram: view.histogram, tab.caption: view.caption}
    return show_forward


def wire_explorer_load(app: gr.Blocks, tab: "ExplorerTab") -> None:
    """The forward view is drawn for the example image it opens on as soon as the page loads."""
    app.load(_forward_handler(tab.explorer, tab.forward), inputs_kwargs=tab.forward.inputs, outputs=tab.forward.view,
             **PRIVATE, **DEVICE_QUEUE)


def _wire_forward(explorer: Explorer, tab: ForwardTab) -> None:
    controls = tab.inputs
    show_forward = _forward_handler(explorer, tab)

    # `change` (typing a number and Enter, arrow keys, dragging) rather than `release` (the mouse alone);
    # while dragging only the latest value is rendered
    for trigger in (controls["image"].change, controls["schedule_names"].change, controls["num_steps"].change,
                    controls["t"].change, controls["seed"].change):
        trigger(show_forward, inputs_kwargs=controls, outputs=tab.view, trigger_mode="always_last", **PRIVATE,
                **DEVICE_QUEUE)

    def t_range(num_steps, t) -> dict:
        last = int(num_steps) - 1
        return {controls["t"]: gr.Slider(maximum=last, value=min(int(t), last))}

    controls["num_steps"].change(t_range, inputs_kwargs={"num_steps": controls["num_steps"], "t": controls["t"]},
                                 outputs={controls["t"]}, trigger_mode="always_last", **PRIVATE)


def _wire_forward_api(explorer: Explorer, tab: ForwardTab) -> None:
    """`/explorer_forward`: an image noised to x_t by the closed form, and the numbers behind the plots."""
    data = gr.JSON(visible=False, label="Schedules: beta_t, abar_t, log-SNR per t; the coefficients at t")

    @user_errors
    def explorer_forward(image, schedule: str = "linear", T: int = forward.DEFAULT_NUM_STEPS, t: int = 250,
                         seed: int = 0):
        if image is None:
            raise ValueError("`image` is required: the image to noise.")
        T, t, seed = int(T), int(t), int(seed)
        view = explorer.forward_view(image, schedule_names=[schedule], num_steps=T, t=t, seed=seed)
        numbers = forward.schedule_data(explorer.schedules([schedule], T), t=min(t, T - 1))
        return view.x_t, view.latent_x_t, view.caption, numbers

    inputs = {"image": tab.inputs["image"], "schedule": gr.Dropdown(list(forward.SCHEDULE_NAMES), value="linear",
                                                                      visible=False, label="Schedule"),
              "T": tab.inputs["num_steps"], "t": tab.inputs["t"], "seed": tab.inputs["seed"]}
    gr.Button(visible=False).click(explorer_forward, inputs=list(inputs.values()),
                                   outputs=[tab.pixel, tab.latent, tab.caption, data], api_name="explorer_forward",
                                   **DEVICE_QUEUE)


def _wire_markov(explorer: Explorer, tab: ForwardTab) -> None:
    @user_errors
    def markov_vs_closed_form(**values) -> dict:
        check = explorer.markov_check(**values)
        return {tab.closed_mean: check.closed_form.mean_image, tab.chain_mean: check.markov_chain.mean_image,
                tab.moments: _moments_table(check)}

    tab.markov.click(markov_vs_closed_form, inputs_kwargs=tab.inputs,
                     outputs={tab.closed_mean, tab.chain_mean, tab.moments}, **PRIVATE)


def _moments_table(check: MarkovCheck) -> str:
    closed, chain = check.closed_form, check.markov_chain
    return (f"{check.draws} draws of a {check.side_px}-px copy, t = {check.t}\n\n"
            "| | closed form | Markov chain | in theory |\n|:--|--:|--:|--:|\n"
            f"| mean \\|mean − √ᾱ·x₀\\| | {closed.mean_error:.4f} | {chain.mean_error:.4f} | 0 |\n"
            f"| mean variance | {closed.variance:.4f} | {chain.variance:.4f} | {check.theory_variance:.4f} |")


def _wire_forward_export(explorer: Explorer, tab: ForwardTab) -> None:
    inputs = {name: control for name, control in tab.inputs.items() if name != "t"}

    def exporter(suffix: str) -> Callable[..., dict]:
        @user_errors
        def export_forward(**values) -> dict:
            return {tab.animation: str(explorer.export_forward(**values, suffix=suffix))}
        return export_forward

    for button, suffix in ((tab.export_gif, ".gif"), (tab.export_mp4, ".mp4")):
        button.click(exporter(suffix), inputs_kwargs=inputs, outputs={tab.animation}, **PRIVATE)


# ----------------------------------------------------------------------------- reverse: layout


def _layout_reverse(side: int) -> ReverseTab:
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
        compare = _layout_compare()
    with gr.Accordion("Speculative sampling, round by round (DDPM speculative)", open=False):
        speculative = _layout_speculative()
    with gr.Accordion("Export the recorded frames", open=False):
        export = _layout_trace_export()
    with gr.Accordion("The formulas", open=True):
        _formulas(reverse.FORMULAS_REVERSE)
    return ReverseTab(settings=settings, record=record, stop=stop, status=status, player=player, branch=branch,
                      compare=compare, speculative=speculative, export=export, trace=gr.State(None), branched=gr.State(None),
                      job_id=gr.State(None))


def _layout_player() -> Player:
    with gr.Row():
        step = gr.Slider(0, 1, value=0, step=1, precision=0, label="Step (0: pure noise)", scale=4,
                         elem_id="explorer-step-slider")
        previous = gr.Button("Step −", scale=0, min_width=80, elem_id="explorer-step-prev")
        play = gr.Button("▶ Play", scale=0, min_width=80, elem_id="explorer-play")
        pause = gr.Button("Pause", scale=0, min_width=80, elem_id="explorer-pause")
        following = gr.Button("Step +", scale=0, min_width=80, elem_id="explorer-step-next")
    noise_kind = gr.Radio(NOISE_CHOICES, value="eps_guided", label="Noise prediction shown",
                          elem_id="explorer-noise-kind")
    info = gr.Markdown(label="The step shown", elem_id="explorer-step-info")
    with gr.Row():
        x_t = gr.Image(label="x_t (what the UNet sees)", interactive=False, height=256, elem_id="explorer-frame",
                       **PIXELS)
        x0_pred = gr.Image(label="x̂_0 (its guess of the clean image)", interactive=False, height=256, **PIXELS,
                           elem_id="explorer-x0")
        noise = gr.Image(label="Noise prediction, |ε| per pixel", interactive=False, height=256, **PIXELS,
                         elem_id="explorer-noise")
        final = gr.Image(label="Final image", interactive=False, height=256, elem_id="explorer-final", **PIXELS)
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


def _layout_compare() -> ComparePanel:
    inputs: dict[str, gr.components.Component] = {}
    with gr.Row():
        inputs["samplers_text"] = gr.Textbox(label="Samplers", placeholder="e.g. Euler, DDIM, DPM++ 2M",
                                             info="empty: the sampler above", elem_id="explorer-compare-samplers")
        inputs["steps_text"] = gr.Textbox(label="Steps", placeholder="e.g. 5, 10, 20", info="empty: the steps above",
                                          elem_id="explorer-compare-steps")
        inputs["cfgs_text"] = gr.Textbox(label="CFG scales", placeholder="e.g. 1, 4, 7.5",
                                         info="empty: the CFG above", elem_id="explorer-compare-cfgs")
    with gr.Row():
        inputs["reference_sampler"] = gr.Dropdown(
            [reverse.DEFAULT_REFERENCE_SAMPLER, SAME_SAMPLER, *STEPWISE_SAMPLER_NAMES],
            value=reverse.DEFAULT_REFERENCE_SAMPLER, label="Reference sampler")
        inputs["reference_steps"] = gr.Slider(1, MAX_STEPS, value=100, step=1, label="Reference steps")
        button = gr.Button("Compare", variant="primary", elem_id="explorer-compare")
    status = gr.Markdown(elem_id="explorer-compare-status")
    grid = gr.Image(label="Comparison", interactive=False, elem_id="explorer-compare-grid", format="png")
    table = gr.Dataframe(headers=list(reverse.COMPARE_COLUMNS), interactive=False, elem_id="explorer-compare-table")
    return ComparePanel(inputs=inputs, button=button, status=status, grid=grid, table=table)


def _layout_speculative() -> SpeculativePanel:
    gr.Markdown("The draft proposes L DDPM steps; the model checks all L in one batched call and accepts each "
                "drafted step with probability min(1, q/p). At the first rejection the next state is the draft's "
                "noise reflected across the hyperplane between the two means, an exact draw from the model's "
                "step, so the image has DDPM's law whatever the draft. Prompt, steps, CFG, seed and size are "
                "the ones above (100 steps shows it best).")
    inputs: dict[str, gr.components.Component] = {}
    with gr.Row():
        inputs["draft"] = gr.Dropdown(list(DRAFTS), value=FROZEN_X0_DRAFT, label="Draft",
                                      elem_id="explorer-speculative-draft")
        inputs["draft_length"] = gr.Slider(1, MAX_DRAFT_LENGTH, value=DEFAULT_DRAFT_LENGTH, step=1, precision=0,
                                           label="Draft length L", elem_id="explorer-speculative-length")
        button = gr.Button("Run speculative", variant="primary", elem_id="explorer-speculative-run")
    status = gr.Markdown(label="Summary", elem_id="explorer-speculative-status")
    timeline = gr.Image(label="Rounds and target calls", interactive=False, format="png",
                        elem_id="explorer-speculative-timeline")
    rounds = gr.Gallery(label="The image after each round", columns=8, height="auto", object_fit="contain",
                        elem_id="explorer-speculative-rounds")
    table = gr.Dataframe(headers=list(ROUND_COLUMNS), interactive=False, label="Rounds",
                         elem_id="explorer-speculative-table")
    return SpeculativePanel(inputs=inputs, button=button, status=status, timeline=timeline, rounds=rounds,
                            table=table)


def _layout_trace_export() -> TraceExport:
    with gr.Row():
        kind = gr.Radio(EXPORT_CHOICES, value="x_t", label="Frames", elem_id="explorer-export-kind")
        fps = gr.Slider(1, 30, value=8, step=1, label="Frames per second")
        gif = gr.Button("Export GIF", elem_id="explorer-export-gif")
        mp4 = gr.Button("Export MP4", elem_id="explorer-export-mp4")
    file = gr.File(label="Animation", elem_id="explorer-export-file")
    return TraceExport(kind=kind, fps=fps, gif=gif, mp4=mp4, file=file)


# ----------------------------------------------------------------------------- reverse: wiring


def _request(*, prompt, negative_prompt, sampler, steps, guidance_scale, seed, size) -> Txt2ImgRequest:
    """The text-to-image request the reverse settings describe, with its seed drawn (to report it)."""
    return Txt2ImgRequest(prompt=prompt or "", negative_prompt=negative_prompt or "", sampler=sampler,
                          steps=int(steps), guidance_scale=float(guidance_scale), width=int(size), height=int(size),
                          seed=int(seed if seed is not None else -1)).resolved()


def _follow(job: Job, status: gr.Markdown, progress: str) -> Iterator[dict]:
    """Show `job`'s progress in `status` as it comes (`progress` with {done} and {total} filled in); returns
    the job's result (None when the job was stopped before it started): `result = yield from _follow(...)`."""
    for event in job.events():
        if isinstance(event, Progress):
            yield {status: progress.format(done=event.done, total=event.total)}
    try:
        return job.result()
    except JobCancelled:
        yield {status: "Stopped before it started."}
        return None


def _views(player: Player, views: StepViews) -> dict:
    return {player.x_t: views.x_t, player.x0_pred: views.x0_pred, player.noise: views.noise, player.info: views.info}


def _step_slider(trace: reverse.Trace, value: int) -> gr.Slider:
    return gr.Slider(minimum=0, maximum=max(trace.num_steps - 1, 1), value=value, step=1)


def _wire_record(explorer: Explorer, tab: ReverseTab) -> None:
    player, changes = tab.player, tab.branch.changes

    @user_errors
    def record_reverse(prompt: str, negative_prompt: str | None = None, noise_kind: str = "eps_guided",
                       request: gr.Request = None, **settings) -> Iterator[dict]:
        job = explorer.record(_request(prompt=prompt, negative_prompt=negative_prompt, **settings),
                              owner=session_of(request))
        yield {tab.job_id: job.id}
        trace = yield from _follow(job, tab.status, "Recording step {done} of {total}…")
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
    def stop_job(job_id: str | None) -> None:
        job = context.find_job(job_id)
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

    shown = {"trace": tab.trace, "step": player.step, "noise_kind": player.noise_kind}
    for trigger in (player.step.change, player.noise_kind.change):
        trigger(render_step, inputs_kwargs=shown, outputs=player.views, **PRIVATE, **DEVICE_QUEUE)

    def stepper(delta: int) -> Callable[..., dict]:
        def move(trace, step) -> dict:
            if trace is None:
                return {player.step: gr.skip()}
            return {player.step: max(0, min(int(step) + delta, trace.num_steps - 1))}
        return move

    position = {"trace": tab.trace, "step": player.step}
    player.previous.click(stepper(-1), inputs_kwargs=position, outputs={player.step}, **PRIVATE)
    player.following.click(stepper(+1), inputs_kwargs=position, outputs={player.step}, **PRIVATE)


def _wire_playback(tab: ReverseTab) -> None:
    player = tab.player

    def start_playing(trace, step) -> dict:
        if trace is None:
            raise gr.Error("Record a run first, then play it.")
        at_end = int(step) >= trace.num_steps - 1
        return {player.timer: gr.Timer(active=True), player.playing: True, player.step: 0 if at_end else gr.skip()}

    def stop_playing() -> dict:
        return {player.timer: gr.Timer(active=False), player.playing: False}

    def tick(trace, step, playing) -> dict:
        if not playing or trace is None:
            return stop_playing()
        following = int(step) + 1
        if following >= trace.num_steps - 1:  # show the last step, then stop
            return {player.step: min(following, trace.num_steps - 1), **stop_playing()}
        return {player.step: following}

    player.play.click(start_playing, inputs_kwargs={"trace": tab.trace, "step": player.step},
                      outputs={player.timer, player.playing, player.step}, **PRIVATE)
    player.pause.click(stop_playing, outputs={player.timer, player.playing}, **PRIVATE)
    player.timer.tick(tick, inputs_kwargs={"trace": tab.trace, "step": player.step, "playing": player.playing},
                      outputs={player.step, player.timer, player.playing}, **PRIVATE)


def _wire_branch(explorer: Explorer, tab: ReverseTab) -> None:
    panel, player = tab.branch, tab.player

    @user_errors
    def branch_reverse(trace, step, prompt, negative_prompt, sampler, guidance_scale,
                       request: gr.Request = None) -> Iterator[dict]:
        changes = {"prompt": prompt or "", "negative_prompt": negative_prompt or "", "sampler": sampler,
                   "guidance_scale": float(guidance_scale)}
        job = explorer.branch(trace, step, changes, owner=session_of(request))
        yield {tab.job_id: job.id}
        result = yield from _follow(job, panel.status, "Branch: step {done} of {total}…")
        if result is None:
            return
        yield {panel.original: trace.final_image, panel.result: result.final_image,
               panel.difference: reverse.difference_map(trace.final_image, result.final_image),
               panel.status: _branch_summary(trace, result), tab.branched: result}

    panel.button.click(branch_reverse, inputs_kwargs={"trace": tab.trace, "step": player.step, **panel.changes},
                       outputs={tab.job_id, panel.original, panel.result, panel.difference, panel.status,
                                tab.branched},
                       **PRIVATE, **DEVICE_QUEUE)

    def scrub_the_branch(branched) -> dict:
        if branched is None:
            raise gr.Error("Make a branch first.")
        return {tab.trace: branched, player.step: _step_slider(branched, branched.branched_at or 0),
                player.final: branched.final_image}

    panel.scrub.click(scrub_the_branch, inputs_kwargs={"branched": tab.branched},
                      outputs={tab.trace, player.step, player.final}, **PRIVATE)


def _branch_summary(trace: reverse.Trace, branched: reverse.Trace) -> str:
    step = branched.branched_at
    changed = ", ".join(f"{key} {getattr(trace.request, key)!r} → {value!r}"
                        for key, value in branched.changes.items()) or "nothing (a replay of the original)"
    distance = reverse.rms_distance(trace.final_image, branched.final_image)
    return "  \n".join([f"Branched at step {step} ({trace.steps[step].describe()}); changed {changed}. "
                        f"RMS difference {distance:.2f} (0–255).", *branched.notes])


def _wire_compare(explorer: Explorer, tab: ReverseTab) -> None:
    panel = tab.compare

    @user_errors
    def compare_reverse(samplers_text, steps_text, cfgs_text, reference_sampler, reference_steps,
                        request: gr.Request = None, **settings) -> Iterator[dict]:
        lists = reverse.parse_compare_lists(samplers_text, steps_text, cfgs_text)
        generation = _request(**settings)
        reference = None if reference_sampler == SAME_SAMPLER else reference_sampler
        job = explorer.compare(generation, **lists, reference_sampler=reference, reference_steps=reference_steps,
                               owner=session_of(request))
        yield {tab.job_id: job.id}
        result = yield from _follow(job, panel.status, "Image {done} of {total} done…")
        if result is None:
            return
        grid, rows = result
        reference_name = reference or "each cell's own sampler"
        yield {panel.grid: grid,
               panel.table: gr.Dataframe(value=[row.values() for row in rows], headers=list(reverse.COMPARE_COLUMNS)),
               panel.status: f"Seed {generation.seed} · reference: {reference_name} at {int(reference_steps)} steps. "
                             "NFE counts UNet calls; with CFG one call carries both passes (2 evaluations)."}

    panel.button.click(compare_reverse, inputs_kwargs={**tab.settings, **panel.inputs},
                       outputs={tab.job_id, panel.grid, panel.table, panel.status}, **PRIVATE, **DEVICE_QUEUE)


def _wire_speculative(explorer: Explorer, tab: ReverseTab) -> None:
    panel = tab.speculative

    @user_errors
    def explorer_speculative(prompt: str, negative_prompt: str | None = None, steps: int | None = None,
                             guidance_scale: float | None = None, seed: int | None = None, size: int | None = None,
                             draft: str | None = None, draft_length: int | None = None,
                             request: gr.Request = None) -> Iterator[dict]:
        """Only the prompt is required; the rest default to 100 steps, CFG 7.5, a drawn seed, the model's size."""
        fields = Txt2ImgRequest.__dataclass_fields__
        side = explorer.models.current.native_side if explorer.models.current else None
        generation = replace(_request(prompt=prompt, negative_prompt=negative_prompt, sampler=SPECULATIVE_SAMPLER,
                                      steps=100 if steps is None else steps,
                                      guidance_scale=fields["guidance_scale"].default if guidance_scale is None
                                      else guidance_scale, seed=seed, size=size or side or FALLBACK_SIDE),
                             draft=draft or fields["draft"].default,
                             draft_length=fields["draft_length"].default if draft_length is None else int(draft_length))
        job = explorer.speculative(generation, owner=session_of(request))
        yield {tab.job_id: job.id}
        view = yield from _follow(job, panel.status, "Step {done} of {total} reached…")
        if view is None:
            return
        yield {panel.timeline: view.timeline, panel.rounds: view.round_images,
               panel.table: gr.Dataframe(value=view.rows, headers=list(ROUND_COLUMNS)),
               panel.status: f"Seed {view.request.seed} · " + view.summary}

    settings = {name: control for name, control in tab.settings.items() if name != "sampler"}
    panel.button.click(explorer_speculative, inputs_kwargs={**settings, **panel.inputs},
                       outputs=[panel.timeline, panel.rounds, panel.table, panel.status, tab.job_id],
                       api_name="explorer_speculative", **DEVICE_QUEUE)


def _wire_trace_export(explorer: Explorer, tab: ReverseTab) -> None:
    panel = tab.export

    def exporter(suffix: str) -> Callable[..., dict]:
        @user_errors
        def export_trace(trace, kind, fps) -> dict:
            return {panel.file: str(explorer.export_trace(trace, kind, fps=fps, suffix=suffix))}
        return export_trace

    for button, suffix in ((panel.gif, ".gif"), (panel.mp4, ".mp4")):
        button.click(exporter(suffix), inputs_kwargs={"trace": tab.trace, "kind": panel.kind, "fps": panel.fps},
                     outputs={panel.file}, **PRIVATE, **DEVICE_QUEUE)
