"""The scaffolding of a denoising loop that a task drives itself (inpainting, ControlNet): the timesteps a
strength leaves, the start noised to the first of them, and the loop that calls back after every step
and stops at the pipeline's interrupt, as diffusers' own loop does (`callback_on_step_end`).

A task writes only its step: `run_steps(call, timesteps, latents, step)` calls
`step(index, t, latents) -> (latents, tensors)` and hands the callback `{"latents": ..., **tensors}`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

# (step index, timestep, x_t) -> (x_{t-1}, further tensors the callback may see)
Step = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


def strength_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The schedule's last `strength` share, as diffusers' img2img and inpainting pipelines take it
    (`set_timesteps` has run)."""
    start = steps - min(int(steps * strength), steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order:]


def noised_start(scheduler, image_latents: torch.Tensor, timesteps: torch.Tensor, generators) -> tuple[
        torch.Tensor, torch.Tensor]:
    """SDEdit's start: the image's latents noised to the first timestep, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
    Returns (x_t, eps); eps is drawn from the images' CPU generators."""
    noise = randn_tensor(image_latents.shape, generator=generators, device=image_latents.device,
                         dtype=image_latents.dtype)
    return scheduler.add_noise(image_latents, noise, timesteps[:1]), noise


def begin(pipeline, steps: int) -> None:
    """What diffusers' loop sets before its first step: the step count its progress reads, no interrupt."""
    pipeline._num_timesteps, pipeline._interrupt = steps, False


def run_steps(call, timesteps: torch.Tensor, latents: torch.Tensor, step: Step, *, callback=None) -> torch.Tensor:
    """Run `step` over `timesteps` from `latents`; after each, `callback(pipeline, index, t, tensors)` (which may
    replace the latents) and a stop at the pipeline's interrupt. Returns the last latents."""
    pipeline = call.pipeline
    begin(pipeline, len(timesteps))
    for index, t in enumerate(timesteps):
        latents, tensors = step(index, t, latents)
        if callback is not None:
            latents = callback(pipeline, index, t, {"latents": latents, **tensors}).get("latents", latents)
        if pipeline._interrupt:
            break
    return latents
