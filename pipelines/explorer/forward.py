"""The forward (noising) processes of DDPM and of flow matching, for the Diffusion Explorer tab: schedules,
closed-form and step-by-step noising, and frames of an image noised in pixel or latent space.

Pure computation; its figures are in plots.py, its animations in animation.py, its formulas in formulas.py.

Timestep convention (the one diffusers uses): `t` is a 0-based index into `betas`,
and `alphas_cumprod[t] = prod_{s=0..t} (1 - beta_s)`. So index `t` is the state after
`t + 1` Markov steps; in the 1-based notation of the DDPM paper it is x_{t+1}.

Flow matching (SD 3, Flux, Sana) noises along a straight line, x_t = (1 - t) x_0 + t eps with t in (0, 1]. With
a_t = 1 - t and s_t = t it is DDPM's variance-preserving process of the same SNR, scaled: abar_t = a_t^2 / (a_t^2 +
s_t^2) and x_flow = sqrt(a_t^2 + s_t^2) x_vp. So a flow schedule is a `NoiseSchedule` whose betas are those of
that abar and whose `scale` is sqrt(a_t^2 + s_t^2); its index `t` is the time (t + 1)/T, shifted by the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from pipelines.core.images import image_to_tensor as pixels_to_tensor
from pipelines.core.images import to_pil
from pipelines.core.samplers import edm_refusal, is_edm
from pipelines.core.transformers import is_flow
from pipelines.core.vae import decode, encode

SCHEDULE_NAMES: tuple[str, ...] = ("linear", "scaled_linear", "cosine", "flow matching", "model")
# The two forward processes a schedule runs (`NoiseSchedule.process`)
DDPM = "DDPM"
FLOW_MATCHING = "flow matching"
MIN_NUM_STEPS = 2
MAX_NUM_STEPS = 4000
DEFAULT_NUM_STEPS = 1000

# Our schedule name -> the diffusers `beta_schedule` and (beta_start, beta_end) it stands for.
_PRESETS: dict[str, tuple[str, float, float]] = {
    "linear": ("linear", 0.0001, 0.02),  # DDPM (Ho et al. 2020)
    "scaled_linear": ("scaled_linear", 0.00085, 0.012),  # Stable Diffusion
    "cosine": ("squaredcos_cap_v2", 0.0001, 0.02),  # Nichol & Dhariwal 2021; betas capped at 0.999
}

# The keys of a diffusers scheduler config that determine the betas.
_BETA_CONFIG_KEYS = ("beta_schedule", "beta_start", "beta_end", "trained_betas", "rescale_betas_zero_snr")

# How independent draws of x_t are made: in one jump (q(x_t | x_0)) or step by step (the Markov chain)
DrawMethod = Literal["closed_form", "markov_chain"]


# ----------------------------------------------------------------------------- schedules


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A variance schedule beta_1..beta_T of the DDPM forward process, scaled per step for flow matching.

    `betas` is a 1-D float64 tensor of length T with every beta_t in (0, 1]. `scale` (c_t, positive, float64, length
    T) multiplies the variance-preserving x_t: None for DDPM (c_t = 1); sqrt((1 - t)^2 + t^2) for flow matching.
    """

    name: str
    betas: torch.Tensor
    scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        betas = self.betas
        if not isinstance(betas, torch.Tensor) or betas.ndim != 1 or betas.dtype != torch.float64:
            raise ValueError(
                "`betas` has to be a 1-D float64 tensor but is "
                f"{type(betas).__name__} {getattr(betas, 'dtype', '')} of shape {tuple(getattr(betas, 'shape', ()))}."
            )
        _check_num_steps(betas.numel())
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(
                f"`betas` have to lie in (0, 1] but range over [{betas.min().item():g}, {betas.max().item():g}]."
            )
        scale = self.scale
        if scale is None:
            return
        if not isinstance(scale, torch.Tensor) or scale.shape != betas.shape or scale.dtype != torch.float64:
            raise ValueError(
                f"`scale` has to be a float64 tensor of the shape of `betas` {tuple(betas.shape)} but is "
                f"{type(scale).__name__} {getattr(scale, 'dtype', '')} of shape {tuple(getattr(scale, 'shape', ()))}."
            )
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise ValueError(f"`scale` has to be positive and finite but ranges over "
                             f"[{scale.min().item():g}, {scale.max().item():g}].")

    @property
    def process(self) -> str:
        """Which forward process the schedule runs: DDPM, or flow matching (the only one with a `scale`)."""
        return DDPM if self.scale is None else FLOW_MATCHING

    @property
    def num_steps(self) -> int:
        """T, the number of forward steps."""
        return self.betas.numel()

    @property
    def alphas(self) -> torch.Tensor:
        """alpha_t = 1 - beta_t."""
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t = prod_{s<=t} (1 - beta_s), the signal power left at step t (for flow matching: that of the
        variance-preserving process with the same SNR)."""
        return torch.cumprod(self.alphas, dim=0)

    @property
    def signal(self) -> torch.Tensor:
        """The closed form's coefficient of x_0: c_t sqrt(abar_t) (DDPM: sqrt(abar_t); flow matching: 1 - t)."""
        signal = torch.sqrt(self.alphas_cumprod)
        return signal if self.scale is None else self.scale * signal

    @property
    def noise(self) -> torch.Tensor:
        """The closed form's coefficient of eps: c_t sqrt(1 - abar_t) (DDPM: sqrt(1 - abar_t); flow matching: t)."""
        noise = torch.sqrt(1.0 - self.alphas_cumprod)
        return noise if self.scale is None else self.scale * noise

    @property
    def log_snr(self) -> torch.Tensor:
        """log SNR_t = log(abar_t / (1 - abar_t)); -inf where abar_t = 0 (zero-terminal-SNR schedules)."""
        alphas_cumprod = self.alphas_cumprod
        return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)


