"""The reverse (denoising) process, recorded step by step, for the Diffusion Explorer tab.

`record_trace` runs the loaded text-to-image pipeline exactly as `Generator` does (the same sampler
from the model's scheduler config, the same CPU-seeded noise, the same prompt handling, the same
decode) and listens in at every step with two of diffusers' own hooks:

    a forward hook on the UNet   what the model was shown (x_t, scaled by the sampler) and what it
                                 predicted: eps_u and eps_c from one batched call when CFG is on,
                                 eps_c alone when it is off
    callback_on_step_end         the guided eps the sampler used (`noise_pred`, which we expose by
                                 extending the pipeline's `_callback_tensor_inputs` for the call) and
                                 the latents the step produced, i.e. x_t of the next step

Each `TraceStep` keeps x_t, the timestep, the noise level, eps_u / eps_c / eps_guided and the model's
current guess of the clean latent x0_pred. Images are decoded lazily (`Trace.frame`), so recording
costs little more than generating.

Samplers keep x_t in one of two parametrisations; both are handled, and frames show the first:

    variance preserving (DDIM, DDPM, PNDM, DPM++ 2M, UniPC, LCM):  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    sigma, "k-diffusion" (Euler, Euler a, Heun, LMS, DPM++ SDE):   x   = x_0 + sigma eps

For the second kind `scheduler.scale_model_input` shows the UNet x / sqrt(sigma^2 + 1), which is the
first form with abar = 1 / (sigma^2 + 1). We tell the two apart by whether the UNet's input differs
from x_t, and read sigma off that scale, so no per-scheduler table is needed. For the first kind,
abar_t is the model's `alphas_cumprod` at the timestep the UNet was told (DPM++ Karras steps at
sigmas between training timesteps and tells the UNet the rounded t, so there x0_pred is the one
that rounded t implies).

`branch` continues a trace from step k with another CFG scale, prompt or sampler; `compare` runs one
seed over several samplers / step counts / CFG scales against a many-step reference.
"""

from __future__ import annotations

import math
import re
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageDraw, ImageFont

from pipelines.core.call import PreparedCall, prepare
from pipelines.core.checks import MAX_STEPS
from pipelines.core.denoiser import Denoiser, prompt_embeddings, uses_cfg
from pipelines.core.images import to_pil
from pipelines.core.samplers import STEPWISE_SAMPLER_NAMES, STOCHASTIC
from pipelines.core.vae import decode
from pipelines.explorer.forward import export_animation
from pipelines.models.manager import ModelManager
from pipelines.tasks.txt2img import Txt2ImgRequest

# A trace is recorded for one text-to-image request; batch_size and batch_count must be 1.
TraceRequest = Txt2ImgRequest

FRAME_KINDS: tuple[str, ...] = ("x_t", "x0_pred", "eps_uncond", "eps_cond", "eps_guided")
NOISE_KINDS: tuple[str, ...] = ("eps_uncond", "eps_cond", "eps_guided")
FRAME_LABELS: dict[str, str] = {
    "x_t": "x_t, what the UNet is shown",
    "x0_pred": "x̂_0, the clean image it predicts",
    "eps_uncond": "ε_u, noise predicted for the negative prompt",
    "eps_cond": "ε_c, noise predicted for the prompt",
    "eps_guided": "ε̂, the guided noise the sampler uses",
}
# What a branch may change. Size, seed and step count stay: the branch continues the same latents.
BRANCH_FIELDS: tuple[str, ...] = ("prompt", "negative_prompt", "sampler", "guidance_scale", "guidance_rescale")
# Samplers that cannot take over mid-schedule: PNDM's PLMS warm-up assumes the start of the schedule.
NOT_RESTARTABLE = frozenset({"PNDM"})
MAX_COMPARE_CELLS = 24
DEFAULT_REFERENCE_SAMPLER = "DDIM"
NOISE_COLORMAP = "magma"
DIFFERENCE_COLORMAP = "inferno"
MIN_GRID_CELL_PX = 128          # small images are upscaled (nearest) to at least this in the comparison grid

# For gr.Markdown(latex_delimiters=...): display math between $$, inline math between $.
LATEX_DELIMITERS: list[dict] = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
]

