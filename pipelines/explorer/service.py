"""The Diffusion Explorer as one service: every operation its tab offers, on the loaded model.

The tab (studio/tabs/explorer.py) builds the arguments, calls one method and renders what comes
back; all tensor math lives in forward.py (noising), reverse.py and trace.py (denoising, recorded),
comparison.py (samplers side by side), guidance.py (guidance methods side by side) and speculative_view.py,
and everything that touches tensors runs on the models' device worker (pipelines/jobs/worker.py), which
`Explorer` picks itself:

    forward_view, markov_check, export_forward    short work: run on the worker, return the answer
    step_views, export_trace                      decode frames of a recorded trace the same way
    sampling_schedules                            numbers and a figure from the model's config: no worker
    record, branch, compare, guidance             long work: a `Job` on the worker, which reports
                                                  progress through `job.report` and stops early
                                                  (the trace then `stopped`) when `job.cancel()`ed
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from PIL import Image

# forward_sample, record_trace and branch are looked up on their modules at each call (tests spy on them there);
# compare and export_trace are too, as `Explorer` has methods of those names
from pipelines.core.checks import MAX_STEPS
from pipelines.core.samplers import check_sampler, edm_default
from pipelines.core.schedules import check_schedule, schedule_table
from pipelines.explorer import animation, comparison, forward, guidance, reverse
from pipelines.explorer.animation import export_animation
from pipelines.explorer.formulas import forward_caption
from pipelines.explorer.forward import (FixedNoise, NoiseSchedule, animation_timesteps, empirical_moments,
                                        forward_frames, image_to_tensor, make_schedule, tensor_to_image)
from pipelines.explorer.guidance_view import guidance_view
from pipelines.explorer.plots import schedule_plot, value_histogram
from pipelines.explorer.sampling_schedules import check_quantity, sampling_schedule_caption, sampling_schedule_plot
from pipelines.explorer.speculative_view import speculative_view
from pipelines.explorer.trace import NOISE_KINDS, Trace
from pipelines.jobs.worker import DeviceWorker, Job
from pipelines.models.manager import ModelManager
from pipelines.tasks.txt2img import Txt2ImgRequest

FORWARD_SIDE_PX = 128        # the pixel-space image is resized so that its shorter side is this
MOMENT_SIDE_PX = 32          # the Markov-chain check runs on a small copy ...
MOMENT_DRAWS = 32            # ... with this many independent draws per method
ANIMATION_FRAMES = 40        # frames of the exported x_0 -> x_T animation
ANIMATION_FPS = 10
NO_IMAGE = "Upload an image (or pick an example) first."


@dataclass
class BesideView:
    """x_t by the other forward process (DDPM beside flow matching, or the reverse), same t and ε, in pixel space."""
    schedule_name: str
    process: str                        # "DDPM" or "flow matching"
    x_t: Image.Image
    caption: str


@dataclass
class ForwardView:
    """Your image noised to x_t at one t of the first schedule, and what explains it."""
    x_t: Image.Image                    # in pixel space
    latent_x_t: Image.Image | None      # in the loaded model's latent space, decoded by its VAE; None without a model
    schedule_figure: Figure             # beta_t, abar_t and log-SNR of every schedule, t marked
    histogram: Figure                   # the values of x_t against the theoretical marginal
    caption: str                        # names the process(es) shown, with their coefficients at t
    process: str                        # the first schedule's: "DDPM" or "flow matching"
    beside: BesideView | None = None    # when both processes are ticked: the first schedule of the other one


@dataclass
class Moments:
    """Per-pixel statistics of x_t over many independent draws by one method."""
    mean_image: Image.Image
    mean_error: float                   # mean |mean - signal_t x_0|; theory: 0
    variance: float                     # mean per-pixel variance; theory: noise_t^2


@dataclass
class MarkovCheck:
    """The Markov chain and the closed form, each drawn `draws` times from a `side_px` copy."""
    t: int
    draws: int
    side_px: int
    process: str                        # "DDPM" or "flow matching"
    alpha_cumprod: float                # abar_t (for flow matching: of the DDPM process with its SNR)
    signal: float                       # x_0's coefficient: sqrt(abar_t) for DDPM, 1 - t for flow matching
    noise: float                        # ε's coefficient: sqrt(1 - abar_t) for DDPM, t for flow matching
    closed_form: Moments
    markov_chain: Moments

    @property
    def theory_variance(self) -> float:
        return self.noise ** 2


@dataclass
class SamplingScheduleView:
    """One sampler's noise level at each model call under each schedule it runs."""
    figure: Figure
    caption: str
    table: dict[str, dict]              # schedule -> timesteps, sigmas, alphas_cumprod per model call


