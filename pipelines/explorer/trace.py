"""A recorded reverse (denoising) process, for the Diffusion Explorer tab: one `TraceStep` per UNet
evaluation and the frames drawn from them (pipelines/explorer/reverse.py records and branches traces).

Each `TraceStep` keeps x_t, the timestep, the noise level, eps_u / eps_c / eps_guided and the model's
current guess of the clean latent x0_pred. Images are decoded lazily (`Trace.frame`), so recording
costs little more than generating.

Samplers keep x_t in one of two parametrisations; both are handled, and frames show the first:

    variance preserving (DDIM, DDPM, PNDM, DPM++ 2M, UniPC, LCM):  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    sigma, "k-diffusion" (Euler, Euler a, Heun, LMS, DPM++ SDE):   x   = x_0 + sigma eps

For the second kind `scheduler.scale_model_input` shows the UNet x / sqrt(sigma^2 + 1), which is the
first form with abar = 1 / (sigma^2 + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
import torch
from PIL import Image

from pipelines.core.images import to_pil
from pipelines.core.vae import decode
from pipelines.tasks.txt2img import Txt2ImgRequest

FRAME_KINDS: tuple[str, ...] = ("x_t", "x0_pred", "eps_uncond", "eps_cond", "eps_guided")
NOISE_KINDS: tuple[str, ...] = ("eps_uncond", "eps_cond", "eps_guided")
NOISE_COLORMAP = "magma"


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
    flow_time: float | None = None  # flow matching's t in (0, 1] (x_t = (1 − t)·x_0 + t·ε); None: DDPM's process

    @property
    def sigma_parametrised(self) -> bool:
        return self.input_scale != 1.0

    @property
    def noise_level(self) -> float:
        """sigma for sigma samplers, sqrt(1 - abar_t) for variance-preserving ones, t for flow matching."""
        if self.flow_time is not None:
            return self.flow_time
        if self.sigma_parametrised:
            return math.sqrt((1.0 - self.alpha_cumprod) / self.alpha_cumprod)
        return math.sqrt(1.0 - self.alpha_cumprod)

    @property
    def noise_level_name(self) -> str:
        return "t" if self.flow_time is not None else "σ" if self.sigma_parametrised else "√(1−ᾱ_t)"

    @property
    def model_input(self) -> torch.Tensor:
        """x_t in the variance-preserving frame, as the UNet saw it."""
        return self.latents if not self.sigma_parametrised else self.latents * self.input_scale

    def describe(self) -> str:
        if self.flow_time is not None:
            return f"flow matching · t = {self.flow_time:.4g} · x_t = (1 − t)·x_0 + t·ε · x̂_0 = x_t − t·v"
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