FORMULAS_REVERSE: dict[str, str] = {
    "ddpm_update": (
        "DDPM takes one small step back: it removes the share of noise the model predicts for this step "
        "and then adds a little fresh noise, "
        r"$$x_{t-1} = \frac{1}{\sqrt{\alpha_t}}"
        r"\left(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\,\hat\varepsilon\right)"
        r" + \sigma_t z, \qquad z \sim \mathcal{N}(0, I).$$"
    ),
    "ddim_update": (
        "DDIM jumps deterministically: it rebuilds the next, less noisy image from the predicted clean image "
        "and the predicted noise, mixed at the next noise level, "
        r"$$x_{t-1} = \sqrt{\bar\alpha_{t-1}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t-1}}\,\hat\varepsilon.$$"
    ),
    "x0_from_eps": (
        "Undoing the forward process with the predicted noise gives the model's current guess of the clean "
        "image, "
        r"$$\hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon}{\sqrt{\bar\alpha_t}}"
        r"\qquad\left(\text{sigma samplers: } \hat x_0 = x - \sigma\,\hat\varepsilon\right).$$"
    ),
    "cfg": (
        "Classifier-free guidance asks the model twice, with and without the prompt, and pushes the "
        "prediction further in the direction the prompt pulls it, "
        r"$$\hat\varepsilon = \varepsilon_u + w\,(\varepsilon_c - \varepsilon_u),$$"
        r"so $w = 1$ is the plain conditional prediction and needs no second pass."
    ),
}


# ----------------------------------------------------------------------------- the trace


@dataclass(eq=False)
class TraceStep:
    """One loop iteration (one UNet evaluation) of the reverse process.

    Tensors are CPU copies of shape (1, C, h, w), in the dtype the pipeline ran in.
    """

    timestep: float                 # the t the UNet was told
    latents: torch.Tensor           # x_t: the sampler's state before this step, in its own parametrisation
    input_scale: float              # what scale_model_input multiplied x_t by: 1, or 1/sqrt(sigma^2 + 1)
    alpha_cumprod: float            # abar of the noise level the UNet was shown
    x0_pred: torch.Tensor           # x̂_0: the clean latent the guided prediction implies
    eps_cond: torch.Tensor          # the model's prediction for the prompt
    eps_uncond: torch.Tensor | None  # ... for the negative prompt; None when CFG is off at this step
    eps_guided: torch.Tensor        # the prediction handed to the sampler (eps_cond when CFG is off)

    @property
    def sigma_parametrised(self) -> bool:
        return self.input_scale != 1.0

    @property
    def noise_level(self) -> float:
        """sigma for sigma samplers, sqrt(1 - abar_t) for variance-preserving ones."""
        if self.sigma_parametrised:
            return math.sqrt((1.0 - self.alpha_cumprod) / self.alpha_cumprod)
        return math.sqrt(1.0 - self.alpha_cumprod)

    @property
    def noise_level_name(self) -> str:
        return "σ" if self.sigma_parametrised else "√(1−ᾱ_t)"

    @property
    def model_input(self) -> torch.Tensor:
        """x_t in the variance-preserving frame, as the UNet saw it."""
        return self.latents if not self.sigma_parametrised else self.latents * self.input_scale

    def describe(self) -> str:
        return (f"t = {self.timestep:.1f} · {self.noise_level_name} = {self.noise_level:.4g} · "
                f"ᾱ = {self.alpha_cumprod:.4g}")


