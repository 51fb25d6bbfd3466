"""The schedule a sampler runs, chosen beside the sampler as A1111 >= 1.9's `Schedule type`: "Default" (the
sampler's own timesteps, as `set_timesteps(steps)` makes them) or "Align Your Steps" (Sabour, Fidler & Kreis
2024, "Align Your Steps: Optimizing Sampling Schedules in Diffusion Models": noise levels optimised for few-step
sampling of a given model family).

Why no "Karras" or "Exponential" here: our sampler names already carry Karras ("DPM++ 2M Karras", "DPM++ SDE
Karras", translated to and from A1111's two-field form in samplers.py). A Karras schedule here too would give
"DPM++ 2M" + "Karras" and "DPM++ 2M Karras" as two spellings of one thing that do not even run the same steps
(the scheduler's `use_karras_sigmas` keeps Karras' exact sigmas, custom `timesteps=` round them to whole
timesteps), and would leave infotexts two ways to write it. Exponential alone would make the schedule half of a
split that the sampler names make too. So a schedule here is only what no sampler name says.

Align Your Steps. NVIDIA publishes 10-step schedules, which diffusers ships as `AysSchedules`: sigmas (the
variance-exploding noise level sigma_t = sqrt((1 - abar_t) / abar_t)) and the whole timesteps they fall on, for
SD 1.5 and SDXL. Other step counts interpolate log sigma linearly over the step index (NVIDIA's
`loglinear_interp`) between the published points, which end at sigma = 0.029 (SD's sigma at t = 0; diffusers'
copy writes that last point as the final 0). A sampler takes the schedule one of two ways in `set_timesteps`:
  sigmas=      Euler: the interpolated sigmas themselves, ending in 0;
  timesteps=   Heun, DDPM, DPM++ 2M: the sigmas mapped to whole timesteps on the model's own sigma_t
               (log-sigma interpolation, as diffusers' `_sigma_to_t`), rounded. From about 150 steps on, rounding
               merges neighbours in the last few timesteps; those are pushed apart by one (counting up from
               t = 0) so that every step is its own timestep and the count stays `steps`.
At 10 steps both are the published tables exactly. The table is picked by family: SD 1.x/2.x (a UNet with 4
latent channels, or 9 for inpainting, and no addition or class embedding) takes StableDiffusion's, SDXL
(addition_embed_type "text_time") SDXL's; other families have none.

Note: NVIDIA optimised the SD table for SD 1.5 (epsilon prediction). SD 2.x shares SD 1.5's noise schedule, so
the table applies to its v-prediction models too, but it was not optimised for them.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import AysSchedules

from pipelines.core.samplers import (
    SAMPLERS,
    SPECULATIVE_SAMPLER,
    STEPWISE_SAMPLER_NAMES,
    check_sampler,
    edm_refusal,
    make_scheduler,
    sampler_from_a1111,
)
from pipelines.core.transformers import is_flow, make_transformer_scheduler

DEFAULT_SCHEDULE = "Default"
ALIGN_YOUR_STEPS = "Align Your Steps"
SCHEDULES = (DEFAULT_SCHEDULE, ALIGN_YOUR_STEPS)

# How each scheduler class takes a schedule of ours in `set_timesteps` (the others take neither argument)
SCHEDULE_ARGUMENT: dict[type, str] = {
    EulerDiscreteScheduler: "sigmas",
    HeunDiscreteScheduler: "timesteps",
    DDPMScheduler: "timesteps",
    DPMSolverMultistepScheduler: "timesteps",
}
# Classes whose `set_timesteps` has the argument but cannot run our schedule with it
_CANNOT_DESPITE_ARGUMENT = {
    UniPCMultistepScheduler: "UniPCMultistepScheduler takes `sigmas` only for flow-matching models",
    LCMScheduler: "an LCM model runs the timesteps it was distilled on (diffusers warns of unexpected results "
                  "off them)",
}
# Config flags under which diffusers refuses custom timesteps: the sigmas are the flag's own
_SIGMA_FLAGS = {"use_karras_sigmas": "Karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta",
                "use_lu_lambdas": "Lu's lambda"}

# Align Your Steps' published tables (diffusers' names), by the model family they were optimised for
SD_FAMILY, SDXL_FAMILY = "SD 1.x/2.x", "SDXL"
AYS_TABLES = {SD_FAMILY: ("StableDiffusionSigmas", "StableDiffusionTimesteps"),
              SDXL_FAMILY: ("StableDiffusionXLSigmas", "StableDiffusionXLTimesteps")}
AYS_TABLE_STEPS = 10
PUBLISHED_LAST_SIGMA = 0.029      # the tables' last point as NVIDIA publishes it (diffusers writes 0)


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"Unknown schedule {name!r}. Valid schedules: {', '.join(SCHEDULES)}.")


# ----------------------------------------------------------------------------- which sampler runs which schedule


def _refusal(scheduler_class: type, config: dict) -> str | None:
    """Why a scheduler of `scheduler_class` with `config` cannot run a schedule of ours (None: it can)."""
    if scheduler_class in _CANNOT_DESPITE_ARGUMENT:
        return _CANNOT_DESPITE_ARGUMENT[scheduler_class]
    if scheduler_class not in SCHEDULE_ARGUMENT:
        return f"its scheduler ({scheduler_class.__name__}) takes no custom timesteps or sigmas in `set_timesteps`"
    for flag, sigmas in _SIGMA_FLAGS.items():
        if config.get(flag):
            return f"it runs its own {sigmas} sigmas (`{flag}`, with which diffusers takes no custom timesteps)"
    return None


def _sampler_refusal(sampler: str) -> str | None:
    if sampler == SPECULATIVE_SAMPLER:
        return "its own loop verifies drafts along DDPM's default steps"
    scheduler_class, overrides = SAMPLERS[sampler]
    return _refusal(scheduler_class, overrides)


# The samplers that run every schedule (the others run only Default)
SCHEDULABLE_SAMPLERS = tuple(name for name in STEPWISE_SAMPLER_NAMES if _sampler_refusal(name) is None)


def _takes_only_default(who: str, reason: str) -> str:
    return (f"{who} takes only the {DEFAULT_SCHEDULE} schedule: {reason}. "
            f"{ALIGN_YOUR_STEPS} runs with {', '.join(SCHEDULABLE_SAMPLERS)}.")


def schedule_error(sampler: str, schedule: str) -> str | None:
    """None when `sampler` can run `schedule`, else a one-line reason naming the samplers that can.
    An unknown sampler or schedule raises ValueError."""
    check_sampler(sampler)
    check_schedule(schedule)
    if schedule == DEFAULT_SCHEDULE:
        return None
    reason = _sampler_refusal(sampler)
    return None if reason is None else _takes_only_default(sampler, reason)


# ----------------------------------------------------------------------------- Align Your Steps


def ays_family(unet_config=None) -> str:
    """The family whose Align Your Steps table fits a UNet with `unet_config` (None: SD 1.x/2.x, the embedded
    model's family). ValueError for a family without tables."""
    if unet_config is None:
        return SD_FAMILY
    config = dict(unet_config)
    addition, in_channels = config.get("addition_embed_type"), config.get("in_channels")
    if addition == "text_time":
        return SDXL_FAMILY
    if addition is None and in_channels in (4, 9) and config.get("class_embed_type") is None \
            and not config.get("num_class_embeds"):
        return SD_FAMILY
    raise ValueError(
        f"{ALIGN_YOUR_STEPS} has tables for {' and '.join(AYS_TABLES)} only, not for this model's family (a UNet "
        f"with in_channels={in_channels}, addition_embed_type={addition!r}, "
        f"class_embed_type={config.get('class_embed_type')!r}). Its schedules: {DEFAULT_SCHEDULE}.")


def loglinear_interpolation(decreasing: np.ndarray, num_points: int) -> np.ndarray:
    """NVIDIA's `loglinear_interp`: `num_points` values whose logs are linear in the step index between the
    (positive, decreasing) published points."""
    published_index = np.linspace(0, 1, len(decreasing))
    return np.exp(np.interp(np.linspace(0, 1, num_points), published_index, np.log(decreasing)))


def ays_sigmas(family: str, steps: int) -> np.ndarray:
    """The `steps` sigmas Align Your Steps runs for `family`, and the final 0 (steps + 1 values)."""
    sigmas_name, _ = AYS_TABLES[family]
    table = np.asarray(AysSchedules[sigmas_name], dtype=np.float64)
    if steps == AYS_TABLE_STEPS:
        return table
    published = np.append(table[:-1], PUBLISHED_LAST_SIGMA)
    return np.append(loglinear_interpolation(published, steps + 1)[:-1], 0.0)


def ays_timesteps(family: str, steps: int, alphas_cumprod: torch.Tensor) -> list[int]:
    """The `steps` whole timesteps Align Your Steps runs for `family` on a model with `alphas_cumprod`."""
    _, timesteps_name = AYS_TABLES[family]
    if steps == AYS_TABLE_STEPS:
        return list(AysSchedules[timesteps_name])
    alphas_cumprod = alphas_cumprod.double().cpu().numpy()
    model_log_sigmas = np.log(np.sqrt((1 - alphas_cumprod) / alphas_cumprod))   # rises with t
    # sigma -> t by log-sigma interpolation, as diffusers' `_sigma_to_t`
    timesteps = np.round(np.interp(np.log(ays_sigmas(family, steps)[:-1]), model_log_sigmas,
                                   np.arange(len(alphas_cumprod)))).astype(np.int64)
    # one timestep per step: where rounding merged neighbours, the earlier one moves up (from t = 0 on)
    timesteps[-1] = max(timesteps[-1], 0)
    for index in range(len(timesteps) - 2, -1, -1):
        timesteps[index] = max(timesteps[index], timesteps[index + 1] + 1)
    if timesteps[0] >= len(alphas_cumprod):
        raise ValueError(f"{ALIGN_YOUR_STEPS} at {steps} steps needs more than the model's "
                         f"{len(alphas_cumprod)} timesteps; use fewer steps.")
    return timesteps.tolist()


# ----------------------------------------------------------------------------- setting a scheduler's schedule


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"`steps` has to be a whole number of at least 1 but is {steps!r}.")
    return int(steps)