@dataclass
class StepViews:
    """One recorded step, as images and a line naming it."""
    x_t: Image.Image
    x0_pred: Image.Image
    noise: Image.Image | None           # the chosen noise prediction; None where that step has none (ε_u at CFG 1)
    info: str


def export_path(name: str) -> Path:
    """A fresh file in the system temp folder, which Gradio serves from."""
    return Path(tempfile.mkdtemp(prefix="explorer-")) / name


def _whole(name: str, value: Any) -> int:
    """A whole number from a UI control (sliders send floats like 250.0)."""
    try:
        number = float(value)
        if number != int(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"`{name}` has to be a whole number but is {value!r}.") from None
    return int(number)


class Explorer:
    """Forward and reverse diffusion on `models`' loaded model, with model work on `models.worker`."""

    def __init__(self, models: ModelManager):
        self.models = models

    @property
    def worker(self) -> DeviceWorker:
        return self.models.worker

    # -- forward ---------------------------------------------------------------------------------
    def forward_view(self, image: Image.Image, *, schedule_names: list[str], num_steps: int, t: int,
                     seed: int) -> ForwardView:
        """x_t of `image` at `t` (clamped to T − 1) of the first schedule, noised with the seeded ε."""
        return self.worker.call(self._forward_view, image, schedule_names, num_steps, t, seed)

    def markov_check(self, image: Image.Image, *, schedule_names: list[str], num_steps: int, t: int,
                     seed: int) -> MarkovCheck:
        """Moments of x_t by the Markov chain and by the closed form, which theory says agree."""
        return self.worker.call(self._markov_check, image, schedule_names, num_steps, t, seed)

    def export_forward(self, image: Image.Image, *, schedule_names: list[str], num_steps: int, seed: int,
                       suffix: str) -> Path:
        """A GIF or MP4 (by `suffix`) of `image` noised from x_0 to x_T with the first schedule."""
        return self.worker.call(self._export_forward, image, schedule_names, num_steps, seed, suffix)

    def schedules(self, schedule_names: list[str], num_steps: int) -> list[NoiseSchedule]:
        """The ticked schedules with T steps; "model" is the loaded model's own: its betas, or for a flow-matching
        model flow matching with its shift."""
        if not schedule_names:
            raise ValueError("Tick at least one schedule.")
        config = None
        if "model" in schedule_names:
            if self.models.current is None:
                raise ValueError('Schedule "model" needs a loaded model; load one in Models & memory or untick it.')
            config = self.models.current.scheduler_config
        return [make_schedule(name, num_steps, scheduler_config=config if name == "model" else None)
                for name in schedule_names]

    def _forward_view(self, image, schedule_names, num_steps, t, seed) -> ForwardView:
        # 1. Check inputs
        if image is None:
            raise ValueError(NO_IMAGE)
        num_steps, seed = _whole("T", num_steps), _whole("seed", seed)
        schedules = self.schedules(schedule_names, num_steps)
        active, t = schedules[0], min(_whole("t", t), num_steps - 1)

        # 2. Pixel space: x_t = signal_t x_0 + noise_t eps (DDPM: sqrt(abar_t), sqrt(1 - abar_t); flow matching:
        #    1 - t, t), eps fixed by the seed
        x0 = image_to_tensor(image, size=FORWARD_SIDE_PX)
        epsilon = FixedNoise(seed).like(x0)
        x_t = forward.forward_sample(x0, t=t, schedule=active, noise=epsilon)

        # 3. Latent space: the same process on the VAE's latents, decoded back for display
        model = self.models.current
        latent_x_t = None
        if model is not None:
            side = model.native_side or FORWARD_SIDE_PX
            latent_x_t = forward_frames(image_to_tensor(image, size=side), schedule=active, timesteps=[t], seed=seed,
                                        vae=model.pipeline.vae)[0]

        # 4. The other process beside it, when a schedule of each is ticked: the same t and eps
        other = next((schedule for schedule in schedules if schedule.process != active.process), None)
        beside = None
        if other is not None:
            beside = BesideView(schedule_name=other.name, process=other.process, caption=forward_caption(other, t),
                                x_t=tensor_to_image(forward.forward_sample(x0, t=t, schedule=other, noise=epsilon)))

        # 5. What explains it
        caption = forward_caption(active, t)
        if beside is not None:
            caption += f"  \nBeside it (pixel space, the same ε): {beside.caption}"
        if latent_x_t is None:
            caption += "  \nLoad a model to see the same t in its latent space."
        return ForwardView(x_t=tensor_to_image(x_t), latent_x_t=latent_x_t,
                           schedule_figure=schedule_plot(schedules, t=t),
                           histogram=value_histogram(x_t, t=t, schedule=active, x0=x0), caption=caption,
                           process=active.process, beside=beside)

    def _markov_check(self, image, schedule_names, num_steps, t, seed) -> MarkovCheck:
        if image is None:
            raise ValueError(NO_IMAGE)
        num_steps, seed = _whole("T", num_steps), _whole("seed", seed)
        active = self.schedules(schedule_names, num_steps)[0]
        t = min(_whole("t", t), num_steps - 1)
        x0 = image_to_tensor(image, size=MOMENT_SIDE_PX)[0]
        signal, noise = active.signal[t].item(), active.noise[t].item()
        results = {}
        for method in ("closed_form", "markov_chain"):
            mean, variance = empirical_moments(x0, t=t, schedule=active, n_draws=MOMENT_DRAWS, seed=seed,
                                               method=method)
            mean_error = (mean - signal * x0).abs().mean().item()
            results[method] = Moments(tensor_to_image(mean), mean_error, variance.mean().item())
        return MarkovCheck(t=t, draws=MOMENT_DRAWS, side_px=MOMENT_SIDE_PX,
                           alpha_cumprod=active.alphas_cumprod[t].item(), closed_form=results["closed_form"],
                           markov_chain=results["markov_chain"], process=active.process, signal=signal, noise=noise)

    def _export_forward(self, image, schedule_names, num_steps, seed, suffix) -> Path:
        if image is None:
            raise ValueError(NO_IMAGE)
        active = self.schedules(schedule_names, _whole("T", num_steps))[0]
        timesteps = animation_timesteps(active, num_frames=min(ANIMATION_FRAMES, active.num_steps))
        frames = forward_frames(image_to_tensor(image, size=FORWARD_SIDE_PX), schedule=active,
                                timesteps=timesteps, seed=_whole("seed", seed), include_clean=True)
        name = schedule_names[0].replace(" ", "-")      # "flow matching" -> forward-flow-matching.gif
        return export_animation(frames, export_path(f"forward-{name}{suffix}"), fps=ANIMATION_FPS)

    # -- sampling schedules ----------------------------------------------------------------------
    def sampling_schedules(self, *, sampler: str, steps: int, schedules: list[str], quantity: str) -> \
            SamplingScheduleView:
        """`sampler`'s steps under each of `schedules` on the loaded model, as σ_t or ᾱ_t (`quantity`: "sigmas" or
        "alphas_cumprod"). A schedule the sampler or the model's family cannot run is left out and the caption says
        why; none left: ValueError."""
        # 1. Check inputs
        steps = _whole("steps", steps)
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"`steps` has to be between 1 and {MAX_STEPS} but is {steps}.")
        check_sampler(sampler)
        check_quantity(quantity)
        if not schedules:
            raise ValueError("Tick at least one schedule.")
        for schedule in schedules:
            check_schedule(schedule)
        model = self.models.current
        if model is None:
            raise ValueError("The sampling schedules are the loaded model's: load one in Models & memory first.")
        unet_config = getattr(getattr(model.pipeline, "unet", None), "config", None)
        sampler, default_note = edm_default(sampler, model.scheduler_config)   # an EDM model runs its own
        # 2. Each schedule's numbers, or why it is left out
        table, left_out = {}, {}
        for schedule in schedules:
            try:
                table |= schedule_table(model.scheduler_config, sampler, [schedule], steps, unet_config=unet_config,
                                        flux_sigmas=type(model.pipeline).__name__.startswith("Flux"),
                                        flux2=type(model.pipeline).__name__.startswith("Flux2"))
            except ValueError as error:
                left_out[schedule] = str(error)
        if not table:
            raise ValueError(" ".join(left_out.values()))
        # 3. Drawn and told
        caption = sampling_schedule_caption(table, quantity=quantity, sampler=sampler, steps=steps,
                                            unet_config=unet_config,
                                            prediction_type=model.scheduler_config.get("prediction_type"),
                                            left_out=left_out)
        return SamplingScheduleView(figure=sampling_schedule_plot(table, quantity=quantity, sampler=sampler,
                                                                  steps=steps),
                                    caption=" ".join(default_note + [caption]), table=table)

    # -- reverse ---------------------------------------------------------------------------------
    def record(self, request: Txt2ImgRequest, *, owner: str | None = None) -> Job:
        """A job recording `request` step by step; its result is the `Trace`."""
        request = request.resolved()
        return self.worker.submit(
            lambda job: reverse.record_trace(self.models, request, stop=job.stop, on_step=job.report),
            kind="explorer-record", owner=owner)

    def speculative(self, request: Txt2ImgRequest, *, owner: str | None = None) -> Job:
        """A job generating `request` with the DDPM speculative sampler, round by round; its result is the
        `SpeculativeView` (speculative_view.py)."""
        request = request.resolved()
        return self.worker.submit(
            lambda job: speculative_view(self.models, request, stop=job.stop, on_round=job.report),
            kind="explorer-speculative", owner=owner)

    def branch(self, trace: Trace | None, step: int, changes: dict, *, owner: str | None = None) -> Job:
        """A job continuing `trace` from `step` with `changes` (keys in BRANCH_FIELDS); its result is the
        branched `Trace`."""
        if trace is None:
            raise ValueError("Record a run first, then branch it at a step.")
        step = _whole("step", step)
        return self.worker.submit(
            lambda job: reverse.branch(self.models, trace, step, changes, stop=job.stop, on_step=job.report),
            kind="explorer-branch", owner=owner)

    def compare(self, request: Txt2ImgRequest, *, samplers: list[str] | None = None,
                steps: list[int] | None = None, cfgs: list[float] | None = None,
                reference_sampler: str | None = comparison.DEFAULT_REFERENCE_SAMPLER, reference_steps: int = 100,
                owner: str | None = None) -> Job:
        """A job running `request`'s seed over samplers × steps × CFG scales (None: the request's value);
        its result is (grid image, CompareRows). `reference_sampler` None: each cell's own sampler."""
        request, reference_steps = request.resolved(), _whole("reference steps", reference_steps)
        return self.worker.submit(
            lambda job: comparison.compare(self.models, request, samplers=samplers, steps=steps, cfgs=cfgs,
                                           reference_steps=reference_steps, reference_sampler=reference_sampler,
                                           stop=job.stop, on_step=job.report),
            kind="explorer-compare", owner=owner)

    def guidance(self, *, owner: str | None = None, **settings) -> Job:
        """A job running one seed under each guidance method (`settings`: guidance.compare_guidance's); its result
        is the `GuidanceView` (guidance_view.py)."""
        return self.worker.submit(
            lambda job: guidance_view(guidance.compare_guidance(self.models, **settings, stop=job.stop,
                                                                on_step=job.report)),
            kind="explorer-guidance", owner=owner)

    def step_views(self, trace: Trace, step: int, noise_kind: str) -> StepViews:
        """x_t, x̂_0 and the `noise_kind` map of `step` (clamped to the trace), decoded on the worker."""
        return self.worker.call(self._step_views, trace, step, noise_kind)

    def export_trace(self, trace: Trace | None, kind: str, *, fps: int, suffix: str) -> Path:
        """A GIF or MP4 (by `suffix`) of every frame of `kind` the trace recorded."""
        if trace is None:
            raise ValueError("Record a run first, then export its frames.")
        path = export_path(f"reverse-{kind}-seed{trace.request.seed}{suffix}")
        return self.worker.call(animation.export_trace, trace, kind, path, fps=_whole("fps", fps))

    @staticmethod
    def _step_views(trace: Trace, step, noise_kind: str) -> StepViews:
        if noise_kind not in NOISE_KINDS:
            raise ValueError(f"Unknown noise prediction {noise_kind!r}; valid ones are "
                             f"{', '.join(NOISE_KINDS)}.")
        step = max(0, min(_whole("step", step), trace.num_steps - 1))
        record = trace.steps[step]
        has_noise = getattr(record, noise_kind) is not None
        info = f"**Step {step} of {trace.num_steps - 1}** · {record.describe()}"
        if not has_noise:
            info += ("  \nCFG is off at this step (scale ≤ 1): the model made no unconditional pass, "
                     "so there is no ε_u.")
        return StepViews(x_t=trace.frame(step, "x_t"), x0_pred=trace.frame(step, "x0_pred"),
                         noise=trace.frame(step, noise_kind) if has_noise else None, info=info)