def flow_schedule(num_steps: int, *, shift: float = 1.0, name: str = FLOW_MATCHING) -> NoiseSchedule:
    """Flow matching, x_t = (1 - t) x_0 + t eps, at the times t_i = (i + 1)/T (i = 0..T-1: the last is pure noise),
    shifted as SD 3's scheduler does: t' = shift t / (1 + (shift - 1) t).

    Built as the variance-preserving process with the same SNR, scaled: with a_t = 1 - t and s_t = t,
    abar_t = a_t^2 / (a_t^2 + s_t^2), beta_t = 1 - abar_t / abar_{t-1} (abar_{-1} = 1; the last beta is 1)
    and scale c_t = sqrt(a_t^2 + s_t^2).
    """
    _check_num_steps(num_steps)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"The flow-matching `shift` has to be a positive number but is {shift!r}.")
    times = torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps
    # the time shift, written so that t = 1 stays exactly 1 (pure noise) for every shift
    times = shift * times / (shift * times + (1.0 - times))
    signal_power, noise_power = (1.0 - times) ** 2, times**2
    alphas_cumprod = signal_power / (signal_power + noise_power)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return NoiseSchedule(name=name, betas=1.0 - alphas_cumprod / previous,
                         scale=torch.sqrt(signal_power + noise_power))


