"""The forward (noising) process of DDPM, for the Diffusion Explorer tab.

Pure computation: schedules, closed-form and step-by-step noising, latent-space
frames, statistics and plots. No gradio here; figures are built with
`matplotlib.figure.Figure()` directly, so importing this module selects no backend.

Timestep convention (the one diffusers uses): `t` is a 0-based index into `betas`,
and `alphas_cumprod[t] = prod_{s=0..t} (1 - beta_s)`. So index `t` is the state after
`t + 1` Markov steps; in the 1-based notation of the DDPM paper it is x_{t+1}.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler
from matplotlib.figure import Figure
from PIL import Image

from pipelines.core.vae import decode, encode

SCHEDULE_NAMES: tuple[str, ...] = ("linear", "scaled_linear", "cosine", "model")
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

# Theoretical densities are mixtures over at most this many pixel values of x_0.
MAX_MIXTURE_COMPONENTS = 2000
# Exported MP4s are upscaled (nearest neighbour) until the shorter side reaches this.
MIN_VIDEO_SIDE_PX = 256

FORMULAS: dict[str, str] = {
    "forward_closed_form": (
        "Any noise level can be reached in one jump: the noisy image is a shrunken copy of the "
        "clean image plus Gaussian noise, "
        r"$$q(x_t \mid x_0) = \mathcal{N}\!\left(\sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t)\,I\right),"
        r"\qquad \bar\alpha_t = \prod_{s=1}^{t} (1-\beta_s).$$"
    ),
    "markov_step": (
        "Each step shrinks the previous image slightly and adds a little fresh noise, "
        r"$$x_t = \sqrt{1-\beta_t}\,x_{t-1} + \sqrt{\beta_t}\,z, \qquad z \sim \mathcal{N}(0, I).$$"
    ),
    "snr": (
        "The signal-to-noise ratio compares the power of the remaining image to that of the noise, "
        "and falls as $t$ grows, "
        r"$$\mathrm{SNR}(t) = \frac{\bar\alpha_t}{1-\bar\alpha_t}, "
        r"\qquad \log\mathrm{SNR}(t) = \log\bar\alpha_t - \log(1-\bar\alpha_t).$$"
    ),
}


# ----------------------------------------------------------------------------- schedules


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A variance schedule beta_1..beta_T of the DDPM forward process.

    `betas` is a 1-D float64 tensor of length T with every beta_t in (0, 1].
    """

    name: str
    betas: torch.Tensor

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
        """abar_t = prod_{s<=t} (1 - beta_s), the signal power left at step t."""
        return torch.cumprod(self.alphas, dim=0)

    @property
    def log_snr(self) -> torch.Tensor:
        """log SNR_t = log(abar_t / (1 - abar_t)); -inf where abar_t = 0 (zero-terminal-SNR schedules)."""
        alphas_cumprod = self.alphas_cumprod
        return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)


def make_schedule(
    name: str,
    num_steps: int | None = None,
    *,
    scheduler_config: dict[str, Any] | None = None,
) -> NoiseSchedule:
    """Build a named schedule with exactly the betas of `diffusers.DDPMScheduler`.

    name: "linear" (DDPM: linspace(1e-4, 0.02, T)), "scaled_linear" (Stable Diffusion:
        linspace(sqrt(0.00085), sqrt(0.012), T)^2), "cosine" (diffusers "squaredcos_cap_v2",
        abar(t) = cos^2(((t/T + 0.008) / 1.008) * pi/2), betas capped at 0.999), or "model"
        (the betas a diffusers scheduler config describes).
    num_steps: T. Defaults to 1000 for the presets and to the config's `num_train_timesteps`
        for "model"; an explicit value overrides `num_train_timesteps`. (`None` rather than
        1000 as default, so that "given explicitly" can be told apart.)
    scheduler_config: a diffusers scheduler config dict (e.g. `pipe.scheduler.config`); only
        `beta_schedule`, `beta_start`, `beta_end`, `num_train_timesteps`, `trained_betas` and
        `rescale_betas_zero_snr` are read. Required for "model", refused otherwise.
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


def _check_num_steps(num_steps: Any) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"`num_steps` has to be an int but is {num_steps!r}.")
    if not MIN_NUM_STEPS <= num_steps <= MAX_NUM_STEPS:
        raise ValueError(f"`num_steps` has to be in [{MIN_NUM_STEPS}, {MAX_NUM_STEPS}] but is {num_steps}.")


def _check_timestep(t: Any, schedule: NoiseSchedule) -> int:
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
    """One epsilon held fixed while t moves, so x_t changes only through abar_t.

    Keep it in per-user state; `like(x)` redraws the same epsilon for any tensor of a given shape.
    """

    seed: int

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed epsilon with the shape, dtype and device of `x`."""
        return fixed_noise(x.shape, self.seed).to(device=x.device, dtype=x.dtype)