@dataclass(eq=False)
class Trace:
    """A recorded reverse process: one `TraceStep` per loop iteration, the final latents and image.

    Second-order samplers evaluate the UNet twice per step (Heun, DPM++ SDE: 2 × steps − 1 records)
    and PNDM once more at its start, so `len(trace.steps)` can exceed `request.steps`.
    """

    request: Txt2ImgRequest      # resolved: the seed is concrete
    steps: list[TraceStep]
    final_latents: torch.Tensor     # CPU copy
    final_image: Image.Image        # bit-identical to Generator's image for the same request
    prediction_type: str
    vae: Any = field(default=None, repr=False)   # weakref.ref to the VAE: a trace must not keep a model alive
    stopped: bool = False
    notes: list[str] = field(default_factory=list)
    branched_at: int | None = None  # for a branch: the step at which its settings changed
    changes: dict = field(default_factory=dict)
    # Which settings ran from which step on: [(0, first request), (k, request from step k on), ...].
    # `replayable` is False once another sampler took over, which diffusers' loop cannot replay.
    settings: list[tuple[int, Txt2ImgRequest]] = field(default_factory=list)
    replayable: bool = True
    _decoded: dict = field(default_factory=dict, repr=False)
    _noise_scale: float | None = field(default=None, repr=False)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def noise_scale(self) -> float:
        """The channel-norm that maps to the top of the colour scale, fixed for the whole trace."""
        if self._noise_scale is None:
            largest = max((float(p[0].float().norm(dim=0).max())
                           for s in self.steps for p in (s.eps_uncond, s.eps_cond, s.eps_guided) if p is not None),
                          default=1.0)
            self._noise_scale = largest if largest > 0 else 1.0
        return self._noise_scale

    def frame(self, step: int, kind: str) -> Image.Image:
        """Step `step`'s x_t or x̂_0 decoded by the VAE (cached), or a noise prediction as a magnitude map.

        Noise maps show the norm over latent channels per latent pixel, upsampled (nearest) to the
        image size and colour-mapped on `noise_scale`, so frames of one trace are comparable.
        """
        record = self._step(step)
        if kind not in FRAME_KINDS:
            raise ValueError(f"Unknown frame kind {kind!r}; valid kinds are {', '.join(FRAME_KINDS)}.")
        if kind in ("x_t", "x0_pred"):
            key = (step, kind)
            if key not in self._decoded:
                self._decoded[key] = self._decode(record.model_input if kind == "x_t" else record.x0_pred)
            return self._decoded[key]
        prediction = getattr(record, kind)
        if prediction is None:
            raise ValueError(f"Step {step} has no unconditional prediction: CFG was off (scale ≤ 1), so the "
                             "pipeline made no second pass. Record with CFG above 1 to see ε_u.")
        magnitude = (prediction[0].float().norm(dim=0) / self.noise_scale).clamp(0, 1).numpy()
        image = colour_map(magnitude, NOISE_COLORMAP)
        return image.resize((self.request.width, self.request.height), Image.Resampling.NEAREST)

    def frames(self, kind: str) -> list[Image.Image]:
        """Every step's frame of `kind`; the x_t sequence ends with the final image."""
        frames = [self.frame(step, kind) for step in range(self.num_steps)]
        return frames + [self.final_image] if kind == "x_t" else frames

    def _step(self, step: int) -> TraceStep:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < self.num_steps:
            raise ValueError(f"`step` has to be a whole number from 0 to {self.num_steps - 1} but is {step!r}.")
        return self.steps[step]

    def _decode(self, latents: torch.Tensor) -> Image.Image:
        vae = self.vae() if self.vae is not None else None
        if vae is None:
            raise ValueError("The model this trace was recorded with has been unloaded, so its frames can no "
                             "longer be decoded. Record again.")
        images, _ = decode(vae, latents)
        return to_pil(images)[0]


def predicted_x0(model_input: torch.Tensor, prediction: torch.Tensor, *, alpha_cumprod: float,
                 prediction_type: str) -> torch.Tensor:
    """x̂_0 from what the UNet saw (x_t in the variance-preserving frame) and what it predicted.

    epsilon:       x̂_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    v_prediction:  x̂_0 = sqrt(abar) x_t - sqrt(1 - abar) v          (Salimans & Ho 2022)
    sample:        the prediction is x̂_0
    For sigma samplers (abar = 1/(sigma^2 + 1), x_t = x / sqrt(sigma^2 + 1)) the epsilon case is x - sigma eps.
    """
    model_input, prediction = model_input.float(), prediction.float()
    signal, noise = math.sqrt(alpha_cumprod), math.sqrt(max(0.0, 1.0 - alpha_cumprod))
    if prediction_type == "epsilon":
        if signal == 0.0:  # zero-terminal-SNR schedules: at abar = 0 an eps-prediction says nothing about x_0
            return torch.zeros_like(model_input)
        return (model_input - noise * prediction) / signal
    if prediction_type == "v_prediction":
        return signal * model_input - noise * prediction
    if prediction_type == "sample":
        return prediction
    raise ValueError(f"Unknown `prediction_type` {prediction_type!r}; expected epsilon, v_prediction or sample.")


def colour_map(values: np.ndarray, name: str) -> Image.Image:
    """A 2-D array in [0, 1] as an RGB image through a matplotlib colormap."""
    rgba = matplotlib.colormaps[name](np.clip(values, 0.0, 1.0))
    return Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8), mode="RGB")


def difference_map(image_a: Image.Image, image_b: Image.Image, *, gain: float = 4.0) -> Image.Image:
    """|a - b| per pixel (mean over RGB), amplified `gain` times and colour-mapped (black: identical)."""
    if image_a.size != image_b.size:
        raise ValueError(f"The images have to have the same size but are {image_a.size} and {image_b.size}.")
    if gain <= 0:
        raise ValueError(f"`gain` has to be positive but is {gain}.")
    a = np.asarray(image_a.convert("RGB"), dtype=np.float32)
    b = np.asarray(image_b.convert("RGB"), dtype=np.float32)
    return colour_map(np.abs(a - b).mean(axis=2) * gain / 255.0, DIFFERENCE_COLORMAP)