def make_schedule(
    name: str,
    num_steps: int | None = None,
    *,
    scheduler_config: dict[str, Any] | None = None,
) -> NoiseSchedule:
    """Build a named schedule with exactly the betas of `diffusers.DDPMScheduler`.

    name: "linear" (DDPM: linspace(1e-4, 0.02, T)), "scaled_linear" (Stable Diffusion:
        linspace(sqrt(0.00085), sqrt(0.012), T)^2), "cosine" (diffusers "squaredcos_cap_v2",
        abar(t) = cos^2(((t/T + 0.008) / 1.008) * pi/2), betas capped at 0.999), "flow matching"
        (`flow_schedule`, unshifted), or "model" (the betas a diffusers scheduler config describes; for a
        flow-matching config, flow matching with its `shift` / `flow_shift`).
    num_steps: T. Defaults to 1000 for the presets and to the config's `num_train_timesteps`
        for "model"; an explicit value overrides `num_train_timesteps`. (`None` rather than
        1000 as default, so that "given explicitly" can be told apart.)
    scheduler_config: a diffusers scheduler config dict (e.g. `pipe.scheduler.config`); only
        `beta_schedule`, `beta_start`, `beta_end`, `num_train_timesteps`, `trained_betas` and
        `rescale_betas_zero_snr` are read (for a flow-matching one: `shift`, `flow_shift`, `use_dynamic_shifting`
        and `num_train_timesteps`). Required for "model", refused otherwise.
    """
    # 1. Check inputs
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"Unknown schedule {name!r}; valid schedules are {', '.join(SCHEDULE_NAMES)}.")
    if num_steps is not None:
        _check_num_steps(num_steps)
    if name == "model" and scheduler_config is None:
        raise ValueError('Schedule "model" needs a `scheduler_config` but received None.')
    if name != "model" and scheduler_config is not None:
        raise ValueError(f'`scheduler_config` is only used by schedule "model" but was passed with {name!r}.')

    if name == FLOW_MATCHING:
        return flow_schedule(DEFAULT_NUM_STEPS if num_steps is None else num_steps)
    if name == "model" and is_flow(scheduler_config):
        return _model_flow_schedule(scheduler_config, num_steps)
    if name == "model" and is_edm(scheduler_config):
        raise ValueError(edm_refusal('Schedule "model"', "its forward process is x_σ = x_0 + σ·ε; tick the linear "
                                     "or cosine DDPM schedule, or flow matching"))

    # 2. Collect the DDPMScheduler arguments that determine the betas
    if name == "model":
        config = {key: scheduler_config[key] for key in _BETA_CONFIG_KEYS if scheduler_config.get(key) is not None}
        trained_betas = config.get("trained_betas")
        if trained_betas is not None:
            if num_steps is not None and num_steps != len(trained_betas):
                raise ValueError(
                    f"The config has {len(trained_betas)} `trained_betas` but `num_steps` is {num_steps}."
                )
            num_steps = len(trained_betas)
        elif num_steps is None:
            num_steps = int(scheduler_config.get("num_train_timesteps", DEFAULT_NUM_STEPS))
            _check_num_steps(num_steps)
        label = f"model ({config.get('beta_schedule', 'trained' if trained_betas is not None else 'linear')})"
    else:
        beta_schedule, beta_start, beta_end = _PRESETS[name]
        config = {"beta_schedule": beta_schedule, "beta_start": beta_start, "beta_end": beta_end}
        num_steps = DEFAULT_NUM_STEPS if num_steps is None else num_steps
        label = name

    # 3. Let diffusers compute the betas, so they match its schedulers by construction
    try:
        scheduler = DDPMScheduler(num_train_timesteps=num_steps, **config)
    except NotImplementedError as error:
        raise ValueError(f"diffusers cannot build this schedule: {error}") from error
    return NoiseSchedule(name=label, betas=scheduler.betas.to(torch.float64))


def _model_flow_schedule(scheduler_config: dict[str, Any], num_steps: int | None) -> NoiseSchedule:
    """Flow matching with the model's static shift (`shift`, or `flow_shift` for the DPM-Solver family); a model that
    shifts by the image size (`use_dynamic_shifting`) has no one shift, so it is shown unshifted and named so."""
    if num_steps is None:
        num_steps = int(scheduler_config.get("num_train_timesteps", DEFAULT_NUM_STEPS))
    if scheduler_config.get("use_dynamic_shifting"):
        return flow_schedule(num_steps, name="model (flow matching, shift from the image size: shown unshifted)")
    shift = scheduler_config.get("shift")
    shift = scheduler_config.get("flow_shift") if shift is None else shift
    shift = 1.0 if shift is None else shift
    return flow_schedule(num_steps, shift=shift, name=f"model (flow matching, shift {shift:g})")


