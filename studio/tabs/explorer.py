"""Diffusion Explorer: watch the forward (noising) and reverse (denoising) processes step by step.

Forward: your image noised in closed form at any t of several schedules, in pixel space and in the
loaded model's latent space, with the schedule curves, the value histogram and a check that the
Markov chain and the closed form agree.
Reverse: a real text-to-image run of the loaded model, recorded step by step (x_t, x̂_0 and the
noise predictions), scrubbed or played; branched at any step with other settings; compared across
samplers, step counts and CFG scales.

The handlers only build requests, call `pipelines.explorer_forward` / `pipelines.explorer_reverse`
and render what comes back. A recorded trace lives in this browser session's gr.State.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from pipelines import explorer_forward as forward
from pipelines import explorer_reverse as reverse
from pipelines.requests import MAX_STEPS, GenerationRequest
from pipelines.samplers import DEFAULT_SAMPLER, SAMPLER_NAMES
from pipelines.streaming import on_device_thread
from studio.context import StudioContext
from studio.errors import user_errors

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"
FORWARD_SIDE_PX = 128        # the pixel-space image is resized so that its shorter side is this
MOMENT_SIDE_PX = 32          # the Markov-chain check runs on a small copy ...
MOMENT_DRAWS = 32            # ... with this many independent draws per method
ANIMATION_FRAMES = 40
PLAY_INTERVAL_S = 0.6
SAME_SAMPLER = "same sampler"
NOISE_CHOICES = [("ε_u (negative prompt)", "eps_uncond"), ("ε_c (prompt)", "eps_cond"),
                 ("ε̂ (guided)", "eps_guided")]
EXPORT_CHOICES = [("x_t", "x_t"), ("x̂_0", "x0_pred"), ("ε_u", "eps_uncond"), ("ε_c", "eps_cond"),
                  ("ε̂", "eps_guided")]
DEVICE = {"concurrency_id": "device", "concurrency_limit": 1}


def _session(request: gr.Request | None) -> str | None:
    return request.session_hash if request else None


def _export_path(name: str) -> Path:
    """A fresh file in the system temp folder, which Gradio serves from."""
    return Path(tempfile.mkdtemp(prefix="explorer-")) / name


def _formulas(formulas: dict[str, str]) -> gr.Markdown:
    return gr.Markdown("\n\n".join(formulas.values()), latex_delimiters=reverse.LATEX_DELIMITERS,
                       elem_classes=["explorer-formulas"])


def build_explorer_tab(context: StudioContext) -> None:
    """Lay out the Forward and Reverse sub-tabs and wire their events."""
    with gr.Tabs():
        with gr.Tab("Forward: noising", id="explorer-forward"):
            _build_forward(context)
        with gr.Tab("Reverse: denoising", id="explorer-reverse"):
            _build_reverse(context)


# ----------------------------------------------------------------------------- forward


def _build_forward(context: StudioContext) -> None:
    gr.Markdown("Noise your own image: $x_t$ for any $t$, always with the same $\\varepsilon$, so only "
                "$\\bar\\alpha_t$ changes as you move $t$.", latex_delimiters=reverse.LATEX_DELIMITERS)
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(label="Your image", type="pil", height=256, elem_id="explorer-forward-image")
            examples = sorted(EXAMPLES_DIR.glob("*.png")) if EXAMPLES_DIR.is_dir() else []
            if examples:
                gr.Examples([[str(path)] for path in examples], inputs=[image], label="Example images")
            schedules = gr.CheckboxGroup(list(forward.SCHEDULE_NAMES), value=["linear", "cosine"],
                                         label="Schedules (the first checked one noises the image)",
                                         info="model: the loaded model's own betas",
                                         elem_id="explorer-forward-schedules")
            total = gr.Slider(10, forward.MAX_NUM_STEPS, value=forward.DEFAULT_NUM_STEPS, step=1, label="T",
                              elem_id="explorer-forward-T")
            timestep = gr.Slider(0, forward.DEFAULT_NUM_STEPS - 1, value=250, step=1, label="t",
                                 elem_id="explorer-forward-t")
            seed = gr.Number(value=0, precision=0, label="Noise seed (the fixed ε)")
        with gr.Column(scale=3):
            with gr.Row():
                pixel = gr.Image(label="x_t in pixel space", interactive=False, height=256,
                                 elem_id="explorer-forward-pixel")
                latent = gr.Image(label="x_t in latent space (decoded by the model's VAE)", interactive=False,
                                  height=256, elem_id="explorer-forward-latent")
            caption = gr.Markdown(elem_id="explorer-forward-caption")
            _formulas(forward.FORMULAS)
    plot = gr.Plot(label="Schedules", elem_id="explorer-forward-plot")
    histogram = gr.Plot(label="Values of x_t against theory", elem_id="explorer-forward-histogram")
    with gr.Row():
        markov = gr.Button("Markov chain vs closed form", elem_id="explorer-forward-markov")
        export_gif = gr.Button("Export GIF", elem_id="explorer-forward-gif")
        export_mp4 = gr.Button("Export MP4", elem_id="explorer-forward-mp4")
    with gr.Row():
        closed_mean = gr.Image(label="Mean over draws: closed form", interactive=False, height=160)
        chain_mean = gr.Image(label="Mean over draws: Markov chain", interactive=False, height=160)
        moments = gr.Markdown(elem_id="explorer-forward-moments")
    animation = gr.File(label="Animation", elem_id="explorer-forward-file")

    def active_schedules(names, steps_total):
        if not names:
            raise ValueError("Tick at least one schedule.")
        config = None
        if "model" in names:
            if context.models.current is None:
                raise ValueError('Schedule "model" needs a loaded model; load one in Models & memory or untick it.')
            config = context.models.current.scheduler_config
        return [forward.make_schedule(name, int(steps_total), scheduler_config=config if name == "model" else None)
                for name in names]

    @user_errors
    @on_device_thread
    def show_forward(picture, names, steps_total, t, noise_seed):
        if picture is None:
            return None, None, None, None, "Upload an image (or pick an example) to noise it."
        schedules_list = active_schedules(names, steps_total)
        active, t = schedules_list[0], min(int(t), int(steps_total) - 1)
        x0 = forward.image_to_tensor(picture, size=FORWARD_SIDE_PX)
        x_t = forward.forward_sample(x0, t=t, schedule=active, noise=forward.FixedNoise(int(noise_seed)).like(x0))
        latent_image = None
        if context.models.current is not None:
            side = reverse.native_side(context.models) or FORWARD_SIDE_PX
            latent_image = forward.forward_frames(forward.image_to_tensor(picture, size=side), schedule=active,
                                                  timesteps=[t], seed=int(noise_seed),
                                                  vae=context.models.current.pipeline.vae)[0]
        alpha_cumprod = active.alphas_cumprod[t].item()
        text = (f"**{active.name}**, t = {t} of T = {active.num_steps}: ᾱ_t = {alpha_cumprod:.4g}, "
                f"signal × {alpha_cumprod ** 0.5:.3f}, noise × {(1 - alpha_cumprod) ** 0.5:.3f}")
        if latent_image is None:
            text += "  \nLoad a model to see the same t in its latent space."
        return (forward.tensor_to_image(x_t), latent_image, forward.schedule_plot(schedules_list, t=t),
                forward.value_histogram(x_t, t=t, schedule=active, x0=x0), text)

    inputs = [image, schedules, total, timestep, seed]
    outputs = [pixel, latent, plot, histogram, caption]
    for trigger in (image.change, schedules.change, total.release, timestep.release, seed.change):
        trigger(show_forward, inputs=inputs, outputs=outputs, api_visibility="private", **DEVICE)
    def timestep_range(steps_total, t):
        return gr.Slider(maximum=int(steps_total) - 1, value=min(int(t), int(steps_total) - 1))

    total.release(timestep_range, inputs=[total, timestep], outputs=timestep, api_visibility="private")

    @user_errors
    @on_device_thread
    def markov_vs_closed_form(picture, names, steps_total, t, noise_seed):
        if picture is None:
            raise ValueError("Upload an image (or pick an example) first.")
        active = active_schedules(names, steps_total)[0]
        t = min(int(t), int(steps_total) - 1)
        x0 = forward.image_to_tensor(picture, size=MOMENT_SIDE_PX)[0]
        alpha_cumprod = active.alphas_cumprod[t].item()
        results = {}
        for method in ("closed_form", "markov_chain"):
            mean, variance = forward.empirical_moments(x0, t=t, schedule=active, n_draws=MOMENT_DRAWS,
                                                       seed=int(noise_seed), method=method)
            mean_error = (mean - alpha_cumprod ** 0.5 * x0).abs().mean().item()
            results[method] = (forward.tensor_to_image(mean), mean_error, variance.mean().item())
        table = (f"{MOMENT_DRAWS} draws of a {MOMENT_SIDE_PX}-px copy, t = {t}\n\n"
                 "| | closed form | Markov chain | theory |\n|---|---|---|---|\n"
                 f"| mean \\|mean − √ᾱ·x₀\\| | {results['closed_form'][1]:.4f} | "
                 f"{results['markov_chain'][1]:.4f} | 0 |\n"
                 f"| mean variance | {results['closed_form'][2]:.4f} | {results['markov_chain'][2]:.4f} | "
                 f"{1 - alpha_cumprod:.4f} |")
        return results["closed_form"][0], results["markov_chain"][0], table

    markov.click(markov_vs_closed_form, inputs=inputs, outputs=[closed_mean, chain_mean, moments],
                 api_visibility="private")

    def export_forward(suffix: str):
        @user_errors
        @on_device_thread
        def export(picture, names, steps_total, noise_seed):
            if picture is None:
                raise ValueError("Upload an image (or pick an example) first.")
            active = active_schedules(names, steps_total)[0]
            frames = forward.forward_frames(
                forward.image_to_tensor(picture, size=FORWARD_SIDE_PX), schedule=active, include_clean=True,
                timesteps=forward.animation_timesteps(active, num_frames=min(ANIMATION_FRAMES, active.num_steps)),
                seed=int(noise_seed))
            return str(forward.export_animation(frames, _export_path(f"forward-{names[0]}{suffix}"), fps=10))
        return export

    for button, suffix in ((export_gif, ".gif"), (export_mp4, ".mp4")):
        button.click(export_forward(suffix), inputs=[image, schedules, total, seed], outputs=animation,
                     api_visibility="private")


# ----------------------------------------------------------------------------- reverse


def _step_views(trace: reverse.Trace, step: int, noise_kind: str):
    """x_t, x̂_0 and the chosen noise map of one step, and a line naming the step."""
    step = max(0, min(int(step), trace.num_steps - 1))
    record = trace.steps[step]
    has_noise = getattr(record, noise_kind) is not None
    info = f"**Step {step} of {trace.num_steps - 1}** · {record.describe()}"
    if not has_noise:
        info += "  \nCFG is off at this step (scale ≤ 1): the model made no unconditional pass, so there is no ε_u."
    return (trace.frame(step, "x_t"), trace.frame(step, "x0_pred"),
            trace.frame(step, noise_kind) if has_noise else None, info)


def _build_reverse(context: StudioContext) -> None:
    side = reverse.native_side(context.models) or 512
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="e.g. red apple", elem_id="explorer-prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="explorer-negative")
        with gr.Column(scale=1, min_width=160):
            record = gr.Button("Record", variant="primary", elem_id="explorer-record")
            stop = gr.Button("Stop", variant="stop", elem_id="explorer-stop")
    with gr.Row():
        sampler = gr.Dropdown(list(SAMPLER_NAMES), value=DEFAULT_SAMPLER, label="Sampler", elem_id="explorer-sampler")
        steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps", elem_id="explorer-steps")
        cfg = gr.Slider(1.0, 20.0, value=7.5, step=0.5, label="CFG scale", info="1 turns guidance off",
                        elem_id="explorer-cfg")
        seed = gr.Number(value=-1, precision=0, label="Seed", info="-1 draws one", elem_id="explorer-seed")
        size = gr.Slider(64, 1024, value=side, step=8, label="Size (px)", elem_id="explorer-size")
    status = gr.Markdown(elem_id="explorer-status")

    with gr.Row():
        step_slider = gr.Slider(0, 1, value=0, step=1, label="Step (0: pure noise)", scale=4,
                                elem_id="explorer-step-slider")
        previous = gr.Button("Step −", scale=0, min_width=80, elem_id="explorer-step-prev")
        play = gr.Button("▶ Play", scale=0, min_width=80, elem_id="explorer-play")
        pause = gr.Button("Pause", scale=0, min_width=80, elem_id="explorer-pause")
        following = gr.Button("Step +", scale=0, min_width=80, elem_id="explorer-step-next")
    noise_kind = gr.Radio(NOISE_CHOICES, value="eps_guided", label="Noise prediction shown",
                          elem_id="explorer-noise-kind")
    step_info = gr.Markdown(elem_id="explorer-step-info")
    with gr.Row():
        x_t_image = gr.Image(label="x_t (what the UNet sees)", interactive=False, height=256, elem_id="explorer-frame")
        x0_image = gr.Image(label="x̂_0 (its guess of the clean image)", interactive=False, height=256,
                            elem_id="explorer-x0")
        noise_image = gr.Image(label="Noise prediction, |ε| per pixel", interactive=False, height=256,
                               elem_id="explorer-noise")
        final_image = gr.Image(label="Final image", interactive=False, height=256, elem_id="explorer-final")

    with gr.Accordion("Branch: change the settings from this step on", open=False):
        with gr.Row():
            branch_prompt = gr.Textbox(label="Prompt", elem_id="explorer-branch-prompt")
            branch_negative = gr.Textbox(label="Negative prompt", elem_id="explorer-branch-negative")
            branch_sampler = gr.Dropdown(list(SAMPLER_NAMES), value=DEFAULT_SAMPLER, label="Sampler",
                                         elem_id="explorer-branch-sampler")
            branch_cfg = gr.Slider(1.0, 20.0, value=7.5, step=0.5, label="CFG scale", elem_id="explorer-branch-cfg")
        with gr.Row():
            branch_button = gr.Button("Branch at this step", variant="primary", elem_id="explorer-branch")
            scrub_branch = gr.Button("Scrub the branch", elem_id="explorer-branch-scrub")
        with gr.Row():
            original_final = gr.Image(label="Original", interactive=False, elem_id="explorer-branch-original")
            branch_final = gr.Image(label="Branch", interactive=False, elem_id="explorer-branch-result")
            difference = gr.Image(label="Difference (×4)", interactive=False, elem_id="explorer-branch-difference")
        branch_status = gr.Markdown(elem_id="explorer-branch-status")

    with gr.Accordion("Compare samplers, step counts and CFG scales (same seed)", open=False):
        with gr.Row():
            compare_samplers = gr.Textbox(label="Samplers", placeholder="e.g. Euler, DDIM, DPM++ 2M",
                                          info="empty: the sampler above", elem_id="explorer-compare-samplers")
            compare_steps = gr.Textbox(label="Steps", placeholder="e.g. 5, 10, 20", info="empty: the steps above",
                                       elem_id="explorer-compare-steps")
            compare_cfgs = gr.Textbox(label="CFG scales", placeholder="e.g. 1, 4, 7.5", info="empty: the CFG above",
                                      elem_id="explorer-compare-cfgs")
        with gr.Row():
            reference_sampler = gr.Dropdown([reverse.DEFAULT_REFERENCE_SAMPLER, SAME_SAMPLER, *SAMPLER_NAMES],
                                            value=reverse.DEFAULT_REFERENCE_SAMPLER, label="Reference sampler")
            reference_steps = gr.Slider(1, MAX_STEPS, value=100, step=1, label="Reference steps")
            compare_button = gr.Button("Compare", variant="primary", elem_id="explorer-compare")
        compare_status = gr.Markdown(elem_id="explorer-compare-status")
        grid = gr.Image(label="Comparison", interactive=False, elem_id="explorer-compare-grid")
        table = gr.Dataframe(headers=list(reverse.COMPARE_COLUMNS), interactive=False,
                             elem_id="explorer-compare-table")

    with gr.Accordion("Export the recorded frames", open=False):
        with gr.Row():
            export_kind = gr.Radio(EXPORT_CHOICES, value="x_t", label="Frames", elem_id="explorer-export-kind")
            fps = gr.Slider(1, 30, value=8, step=1, label="Frames per second")
            export_gif = gr.Button("Export GIF", elem_id="explorer-export-gif")
            export_mp4 = gr.Button("Export MP4", elem_id="explorer-export-mp4")
        exported = gr.File(label="Animation", elem_id="explorer-export-file")

    with gr.Accordion("The formulas", open=True):
        _formulas(reverse.FORMULAS_REVERSE)

    trace_state = gr.State(None)
    branch_state = gr.State(None)
    playing = gr.State(False)
    timer = gr.Timer(PLAY_INTERVAL_S, active=False)

    def generation_request(prompt_value, negative_value, sampler_value, steps_value, cfg_value, seed_value,
                           size_value) -> GenerationRequest:
        return GenerationRequest(prompt=prompt_value or "", negative_prompt=negative_value or "",
                                 sampler=sampler_value, steps=int(steps_value), guidance_scale=float(cfg_value),
                                 width=int(size_value), height=int(size_value),
                                 seed=int(seed_value if seed_value is not None else -1)).resolved()

    # -- record ----------------------------------------------------------------------------
    @user_errors
    def record_reverse(prompt_value, negative_value, sampler_value, steps_value, cfg_value, seed_value, size_value,
                       kind, request: gr.Request = None):
        generation = generation_request(prompt_value, negative_value, sampler_value, steps_value, cfg_value,
                                        seed_value, size_value)
        stop_event = context.stop_event(_session(request))
        trace = None
        for event in reverse.stream(lambda on_step: reverse.record_trace(context.models, generation, stop=stop_event,
                                                                         on_step=on_step)):
            if isinstance(event, reverse.Progress):
                yield [gr.skip()] * 7 + [f"Recording step {event.done} of {event.total}…"] + [gr.skip()] * 4
            else:
                trace = event
        x_t, x0, noise, info = _step_views(trace, 0, kind)
        summary = "  \n".join([f"Recorded {trace.num_steps} steps · seed {generation.seed} · "
                               f"{generation.sampler}, CFG {generation.guidance_scale:g}", *trace.notes])
        yield (trace, gr.Slider(minimum=0, maximum=max(trace.num_steps - 1, 1), value=0, step=1), x_t, x0, noise,
               info, trace.final_image, summary, generation.prompt, generation.negative_prompt, generation.sampler,
               generation.guidance_scale)

    record.click(record_reverse, inputs=[prompt, negative, sampler, steps, cfg, seed, size, noise_kind],
                 outputs=[trace_state, step_slider, x_t_image, x0_image, noise_image, step_info, final_image, status,
                          branch_prompt, branch_negative, branch_sampler, branch_cfg],
                 api_name="explorer_record", **DEVICE)
    def stop_recording(request: gr.Request = None):
        context.stop(_session(request))

    stop.click(stop_recording, inputs=None, outputs=None, api_visibility="private")

    # -- scrub, play, step -----------------------------------------------------------------
    @user_errors
    @on_device_thread
    def render_step(trace, step, kind):
        if trace is None:
            return None, None, None, "Record a run to scrub through its steps."
        return _step_views(trace, step, kind)

    for trigger in (step_slider.change, noise_kind.change):
        trigger(render_step, inputs=[trace_state, step_slider, noise_kind],
                outputs=[x_t_image, x0_image, noise_image, step_info], api_visibility="private", **DEVICE)

    def moved(trace, step, delta):
        if trace is None:
            return gr.skip()
        return max(0, min(int(step) + delta, trace.num_steps - 1))

    previous.click(lambda trace, step: moved(trace, step, -1), inputs=[trace_state, step_slider],
                   outputs=step_slider, api_visibility="private")
    following.click(lambda trace, step: moved(trace, step, +1), inputs=[trace_state, step_slider],
                    outputs=step_slider, api_visibility="private")

    def start_playing(trace, step):
        if trace is None:
            raise gr.Error("Record a run first, then play it.")
        at_end = int(step) >= trace.num_steps - 1
        return gr.Timer(active=True), True, (0 if at_end else gr.skip())

    def stop_playing():
        return gr.Timer(active=False), False

    def tick(trace, step, is_playing):
        if not is_playing or trace is None:
            return gr.skip(), gr.Timer(active=False), False
        following_step = int(step) + 1
        if following_step >= trace.num_steps - 1:  # show the last step, then stop
            return min(following_step, trace.num_steps - 1), gr.Timer(active=False), False
        return following_step, gr.skip(), True

    play.click(start_playing, inputs=[trace_state, step_slider], outputs=[timer, playing, step_slider],
               api_visibility="private")
    pause.click(stop_playing, outputs=[timer, playing], api_visibility="private")
    timer.tick(tick, inputs=[trace_state, step_slider, playing], outputs=[step_slider, timer, playing],
               api_visibility="private")

    # -- branch ----------------------------------------------------------------------------
    @user_errors
    def branch_reverse(trace, step, prompt_value, negative_value, sampler_value, cfg_value,
                       request: gr.Request = None):
        if trace is None:
            raise ValueError("Record a run first, then branch it at a step.")
        step = int(step)
        changes = {"prompt": prompt_value or "", "negative_prompt": negative_value or "", "sampler": sampler_value,
                   "guidance_scale": float(cfg_value)}
        stop_event = context.stop_event(_session(request))
        result = None
        for event in reverse.stream(lambda on_step: reverse.branch(context.models, trace, step, changes,
                                                                   stop=stop_event, on_step=on_step)):
            if isinstance(event, reverse.Progress):
                yield gr.skip(), gr.skip(), gr.skip(), f"Branch: step {event.done} of {event.total}…", gr.skip()
            else:
                result = event
        changed = ", ".join(f"{key} {getattr(trace.request, key)!r} → {value!r}"
                            for key, value in result.changes.items()) or "nothing (a replay of the original)"
        distance = reverse.rms_distance(trace.final_image, result.final_image)
        summary = "  \n".join([f"Branched at step {step} ({trace.steps[step].describe()}); changed {changed}. "
                               f"RMS difference {distance:.2f} (0–255).", *result.notes])
        yield (trace.final_image, result.final_image, reverse.difference_map(trace.final_image, result.final_image),
               summary, result)

    branch_button.click(branch_reverse,
                        inputs=[trace_state, step_slider, branch_prompt, branch_negative, branch_sampler, branch_cfg],
                        outputs=[original_final, branch_final, difference, branch_status, branch_state],
                        api_visibility="private", **DEVICE)

    def scrub_the_branch(branched):
        if branched is None:
            raise gr.Error("Make a branch first.")
        return (branched, gr.Slider(minimum=0, maximum=max(branched.num_steps - 1, 1), value=branched.branched_at or 0,
                                    step=1), branched.final_image)

    scrub_branch.click(scrub_the_branch, inputs=branch_state, outputs=[trace_state, step_slider, final_image],
                       api_visibility="private")

    # -- compare ---------------------------------------------------------------------------
    @user_errors
    def compare_reverse(prompt_value, negative_value, sampler_value, steps_value, cfg_value, seed_value, size_value,
                        samplers_text, steps_text, cfgs_text, reference, reference_steps_value,
                        request: gr.Request = None):
        lists = reverse.parse_compare_lists(samplers_text, steps_text, cfgs_text)
        generation = generation_request(prompt_value, negative_value, sampler_value, steps_value, cfg_value,
                                        seed_value, size_value)
        stop_event = context.stop_event(_session(request))
        result = None
        work = lambda on_step: reverse.compare(  # noqa: E731
            context.models, generation, **lists, reference_steps=int(reference_steps_value),
            reference_sampler=None if reference == SAME_SAMPLER else reference, stop=stop_event, on_step=on_step)
        for event in reverse.stream(work):
            if isinstance(event, reverse.Progress):
                yield gr.skip(), gr.skip(), f"Image {event.done} of {event.total} done…"
            else:
                result = event
        image, rows = result
        reference_name = "each cell's own sampler" if reference == SAME_SAMPLER else reference
        yield (image, gr.Dataframe(value=[row.values() for row in rows], headers=list(reverse.COMPARE_COLUMNS)),
               f"Seed {generation.seed} · reference: {reference_name} at {int(reference_steps_value)} steps. "
               "NFE counts UNet calls; with CFG one call carries both passes (2 evaluations).")

    compare_button.click(compare_reverse,
                         inputs=[prompt, negative, sampler, steps, cfg, seed, size, compare_samplers, compare_steps,
                                 compare_cfgs, reference_sampler, reference_steps],
                         outputs=[grid, table, compare_status], api_visibility="private", **DEVICE)

    # -- export ----------------------------------------------------------------------------
    def export_trace(suffix: str):
        @user_errors
        @on_device_thread
        def export(trace, kind, frames_per_second):
            if trace is None:
                raise ValueError("Record a run first, then export its frames.")
            path = _export_path(f"reverse-{kind}-seed{trace.request.seed}{suffix}")
            return str(reverse.export_trace(trace, kind, path, fps=int(frames_per_second)))
        return export

    for button, suffix in ((export_gif, ".gif"), (export_mp4, ".mp4")):
        button.click(export_trace(suffix), inputs=[trace_state, export_kind, fps], outputs=exported,
                     api_visibility="private", **DEVICE)
