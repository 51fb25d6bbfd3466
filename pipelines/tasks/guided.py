"""Text-to-Image and Image-to-Image with guidance beyond plain CFG (PAG, the guidance interval, ICG, classifier
guidance) or another schedule: diffusers' loop, step for step, with the shared Denoiser's step
(pipelines/core/denoiser.py), which applies the request's guidance. Plain CFG on the sampler's own schedule
runs through the diffusers pipeline call itself, as before.

The start is made by the task's own diffusers pipeline (`prepare_latents`: the noise, or the input image
encoded and noised to the strength), so the same request gives the same image on either path.
"""

from __future__ import annotations

import inspect

import torch

from pipelines.core.denoiser import Denoiser
from pipelines.core.loop import run_steps, strength_timesteps
from pipelines.core.schedules import set_schedule


def run_text_or_image(call, batch_index: int, *, generators=None, latents=None, callback=None, expose=()
                      ) -> torch.Tensor:
    """Text-to-Image's and Image-to-Image's `run`: diffusers' call for plain CFG, else `run_guided` (also for a
    guidance rescale the pipeline's call does not take: diffusers' Image-to-Image swallows it unused)."""
    request = call.request
    takes_rescale = "guidance_rescale" in inspect.signature(type(call.pipeline).__call__).parameters
    if request.plain_guidance() and (request.guidance_rescale == 0.0 or takes_rescale):
        return call.run_pipeline(batch_index, generators=generators, latents=latents, callback=callback,
                                 expose=expose)
    return run_guided(call, batch_index, generators=generators, latents=latents, callback=callback, expose=expose)


def run_guided(call, batch_index: int, *, generators=None, latents=None, callback=None, expose=()) -> torch.Tensor:
    """One batch through the Denoiser, from noise (Text-to-Image) or from `image` at `strength` (Image-to-Image,
    as the request's `pipeline_arguments` give them); latents out. The callback may see `noise_pred` (the guided
    prediction)."""
    request, pipeline = call.request, call.pipeline
    scheduler, unet = pipeline.scheduler, pipeline.unet
    device, batch = call.device, request.batch_size
    dtype = pipeline.text_encoder.dtype if pipeline.text_encoder is not None else unet.dtype
    generators = generators or call.generators(batch_index)
    call.seed_brownian_noise(batch_index)
    denoiser = Denoiser(call, generators=generators)

    # 1. Timesteps: the schedule, cut to the strength for Image-to-Image
    set_schedule(scheduler, request.steps, request.schedule, unet_config=unet.config, device=device)
    timesteps = scheduler.timesteps
    image = request.pipeline_arguments().get("image")
    # 2. The start, made as diffusers' own call makes it
    if image is not None:
        timesteps = strength_timesteps(scheduler, request.steps, request.strength)
        if latents is None:
            pixels = pipeline.image_processor.preprocess(image)
            latents = pipeline.prepare_latents(pixels, timesteps[:1].repeat(batch), 1, batch, dtype, device,
                                               generators)
    elif latents is None:
        latents = pipeline.prepare_latents(batch, unet.config.in_channels, request.height, request.width, dtype,
                                           device, generators)
    else:
        latents = latents.to(device) * scheduler.init_noise_sigma

    # 3. The loop, each step told its place (the guidance interval reads it)
    def step(index, t, latents):
        result = denoiser.step(latents, t, index=index, count=len(timesteps))
        return result.latents, ({"noise_pred": result.prediction.eps_guided} if "noise_pred" in expose else {})

    return run_steps(call, timesteps, latents, step, callback=callback)