def pipeline_schedule_arguments(scheduler, steps: int, schedule: str, *, unet_config=None) -> dict:
    """What to add to a diffusers pipeline's `__call__` (and to `scheduler.set_timesteps`, in place of the step
    count) for `schedule`: {} for Default, else {"sigmas": [...]} or {"timesteps": [...]} as `scheduler` takes it."""
    check_schedule(schedule)
    steps = _check_steps(steps)
    if schedule == DEFAULT_SCHEDULE:
        return {}
    if type(scheduler).__name__.startswith("EDM"):
        raise ValueError(edm_refusal(schedule, "it runs its own σ spacing, with the Default schedule"))
    reason = _refusal(type(scheduler), scheduler.config)
    if reason is not None:
        raise ValueError(_takes_only_default(type(scheduler).__name__, reason))
    family = ays_family(unet_config)
    if SCHEDULE_ARGUMENT[type(scheduler)] == "sigmas":
        return {"sigmas": ays_sigmas(family, steps).tolist()}
    return {"timesteps": ays_timesteps(family, steps, scheduler.alphas_cumprod)}


def set_schedule(scheduler, steps: int, schedule: str, *, unet_config=None, device=None) -> None:
    """`scheduler.set_timesteps` for `steps` steps of `schedule`; Default is exactly `set_timesteps(steps)`.
    `scheduler.timesteps` then holds the schedule's steps (repeated where a second-order sampler calls twice), so
    that img2img's strength cut (loop.strength_timesteps) takes its last share as it does for Default."""
    arguments = pipeline_schedule_arguments(scheduler, steps, schedule, unet_config=unet_config)
    if not arguments:
        scheduler.set_timesteps(steps, device=device)
    else:
        scheduler.set_timesteps(**arguments, device=device)