def rms_distance(image_a: Image.Image, image_b: Image.Image) -> float:
    """Root-mean-square difference in pixel values 0..255."""
    if image_a.size != image_b.size:
        raise ValueError(f"The images have to have the same size but are {image_a.size} and {image_b.size}.")
    a = np.asarray(image_a.convert("RGB"), dtype=np.float64)
    b = np.asarray(image_b.convert("RGB"), dtype=np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)))


# ----------------------------------------------------------------------------- recording


def record_trace(models: ModelManager, request: Txt2ImgRequest, *, stop: threading.Event | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> Trace:
    """Generate `request` as Generator does, recording every step. `on_step(done, total)` reports progress;
    a set `stop` ends the run at the next step (the trace is then partial and `stopped`)."""
    run = _prepare(models, request)
    return _record(run, stop=stop, on_step=on_step)


def _prepare(models: ModelManager, request: Txt2ImgRequest) -> PreparedCall:
    """Generator's preparation (pipelines/denoise.py), for the one image a trace records."""
    if not isinstance(request, Txt2ImgRequest):
        raise ValueError(f"The explorer records text-to-image runs (a Txt2ImgRequest) but received "
                         f"{type(request).__name__}.")
    if request.speculative:
        raise ValueError("The step-by-step trace records one model call per step, and DDPM speculative verifies "
                         "several steps per call: follow it round by round in the \"Speculative sampling\" panel "
                         "below, or record with DDPM (the same law, one call per step).")
    if request.batch_size != 1 or request.batch_count != 1:
        raise ValueError(f"The explorer records one image at a time, but batch_size is {request.batch_size} "
                         f"and batch_count is {request.batch_count}; set both to 1.")
    return prepare(models, request)


def _initial_noise(run: PreparedCall) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The pipeline's own initial noise (prepare_latents' randn_tensor call) from Generator's CPU generator.

    We draw it here and pass it as `latents=` so the recorder knows x_T; the generator, advanced by the
    same draw, goes on to the pipeline for stochastic samplers, exactly as in Generator.
    """
    pipeline, request = run.pipeline, run.request
    generators = run.generators(0)
    shape = (1, pipeline.unet.config.in_channels, request.height // pipeline.vae_scale_factor,
             request.width // pipeline.vae_scale_factor)
    # encode_prompt casts the embeddings to this dtype, and prepare_latents draws in the embeddings' dtype
    dtype = pipeline.text_encoder.dtype if pipeline.text_encoder is not None else pipeline.unet.dtype
    return randn_tensor(shape, generator=generators, device=run.device, dtype=dtype), generators


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


class _Recorder:
    """Listens to one denoising run and builds a TraceStep per loop iteration.

    The UNet hook fires inside an iteration, the step-end callback at its end; the latents that
    callback receives are x_t of the next iteration.
    """

    def __init__(self, *, first_latents: Callable[[], torch.Tensor], alphas_cumprod: torch.Tensor,
                 prediction_type: str, stop: threading.Event | None, on_step, total: int | None = None,
                 offset: int = 0):
        self.steps: list[TraceStep] = []
        self.stopped = False
        self.unet_calls = 0
        self.evaluations = 0          # UNet calls times their batch: a batched CFG call is 2 evaluations
        self._first_latents = first_latents
        self._alphas_cumprod = alphas_cumprod.detach().cpu().double()
        self._prediction_type = prediction_type
        self._stop, self._on_step, self._total, self._offset = stop, on_step, total, offset
        self._latents: torch.Tensor | None = None
        self._seen: tuple | None = None

    @contextmanager
    def listening(self, unet):
        handle = unet.register_forward_hook(self._unet_hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def _unet_hook(self, module, args, kwargs, output):
        if self._latents is None:
            self._latents = _cpu(self._first_latents())
        model_input = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        prediction = output[0] if isinstance(output, tuple) else output.sample
        # With CFG the batch is [uncond, cond] of the same x_t: keep the first copy of the input
        self._seen = (_cpu(model_input[:1]), float(timestep), _cpu(prediction))
        self.unet_calls += 1
        self.evaluations += prediction.shape[0]

    def step_end(self, pipe, index: int, timestep, tensors: dict) -> dict:
        model_input, unet_timestep, prediction = self._seen
        self.steps.append(self._make_step(model_input, unet_timestep, prediction, _cpu(tensors["noise_pred"])))
        self._latents = _cpu(tensors["latents"])
        if self._on_step is not None:
            self._on_step(self._offset + len(self.steps), self._total or self._offset + pipe.num_timesteps)
        if self._stop is not None and self._stop.is_set():
            self.stopped = True
            pipe._interrupt = True
        return {}

    def _make_step(self, model_input, timestep: float, prediction, guided) -> TraceStep:
        x_t = self._latents
        if torch.equal(model_input, x_t):
            # variance preserving: the UNet sees x_t itself, at the abar of its timestep
            input_scale = 1.0
            alpha_cumprod = float(self._alphas_cumprod[round(timestep)])
        else:
            # sigma samplers: the UNet sees x / sqrt(sigma^2 + 1); that scale is sqrt(abar)
            x64 = x_t.double()
            input_scale = float((model_input.double() * x64).sum() / x64.square().sum())
            alpha_cumprod = input_scale ** 2
        uncond, cond = prediction.chunk(2) if prediction.shape[0] == 2 else (None, prediction)
        x0 = predicted_x0(x_t.float() * input_scale, guided, alpha_cumprod=alpha_cumprod,
                          prediction_type=self._prediction_type)
        return TraceStep(timestep=timestep, latents=x_t, input_scale=input_scale, alpha_cumprod=alpha_cumprod,
                         x0_pred=x0, eps_cond=cond, eps_uncond=uncond, eps_guided=guided)


def _recorder_for(run: PreparedCall, *, first_latents, stop, on_step, total=None, offset=0) -> _Recorder:
    scheduler = run.pipeline.scheduler
    return _Recorder(first_latents=first_latents, alphas_cumprod=scheduler.alphas_cumprod,
                     prediction_type=scheduler.config.get("prediction_type", "epsilon"), stop=stop,
                     on_step=on_step, total=total, offset=offset)


def _record(run: PreparedCall, *, stop, on_step, switches: dict[int, Callable] | None = None) -> Trace:
    """Run the pipeline with the recorder attached; `switches[k](pipe)` runs before iteration k."""
    pipeline = run.pipeline
    noise, generators = _initial_noise(run)
    # x_T as prepare_latents makes it from the noise we pass
    recorder = _recorder_for(run, first_latents=lambda: noise.to(run.device) * pipeline.scheduler.init_noise_sigma,
                             stop=stop, on_step=on_step)

    def step_end(pipe, index, timestep, tensors):
        outputs = recorder.step_end(pipe, index, timestep, tensors)
        if switches and index + 1 in switches:
            outputs.update(switches[index + 1](pipe))
        return outputs

    with recorder.listening(pipeline.unet):
        latents = run(0, generators=generators, latents=noise, callback=step_end, expose=("noise_pred",))
    return _finish(run, recorder.steps, latents, stopped=recorder.stopped)


def _finish(run: PreparedCall, steps: list[TraceStep], latents: torch.Tensor, *, stopped: bool, **extra) -> Trace:
    pipeline = run.pipeline
    final_image = run.decode(latents)[0]
    notes = list(run.notes)
    if stopped:
        notes.append(f"Stopped after {len(steps)} step(s); the final image is the unfinished latent decoded.")
    extra.setdefault("settings", [(0, run.request)])
    return Trace(request=run.request, steps=steps, final_latents=_cpu(latents), final_image=final_image,
                 prediction_type=pipeline.scheduler.config.get("prediction_type", "epsilon"),
                 vae=weakref.ref(pipeline.vae), stopped=stopped, notes=notes, **extra)


# ----------------------------------------------------------------------------- branching


def branch(models: ModelManager, trace: Trace, at_step: int, changes: dict, *,
           stop: threading.Event | None = None, on_step: Callable[[int, int], None] | None = None) -> Trace:
    """Continue `trace` from its x_t at step `at_step` with changed settings (keys in BRANCH_FIELDS).

    Same sampler (CFG, prompt, negative prompt, guidance rescale changed): the run is replayed from the
    seed with the trace's settings (a branch's too, switch by switch) and switched at step `at_step`
    inside diffusers' loop, through callback_on_step_end (new `_guidance_scale`, new `prompt_embeds`).
    Replaying rebuilds the sampler's history (DPM++ and UniPC are multistep), so a branch without
    changes reproduces the trace bit for bit.

    Other sampler (or a trace in which another sampler already took over): the new sampler takes over
    from the recorded x_t at its own step nearest to that noise level, starting fresh (multistep
    samplers warm up again with lower-order steps); x_t is carried over in the variance-preserving
    frame. A stochastic new sampler draws its noise from the seed restarted at the branch.
    """
    # 1. Check inputs
    unknown = sorted(set(changes) - set(BRANCH_FIELDS))
    if unknown:
        raise ValueError(f"A branch can change {', '.join(BRANCH_FIELDS)} but received {', '.join(unknown)}.")
    if isinstance(at_step, bool) or not isinstance(at_step, (int, np.integer)) or not 0 <= at_step < trace.num_steps:
        raise ValueError(f"`at_step` has to be a whole number from 0 to {trace.num_steps - 1} (a step this trace "
                         f"recorded) but is {at_step!r}.")
    at_step = int(at_step)
    request = replace(trace.request, **changes)          # validates the new values
    changed = {key: value for key, value in changes.items() if getattr(trace.request, key) != value}
    replay = request.sampler == trace.request.sampler and trace.replayable
    if request.sampler in NOT_RESTARTABLE and not replay and at_step > 0:
        raise ValueError(f"{request.sampler} cannot take over mid-way: its warm-up assumes the start of the "
                         "schedule. Branch to another sampler, or branch at step 0.")
    current_vae = models.pipeline("txt2img").vae if models.current is not None else None
    if trace.vae is None or trace.vae() is None or trace.vae() is not current_vae:
        raise ValueError("The model has changed since this trace was recorded; record again to branch it.")
    details = {"branched_at": at_step, "changes": changed,
               "settings": [(k, settings) for k, settings in trace.settings if k < at_step] + [(at_step, request)]}

    # 2. Before the first step a branch is a new recording from the same seed
    if at_step == 0:
        result = _record(_prepare(models, request), stop=stop, on_step=on_step)
        result.branched_at, result.changes = at_step, changed
        return result
    if replay:
        return _replay(models, request, details, stop=stop, on_step=on_step)
    return _take_over(models, trace, request, at_step, details, stop=stop, on_step=on_step)


def _switch(run: PreparedCall, before: Txt2ImgRequest, after: Txt2ImgRequest) -> Callable[[Any], dict]:
    """A step-end action that turns the running loop from `before`'s settings to `after`'s."""
    pipeline = run.pipeline
    old_cfg, new_cfg = uses_cfg(pipeline, before.guidance_scale), uses_cfg(pipeline, after.guidance_scale)
    embeddings = None
    if (after.prompt, after.negative_prompt) != (before.prompt, before.negative_prompt) or old_cfg != new_cfg:
        embeddings, note = prompt_embeddings(pipeline, after, run.device, cfg=new_cfg)
        if note:
            run.notes.append(note)

    def switch(pipe) -> dict:
        # The loop reads these through do_classifier_free_guidance / guidance_scale / guidance_rescale
        pipe._guidance_scale = after.guidance_scale
        pipe._guidance_rescale = after.guidance_rescale
        return {} if embeddings is None else {"prompt_embeds": embeddings}

    return switch


def _replay(models, request: Txt2ImgRequest, details: dict, *, stop, on_step) -> Trace:
    """Rerun from the seed with the first settings, switching at every later step the plan names."""
    plan = details["settings"]
    run = _prepare(models, plan[0][1])
    switches = {step: _switch(run, before, after) for (_, before), (step, after) in zip(plan, plan[1:])}
    result = _record(run, stop=stop, on_step=on_step, switches=switches)
    result.request, result.settings = request, plan
    result.branched_at, result.changes = details["branched_at"], details["changes"]
    return result


def _take_over(models, trace: Trace, request: Txt2ImgRequest, at_step: int, details: dict, *,
               stop, on_step) -> Trace:
    """The new sampler continues from trace.steps[at_step] with our own short loop (diffusers' loop, step 7)."""
    run = _prepare(models, request)
    pipeline, scheduler, device = run.pipeline, run.pipeline.scheduler, run.device
    origin = trace.steps[at_step]

    # 1. The new sampler's schedule, entered at its first-order step nearest to the recorded timestep
    scheduler.set_timesteps(request.steps, device=device)
    timesteps = scheduler.timesteps
    candidates = range(0, len(timesteps), scheduler.order)
    start = min(candidates, key=lambda i: (abs(float(timesteps[i]) - origin.timestep), -i))
    if abs(float(timesteps[start]) - origin.timestep) > 1.0:
        run.notes.append(f"{request.sampler}'s nearest step is at t = {float(timesteps[start]):.1f}, not at "
                         f"t = {origin.timestep:.1f}: its schedule differs, so it takes over there.")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    if request.sampler in STOCHASTIC:
        run.notes.append(f"{request.sampler} draws fresh noise from seed {request.seed} restarted at the branch.")

    # 2. Carry x_t over in the variance-preserving frame: the new sampler's input scale undoes its own frame
    model_input = origin.model_input.to(device=device, dtype=pipeline.unet.dtype)
    with torch.no_grad():
        scale = scheduler.scale_model_input(torch.ones_like(model_input), timesteps[start])
    latents = model_input / scale

    # 3. Prompts, guidance and the step's extra arguments, as the pipeline prepares them
    denoiser = Denoiser(run)

    # 4. Denoising loop over the remaining timesteps, one explicit step at a time
    remaining = timesteps[start:]
    start_latents = latents
    recorder = _recorder_for(run, first_latents=lambda: start_latents, stop=stop, on_step=on_step,
                             total=at_step + len(remaining), offset=at_step)
    with recorder.listening(pipeline.unet):
        for index, t in enumerate(remaining):
            if stop is not None and stop.is_set():
                recorder.stopped = True
                break
            step = denoiser.step(latents, t)
            latents = step.latents
            recorder.step_end(pipeline, start + index, t, {"latents": latents,
                                                            "noise_pred": step.prediction.eps_guided})
    return _finish(run, trace.steps[:at_step] + recorder.steps, latents, stopped=recorder.stopped,
                   replayable=False, **details)


# ----------------------------------------------------------------------------- comparing


COMPARE_COLUMNS: tuple[str, ...] = ("sampler", "steps", "CFG", "RMS to reference (0–255)", "seconds",
                                    "UNet calls", "model evaluations")


@dataclass
class CompareRow:
    sampler: str
    steps: int
    guidance_scale: float
    rms_to_reference: float         # pixel values 0..255
    seconds: float
    unet_calls: int                 # forward calls; one call carries both CFG halves
    model_evaluations: int          # calls × batch: 2 per call with CFG

    def values(self) -> list:
        return [self.sampler, self.steps, self.guidance_scale, round(self.rms_to_reference, 2),
                round(self.seconds, 3), self.unet_calls, self.model_evaluations]


def compare(models: ModelManager, request: Txt2ImgRequest, *, samplers: list[str] | None = None,
            steps: list[int] | None = None, cfgs: list[float] | None = None, reference_steps: int = 100,
            reference_sampler: str | None = DEFAULT_REFERENCE_SAMPLER, stop: threading.Event | None = None,
            on_step: Callable[[int, int], None] | None = None) -> tuple[Image.Image, list[CompareRow]]:
    """Run one seed over every combination of `samplers` × `steps` × `cfgs` (None: the request's value).

    Each cell is measured against a reference: `reference_sampler` (None: the cell's own sampler) at
    `reference_steps` steps and the cell's CFG, same seed. Deterministic samplers converge towards it as
    steps grow; stochastic ones (Euler a, DDPM, ...) sample a different image and stay far from it.
    Returns the labelled grid (one row per sampler) and one CompareRow per cell, in grid order.
    """
    # 1. Check inputs
    request = request.resolved()
    samplers, steps, cfgs = (list(samplers or [request.sampler]), list(steps or [request.steps]),
                             list(cfgs or [request.guidance_scale]))
    cells = [replace(request, sampler=s, steps=n, guidance_scale=w) for s in samplers for n in steps for w in cfgs]
    if len(cells) > MAX_COMPARE_CELLS:
        raise ValueError(f"{len(samplers)} sampler(s) × {len(steps)} step count(s) × {len(cfgs)} CFG value(s) "
                         f"make {len(cells)} images; at most {MAX_COMPARE_CELLS} fit one comparison.")
    if isinstance(reference_steps, bool) or not isinstance(reference_steps, int) \
            or not 1 <= reference_steps <= MAX_STEPS:
        raise ValueError(f"`reference_steps` has to be a whole number from 1 to {MAX_STEPS} "
                         f"but is {reference_steps!r}.")
    if reference_sampler is not None and reference_sampler not in STEPWISE_SAMPLER_NAMES:
        raise ValueError(f"Unknown reference sampler {reference_sampler!r}. "
                         f"Valid samplers: {', '.join(STEPWISE_SAMPLER_NAMES)}.")

    # 2. Generate every cell, and each reference once
    references: dict[tuple[str, float], Image.Image] = {}
    images, rows = [], []
    for number, cell in enumerate(cells):
        if stop is not None and stop.is_set():
            break
        image, seconds, calls, evaluations = _measured_generation(models, cell)
        key = (reference_sampler or cell.sampler, cell.guidance_scale)
        if key not in references:
            references[key] = _measured_generation(models, replace(cell, sampler=key[0], steps=reference_steps))[0]
        images.append(image)
        rows.append(CompareRow(cell.sampler, cell.steps, cell.guidance_scale, rms_distance(image, references[key]),
                               seconds, calls, evaluations))
        if on_step is not None:
            on_step(number + 1, len(cells))

    # 3. Lay out the grid: a row per sampler, a column per (steps, CFG)
    return _grid(images, rows, columns=len(steps) * len(cfgs)), rows


def _measured_generation(models: ModelManager, request: Txt2ImgRequest) -> tuple[Image.Image, float, int, int]:
    """The Generator-identical image, its wall time and how often the UNet ran."""
    run = _prepare(models, request)
    counts = {"calls": 0, "evaluations": 0}

    def count(module, args, output):
        counts["calls"] += 1
        counts["evaluations"] += (output[0] if isinstance(output, tuple) else output.sample).shape[0]

    handle = run.pipeline.unet.register_forward_hook(count)
    started = time.perf_counter()
    try:
        noise, generators = _initial_noise(run)
        image = run.decode(run(0, generators=generators, latents=noise))[0]
    finally:
        handle.remove()
    return image, time.perf_counter() - started, counts["calls"], counts["evaluations"]


def _grid(images: list[Image.Image], rows: list[CompareRow], *, columns: int) -> Image.Image:
    if not images:
        raise ValueError("The comparison was stopped before its first image.")
    font = ImageFont.load_default()
    width, height = images[0].size
    factor = max(1, math.ceil(MIN_GRID_CELL_PX / min(width, height)))
    labels = [[row.sampler, f"{row.steps} steps, CFG {row.guidance_scale:g}",
               f"RMS {row.rms_to_reference:.1f} px, {row.seconds:.2f} s",
               f"NFE {row.unet_calls} calls ({row.model_evaluations} evals)"] for row in rows]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(measure.textbbox((0, 0), line, font=font)[2] for lines in labels for line in lines)
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + 3
    cell_width = max(width * factor, text_width) + 8
    cell_height = height * factor + 4 * line_height + 10
    row_count = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell_width, row_count * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, lines) in enumerate(zip(images, labels)):
        left, top = (index % columns) * cell_width, (index // columns) * cell_height
        shown = image.resize((width * factor, height * factor), Image.Resampling.NEAREST)
        grid.paste(shown, (left + (cell_width - shown.width) // 2, top + 4))
        for number, line in enumerate(lines):
            draw.text((left + 4, top + shown.height + 6 + number * line_height), line, fill="black", font=font)
    return grid


def parse_compare_lists(samplers: str, steps: str, cfgs: str) -> dict:
    """Comma- or newline-separated text from the UI -> keyword arguments for `compare` (None where empty)."""
    def items(text: str) -> list[str]:
        return [item.strip() for item in re.split(r"[,;\n]", text or "") if item.strip()]

    by_lower = {name.lower(): name for name in STEPWISE_SAMPLER_NAMES}   # speculative: its own panel
    sampler_list = []
    for item in items(samplers):
        if item.lower() not in by_lower:
            raise ValueError(f"Unknown sampler {item!r} in the comparison. Valid samplers: "
                             f"{', '.join(STEPWISE_SAMPLER_NAMES)}.")
        sampler_list.append(by_lower[item.lower()])
    try:
        step_list = [int(item) for item in items(steps)]
    except ValueError:
        raise ValueError(f"Steps have to be whole numbers separated by commas, like `10, 20, 50`, "
                         f"but are {steps!r}.") from None
    try:
        cfg_list = [float(item) for item in items(cfgs)]
    except ValueError:
        raise ValueError(f"CFG values have to be numbers separated by commas, like `1, 4, 7.5`, "
                         f"but are {cfgs!r}.") from None
    return {"samplers": sampler_list or None, "steps": step_list or None, "cfgs": cfg_list or None}


# ----------------------------------------------------------------------------- export


def export_trace(trace: Trace, kind: str, path: Path, *, fps: int = 8) -> Path:
    """A GIF or MP4 (by suffix) of the trace's frames of `kind`, via explorer_forward.export_animation."""
    return export_animation(trace.frames(kind), Path(path), fps=fps)