def forward_sample(x0: torch.Tensor, *, t: int, schedule: NoiseSchedule, noise: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) in closed form: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) epsilon.

    Equals `DDPMScheduler.add_noise(x0, noise, torch.tensor([t]))` for the same betas.
    """
    t = _check_timestep(t, schedule)
    if noise.shape != x0.shape:
        raise ValueError(f"`noise` has to have the shape of `x0` {tuple(x0.shape)} but has {tuple(noise.shape)}.")
    alpha_cumprod = schedule.alphas_cumprod[t].item()
    return math.sqrt(alpha_cumprod) * x0 + math.sqrt(1.0 - alpha_cumprod) * noise.to(x0.dtype)


def markov_chain(x0: torch.Tensor, *, t: int, schedule: NoiseSchedule, generator: torch.Generator) -> torch.Tensor:
    """Run the forward Markov chain x_s = sqrt(1 - beta_s) x_{s-1} + sqrt(beta_s) z for s = 0..t.

    Fresh z ~ N(0, I) at every step, drawn from `generator` (on its device). The result has the
    same distribution as `forward_sample` at the same `t`.
    """
    t = _check_timestep(t, schedule)
    x = x0
    for beta in schedule.betas[: t + 1].tolist():
        z = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        x = math.sqrt(1.0 - beta) * x + math.sqrt(beta) * z
    return x


def empirical_moments(
    x0: torch.Tensor,
    *,
    t: int,
    schedule: NoiseSchedule,
    n_draws: int,
    seed: int,
    method: Literal["closed_form", "markov_chain"] = "closed_form",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element mean and unbiased variance of x_t over `n_draws` independent draws.

    Theory: mean = sqrt(abar_t) x_0 and variance = 1 - abar_t for either `method`.
    """
    samples = draw_samples(x0, t=t, schedule=schedule, n_draws=n_draws, seed=seed, method=method)
    return samples.mean(dim=0), samples.var(dim=0)


