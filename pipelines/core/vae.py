"""The VAE: the one decode (with the fp16 overflow fix) and the one encode, and where a module computes.

Latent diffusion works on the VAE's latents, scaled so that they have about unit variance
(`scaling_factor`, and `shift_factor` for SD3/Flux VAEs, a mean and a deviation per channel for Playground v2.5's):
z = (mean(E(x)) - shift) * scale / deviation.
"""

from __future__ import annotations

import torch

VAE_UPCAST_NOTE = "The VAE overflowed in fp16 (the black-image bug), so it now decodes in fp32."


def _latent_stats(vae) -> tuple[float, float | torch.Tensor, torch.Tensor | None]:
    """(scale, shift, deviation): latents = (mean - shift) * scale / deviation. SD3/Flux VAEs also have a
    `shift_factor`; Flux 2's has neither (its pipeline normalises the patchified latents by the VAE's batch-norm
    statistics instead: transformers.flux2_to_vae); Playground v2.5's a mean and a deviation per channel
    (`latents_mean`, `latents_std`), read as diffusers' SDXL pipelines read them (None: no deviation)."""
    scale = float(getattr(vae.config, "scaling_factor", None) or 1.0)
    means, deviations = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if means is not None and deviations is not None and len(means) == len(deviations) == vae.config.latent_channels:
        return scale, torch.tensor(means).view(1, -1, 1, 1), torch.tensor(deviations).view(1, -1, 1, 1)
    return scale, float(getattr(vae.config, "shift_factor", None) or 0.0), None


def _unscaled(latents: torch.Tensor, scale: float, shift, deviation) -> torch.Tensor:
    """What the decoder reads, in diffusers' order of operations (the last bit of a pixel depends on it)."""
    if deviation is None:
        return latents / scale + shift
    return latents * deviation.to(latents) / scale + shift.to(latents)


def execution_device(module) -> torch.device:
    """Where `module` computes: under CPU offload its weights wait on the CPU (or `meta`) and an
    accelerate hook moves them to the GPU for each call, so its inputs must go there, not to `module.device`
    (as diffusers' `_execution_device` finds it)."""
    for part in module.modules():
        device = getattr(getattr(part, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return module.device


def decode(vae, latents: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Latents (scaled, as the UNet sees them) -> images in about [-1, 1].

    fp16 VAEs of SD 1.x/XL can overflow to NaN (the black-image bug); then the VAE is upcast to
    fp32 for good and the decode repeated. Returns (images, whether an upcast happened).
    """
    stats = _latent_stats(vae)
    device = execution_device(vae)
    with torch.no_grad():
        images = vae.decode(_unscaled(latents.to(device, vae.dtype), *stats)).sample
        if vae.dtype == torch.float16 and not torch.isfinite(images).all():
            vae.to(torch.float32)
            return vae.decode(_unscaled(latents.to(device, torch.float32), *stats)).sample, True
    return images, False


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> latents as the UNet sees them: the encoder's posterior mean (not a sample,
    so x_0 is deterministic), shifted and scaled."""
    scaling, shift, deviation = _latent_stats(vae)
    with torch.no_grad():
        encoded = vae.encode(images.to(execution_device(vae), vae.dtype))
        # a KL autoencoder gives a posterior; Sana's deep compression autoencoder (DC-AE) the latent itself
        mean = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latent
    if deviation is None:
        return (mean - shift) * scaling
    return (mean - shift.to(mean)) * scaling / deviation.to(mean)


def check_size(width: int, height: int, multiple: int) -> None:
    if width % multiple or height % multiple:
        raise ValueError(f"`height` and `width` have to be divisible by {multiple} but are {height} and {width}.")