def _check_num_steps(num_steps: Any) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"`num_steps` has to be an int but is {num_steps!r}.")
    if not MIN_NUM_STEPS <= num_steps <= MAX_NUM_STEPS:
        raise ValueError(f"`num_steps` has to be in [{MIN_NUM_STEPS}, {MAX_NUM_STEPS}] but is {num_steps}.")


def check_timestep(t: Any, schedule: NoiseSchedule) -> int:
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
        raise ValueError(f"`t` has to be an int but is {t!r}.")
    if not 0 <= t < schedule.num_steps:
        raise ValueError(f"`t` has to be in [0, {schedule.num_steps - 1}] but is {t}.")
    return int(t)


# ----------------------------------------------------------------------------- noising


def fixed_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Seeded epsilon ~ N(0, I) of `shape`, drawn on CPU so it is identical on every device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


@dataclass(frozen=True)
class FixedNoise:
    """One epsilon held fixed while t moves, so x_t changes only through the schedule's coefficients.

    Keep it in per-user state; `like(x)` redraws the same epsilon for any tensor of a given shape.
    """

    seed: int

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed epsilon with the shape, dtype and device of `x`."""
        return fixed_noise(x.shape, self.seed).to(device=x.device, dtype=x.dtype)


def forward_sample(x0: torch.Tensor, *, t: int, schedule: NoiseSchedule, noise: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) in closed form: x_t = signal_t x_0 + noise_t epsilon, that is
    sqrt(abar_t) x_0 + sqrt(1 - abar_t) epsilon for DDPM and (1 - t) x_0 + t epsilon for flow matching.

    Equals `DDPMScheduler.add_noise(x0, noise, torch.tensor([t]))` for the same betas, and for flow matching
    `FlowMatchEulerDiscreteScheduler.scale_noise` at the same time.
    """
    t = check_timestep(t, schedule)
    if noise.shape != x0.shape:
        raise ValueError(f"`noise` has to have the shape of `x0` {tuple(x0.shape)} but has {tuple(noise.shape)}.")
    return schedule.signal[t].item() * x0 + schedule.noise[t].item() * noise.to(x0.dtype)


def markov_chain(x0: torch.Tensor, *, t: int, schedule: NoiseSchedule, generator: torch.Generator) -> torch.Tensor:
    """Run the forward Markov chain x_s = sqrt(1 - beta_s) x_{s-1} + sqrt(beta_s) z for s = 0..t.

    Fresh z ~ N(0, I) at every step, drawn from `generator` (on its device). The result has the
    same distribution as `forward_sample` at the same `t`. For flow matching the chain is the variance-preserving
    one scaled by c_t at the end: x_flow = c_t x_vp, so its step is x_t = (c_t / c_{t-1}) sqrt(1 - beta_t) x_{t-1}
    + c_t sqrt(beta_t) z, the exact flow-matching forward chain.
    """
    t = check_timestep(t, schedule)
    x = x0
    for beta in schedule.betas[: t + 1].tolist():
        z = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        x = math.sqrt(1.0 - beta) * x + math.sqrt(beta) * z
    if schedule.scale is not None:
        x = schedule.scale[t].item() * x
    return x