def draw_samples(
    x0: torch.Tensor,
    *,
    t: int,
    schedule: NoiseSchedule,
    n_draws: int,
    seed: int,
    method: Literal["closed_form", "markov_chain"] = "closed_form",
) -> torch.Tensor:
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
    either way it is then centre-cropped to multiples of 8, as the VAE requires.
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
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) tensor -> RGB PIL image.

    x_t legitimately leaves [-1, 1] (its variance is 1 - abar_t around sqrt(abar_t) x_0);
    values outside are clamped for display only.
    """
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"Expected a tensor of shape (1, 3, H, W) or (3, H, W) but got {tuple(x.shape)}.")
    array = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), mode="RGB")


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
    timesteps = [_check_timestep(t, schedule) for t in timesteps]

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


# ----------------------------------------------------------------------------- statistics and plots


def theoretical_marginal_density(
    grid: np.ndarray,
    *,
    x0: torch.Tensor,
    t: int,
    schedule: NoiseSchedule,
    max_components: int = MAX_MIXTURE_COMPONENTS,
    seed: int = 0,
) -> np.ndarray:
    """Density of one value of x_t at `grid`: (1/M) sum_i N(y; sqrt(abar_t) x0_i, 1 - abar_t).

    The mixture runs over a seeded random subset of at most `max_components` values of x_0.
    """
    t = _check_timestep(t, schedule)
    values = x0.detach().flatten().double().cpu().numpy()
    if values.size > max_components:
        values = np.random.default_rng(seed).choice(values, size=max_components, replace=False)
    alpha_cumprod = schedule.alphas_cumprod[t].item()
    means = math.sqrt(alpha_cumprod) * values
    variance = 1.0 - alpha_cumprod
    squared_distance = (np.asarray(grid, dtype=np.float64)[:, None] - means[None, :]) ** 2
    return np.exp(-squared_distance / (2 * variance)).mean(axis=1) / math.sqrt(2 * math.pi * variance)


def value_histogram(x_t: torch.Tensor, *, t: int, schedule: NoiseSchedule, x0: torch.Tensor) -> Figure:
    """Histogram (density) of the values of x_t against theory.

    Overlays the marginal of q(x_t | x_0) over the pixels (a mixture of N(sqrt(abar_t) x0_i,
    1 - abar_t)) and the standard normal N(0, 1) that x_T approaches.
    """
    t = _check_timestep(t, schedule)
    values = x_t.detach().flatten().double().cpu().numpy()
    low, high = min(values.min(), -4.0), max(values.max(), 4.0)
    grid = np.linspace(low, high, 1200)

    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axes = figure.add_subplot()
    axes.hist(values, bins=100, range=(low, high), density=True, color="0.7", label="values of $x_t$")
    axes.plot(
        grid,
        theoretical_marginal_density(grid, x0=x0, t=t, schedule=schedule),
        color="C0",
        label=r"theory: mixture of $\mathcal{N}(\sqrt{\bar\alpha_t}\,x_{0,i},\ 1-\bar\alpha_t)$",
    )
    axes.plot(grid, np.exp(-(grid**2) / 2) / math.sqrt(2 * math.pi), color="C3", linestyle="--",
              label=r"$\mathcal{N}(0, 1)$")
    alpha_cumprod = schedule.alphas_cumprod[t].item()
    axes.set_title(f"t = {t}   " + r"$\bar\alpha_t$" + f" = {alpha_cumprod:.4g}")
    axes.set_xlabel("value")
    axes.set_ylabel("density")
    # below the axes, so it never covers the bars
    axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    figure.tight_layout()
    return figure


def schedule_data(schedules: Sequence[NoiseSchedule], *, t: int) -> dict:
    """The schedule plot's numbers, for the API: per schedule beta_t, abar_t and log-SNR over t = 0..T-1, and the
    closed form's two coefficients at `t` (x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps)."""
    first = schedules[0]
    alpha_cumprod = first.alphas_cumprod[t].item()
    return {"t": t, "T": first.num_steps, "signal_coefficient": math.sqrt(alpha_cumprod),
            "noise_coefficient": math.sqrt(1 - alpha_cumprod),
            "schedules": {schedule.name: {"betas": schedule.betas.tolist(),
                                          "alphas_cumprod": schedule.alphas_cumprod.tolist(),
                                          "log_snr": schedule.log_snr.tolist()} for schedule in schedules}}