# ----------------------------------------------------------------------------- the numbers, for the explorer


def schedule_table(model_scheduler_config: dict, sampler: str, schedules: list[str], steps: int, *,
                   unet_config=None, flux_sigmas: bool = False, flux2: bool = False) -> dict[str, dict]:
    """Per schedule, what `sampler` runs at each model call: its timesteps, sigma_t = sqrt((1 - abar_t) / abar_t)
    and abar_t. Where the scheduler keeps its sigmas (Euler, Heun, LMS, DPM++ ...) they are the ones it steps
    with, and abar_t = 1 / (1 + sigma_t^2); elsewhere abar_t is the model's at the timestep. A flow-matching
    model's (x_t = (1 - t) x_0 + t eps) adds its t at each call (`flow_t`), its sigma and abar those of the same
    SNR: sigma_t = t / (1 - t); `flux_sigmas`: the sigmas Flux's pipeline hands its scheduler (`flux2`: with Flux 2's
    shift for the resolution)."""
    if is_flow(model_scheduler_config):
        return {schedule: _flow_schedule(model_scheduler_config, sampler, schedule, steps, flux_sigmas, flux2)
                for schedule in schedules}
    table = {}
    for schedule in schedules:
        error = schedule_error(sampler, schedule)
        if error is not None:
            raise ValueError(error)
        scheduler = make_scheduler(sampler, model_scheduler_config)
        set_schedule(scheduler, steps, schedule, unet_config=unet_config)
        timesteps = scheduler.timesteps.double().cpu().numpy()
        sigmas = getattr(scheduler, "sigmas", None)
        if isinstance(sigmas, torch.Tensor) and len(sigmas) == len(timesteps) + 1:
            sigma = sigmas[:len(timesteps)].double().cpu().numpy()
            alphas_cumprod = 1.0 / (1.0 + sigma ** 2)
        else:
            model_alphas_cumprod = scheduler.alphas_cumprod.double().cpu().numpy()
            alphas_cumprod = np.interp(timesteps, np.arange(len(model_alphas_cumprod)), model_alphas_cumprod)
            sigma = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
        table[schedule] = {"timesteps": timesteps.tolist(), "sigmas": sigma.tolist(),
                           "alphas_cumprod": alphas_cumprod.tolist()}
    return table