def empirical_moments(x0: torch.Tensor, *, t: int, schedule: NoiseSchedule, n_draws: int, seed: int,
                      method: DrawMethod = "closed_form") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element mean and unbiased variance of x_t over `n_draws` independent draws.

    Theory: mean = signal_t x_0 and variance = noise_t^2 for either `method` (DDPM: sqrt(abar_t) x_0 and
    1 - abar_t; flow matching: (1 - t) x_0 and t^2).
    """
    samples = draw_samples(x0, t=t, schedule=schedule, n_draws=n_draws, seed=seed, method=method)
    return samples.mean(dim=0), samples.var(dim=0)


def draw_samples(x0: torch.Tensor, *, t: int, schedule: NoiseSchedule, n_draws: int, seed: int,
                 method: DrawMethod = "closed_form") -> torch.Tensor:
    """`n_draws` independent x_t stacked along a new dim 0, by closed form or by the Markov chain."""
    if n_draws < 2:
        raise ValueError(f"`n_draws` has to be at least 2 but is {n_draws}.")
    if method not in ("closed_form", "markov_chain"):
        raise ValueError(f'`method` has to be "closed_form" or "markov_chain" but is {method!r}.')
    batch = x0.unsqueeze(0).expand(n_draws, *x0.shape)
    if method == "markov_chain":
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return markov_chain(batch, t=t, schedule=schedule, generator=generator)
    noise = fixed_noise(batch.shape, seed).to(device=x0.device, dtype=x0.dtype)
    return forward_sample(batch, t=t, schedule=schedule, noise=noise)


# ----------------------------------------------------------------------------- images and latents


def image_to_tensor(image: Image.Image, *, size: int | None = None) -> torch.Tensor:
    """PIL image -> float32 tensor in [-1, 1] of shape (1, 3, H, W), H and W multiples of 8.

    With `size`, the image is first resized (bicubic) so that its shorter side is `size`;
    either way it is then centre-cropped to multiples of 8, as the VAE requires. (Not core's `fit_image`:
    that fits an exact width × height, where the explorer keeps the picture's own aspect ratio.)
    """
    image = image.convert("RGB")
    if size is not None:
        if size < 8:
            raise ValueError(f"`size` has to be at least 8 but is {size}.")
        scale = size / min(image.size)
        image = image.resize(
            (max(size, round(image.width * scale)), max(size, round(image.height * scale))),
            Image.Resampling.BICUBIC,
        )
    width, height = image.width // 8 * 8, image.height // 8 * 8
    if width == 0 or height == 0:
        raise ValueError(f"The image has to be at least 8x8 pixels but is {image.width}x{image.height}.")
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return pixels_to_tensor(image.crop((left, top, left + width, top + height))).contiguous()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) tensor -> RGB PIL image.

    x_t legitimately leaves [-1, 1] (its variance is noise_t^2 around signal_t x_0);
    values outside are clamped for display only.
    """
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"Expected a tensor of shape (1, 3, H, W) or (3, H, W) but got {tuple(x.shape)}.")
    return to_pil(x.detach()[None])[0]


def animation_timesteps(schedule: NoiseSchedule, *, num_frames: int) -> list[int]:
    """`num_frames` timesteps evenly spaced from 0 to T - 1, for the x_0 -> x_T animation."""
    if not 2 <= num_frames <= schedule.num_steps:
        raise ValueError(f"`num_frames` has to be in [2, {schedule.num_steps}] but is {num_frames}.")
    return np.linspace(0, schedule.num_steps - 1, num_frames).round().astype(int).tolist()


def forward_frames(
    x0_pixels: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    seed: int,
    vae: Any | None = None,
    include_clean: bool = False,
) -> list[Image.Image]:
    """Frames x_t for each t in `timesteps`, all noised with the same seeded epsilon.

    Without `vae` the forward process runs on the pixels. With `vae` it runs on the latents
    z_0 = encode(vae, x0_pixels), and each z_t is decoded back to pixels for display.
    `include_clean` prepends x_0 itself (in latent space: the VAE reconstruction of z_0).
    """
    # 1. Check inputs
    if x0_pixels.ndim != 4 or x0_pixels.shape[:2] != (1, 3):
        raise ValueError(f"`x0_pixels` has to have shape (1, 3, H, W) but has {tuple(x0_pixels.shape)}.")
    if len(timesteps) == 0:
        raise ValueError("`timesteps` is empty; pass at least one timestep.")
    timesteps = [check_timestep(t, schedule) for t in timesteps]

    # 2. Choose the space the forward process runs in
    x0 = x0_pixels if vae is None else encode(vae, x0_pixels)
    noise = FixedNoise(seed).like(x0)

    def to_image(x: torch.Tensor) -> Image.Image:
        return tensor_to_image(x if vae is None else decode(vae, x)[0])

    # 3. Noise and render one frame at a time, so memory does not grow with the frame count
    frames = [to_image(x0)] if include_clean else []
    for t in timesteps:
        frames.append(to_image(forward_sample(x0, t=t, schedule=schedule, noise=noise)))
    return frames