def schedule_plot(schedules: Sequence[NoiseSchedule], *, t: int | None = None) -> Figure:
    """beta_t, abar_t and log-SNR_t of each schedule against t/T, with a marker at the current t.

    The x axis is the fraction (t + 1)/T, so schedules with different T line up. `t` indexes the
    first schedule (the active one).
    """
    if len(schedules) == 0:
        raise ValueError("`schedules` is empty; pass at least one NoiseSchedule.")
    if t is not None:
        t = _check_timestep(t, schedules[0])

    figure = Figure(figsize=(12, 3.5), layout="constrained")
    beta_axes, alpha_cumprod_axes, log_snr_axes = figure.subplots(1, 3, sharex=True)
    for schedule in schedules:
        fraction = np.arange(1, schedule.num_steps + 1) / schedule.num_steps
        beta_axes.plot(fraction, schedule.betas.numpy(), label=schedule.name)
        alpha_cumprod_axes.plot(fraction, schedule.alphas_cumprod.numpy(), label=schedule.name)
        log_snr_axes.plot(fraction, schedule.log_snr.numpy(), label=schedule.name)

    beta_axes.set_yscale("log")  # cosine betas span 1e-5 .. 0.999
    beta_axes.set_title(r"$\beta_t$ (log scale)")
    alpha_cumprod_axes.set_title(r"$\bar\alpha_t = \prod_{s \leq t}(1-\beta_s)$")
    log_snr_axes.set_title(r"$\log\,\mathrm{SNR} = \log\frac{\bar\alpha_t}{1-\bar\alpha_t}$")
    for axes in (beta_axes, alpha_cumprod_axes, log_snr_axes):
        axes.set_xlabel("t / T")
        axes.set_xlim(0, 1)
        if t is not None:
            axes.axvline((t + 1) / schedules[0].num_steps, color="k", linestyle=":", label=f"t = {t}")
    alpha_cumprod_axes.legend(fontsize="small")
    return figure


# ----------------------------------------------------------------------------- export


def export_animation(frames: Sequence[Image.Image], path: Path, *, fps: int = 10) -> Path:
    """Write `frames` as a looping GIF (Pillow) or an H.264 MP4 (imageio-ffmpeg), chosen by suffix.

    The file appears atomically: it is written under a temporary name in the same folder and
    then moved into place. MP4 frames are upscaled (nearest neighbour, integer factor) until the
    shorter side is at least 256 px and padded to even sizes, as yuv420p requires.
    Pillow merges identical consecutive GIF frames, so a GIF of repeated frames has fewer frames.
    """
    # 1. Check inputs
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"Animations can be saved as .gif or .mp4 but the path ends in {path.suffix!r}.")
    if len(frames) == 0:
        raise ValueError("`frames` is empty; pass at least one image.")
    sizes = {frame.size for frame in frames}
    if len(sizes) != 1:
        raise ValueError(f"All frames have to have the same size but sizes are {sorted(sizes)}.")
    if not 1 <= fps <= 60:
        raise ValueError(f"`fps` has to be in [1, 60] but is {fps}.")
    frames = [frame.convert("RGB") for frame in frames]

    # 2. Write under a temporary name next to the target, then move it into place
    path.parent.mkdir(parents=True, exist_ok=True)
    file_descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    os.close(file_descriptor)
    try:
        if suffix == ".gif":
            frames[0].save(
                temporary_name,
                format="GIF",
                save_all=True,
                append_images=frames[1:],
                duration=round(1000 / fps),
                loop=0,
            )
        else:
            _write_mp4(frames, temporary_name, fps=fps)
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise
    return path


def _write_mp4(frames: list[Image.Image], filename: str, *, fps: int) -> None:
    import imageio.v2 as imageio  # deferred: loads the ffmpeg plugin machinery

    width, height = frames[0].size
    factor = max(1, math.ceil(MIN_VIDEO_SIDE_PX / min(width, height)))
    scaled_width, scaled_height = width * factor, height * factor
    padded_size = (scaled_width + scaled_width % 2, scaled_height + scaled_height % 2)
    writer = imageio.get_writer(
        filename,
        format="FFMPEG",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,  # we pad to even sizes ourselves; don't let imageio resize
    )
    with writer:
        for frame in frames:
            frame = frame.resize((scaled_width, scaled_height), Image.Resampling.NEAREST)
            canvas = Image.new("RGB", padded_size)
            canvas.paste(frame, (0, 0))
            writer.append_data(np.asarray(canvas))