def _flow_schedule(config: dict, sampler: str, schedule: str, steps: int, flux_sigmas: bool, flux2: bool) -> dict:
    if schedule != DEFAULT_SCHEDULE:
        raise ValueError(f"{schedule} is tuned for DDPM models; a flow-matching model runs its own (shifted) schedule.")
    scheduler = make_transformer_scheduler(sampler, config)
    takes = inspect.signature(scheduler.set_timesteps).parameters
    extra = {}
    # Flux's pipeline hands its scheduler linspace(1, 1/n, n), unless the scheduler makes its own flow sigmas
    if flux_sigmas and "sigmas" in takes and not scheduler.config.get("use_flow_sigmas"):
        extra["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if config.get("use_dynamic_shifting") and "mu" in takes:
        # a resolution-shifted schedule (Flux) at 1024² (4,096 patches), where its shift is largest; Flux 2's shift
        # is fitted to the resolution and the step count
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
        extra["mu"] = compute_empirical_mu(image_seq_len=4096, num_steps=steps) if flux2 else \
            float(config.get("max_shift", 1.15))
    scheduler.set_timesteps(steps, **extra)
    timesteps = scheduler.timesteps.double().cpu().numpy()
    t = scheduler.sigmas[:len(timesteps)].double().cpu().numpy()
    return {"timesteps": timesteps.tolist(), "sigmas": (t / np.maximum(1 - t, 1e-12)).tolist(),
            "alphas_cumprod": ((1 - t) ** 2 / ((1 - t) ** 2 + t ** 2)).tolist(), "flow_t": t.tolist()}


def sampler_and_schedule(a1111_sampler: str, schedule_type: str | None) -> tuple[dict, str | None]:
    """An infotext's `Sampler` and `Schedule type` as settings ({"sampler": ours}, plus "schedule" for a schedule
    of ours other than Default, A1111's "Align Your Steps", where the sampler runs it), and the schedule type not
    kept (None: kept); the rest is `sampler_from_a1111`'s reading (pipelines/core/samplers.py)."""
    if schedule_type in SCHEDULES and schedule_type != DEFAULT_SCHEDULE:
        sampler, _ = sampler_from_a1111(a1111_sampler, None)
        if sampler in SAMPLERS and schedule_error(sampler, schedule_type) is None:
            return {"sampler": sampler, "schedule": schedule_type}, None
    sampler, dropped = sampler_from_a1111(a1111_sampler, schedule_type)
    return {"sampler": sampler}, dropped
