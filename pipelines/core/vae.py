"""The VAE: the one decode (with the fp16 overflow fix) and the one encode, and where a module computes.

Latent diffusion works on the VAE's latents, scaled so that they have about unit variance
(`scaling_factor`, and `shift_factor` for SD3/Flux VAEs): z = (mean(E(x)) - shift) * scale.
"""

from __future__ import annotations

import torch

VAE_UPCAST_NOTE = "The VAE overflowed in fp16 (the black-image bug), so it now decodes in fp32."


def _latent_stats(vae) -> tuple[float, float]:
    # SD3/Flux VAEs also have a `shift_factor`: latents = (mean - shift) * scale; Flux 2's has neither (its pipeline
    # normalises the patchified latents by the VAE's batch-norm statistics instead: transformers.flux2_to_vae)
    return float(getattr(vae.config, "scaling_factor", None) or 1.0), float(getattr(vae.config, "shift_factor", None)
                                                                          or 0.0)


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
    scaling, shift = _latent_stats(vae)
    device = execution_device(vae)
    with torch.no_grad():
        images = vae.decode(latents.to(device, vae.dtype) / scaling + shift).sample
        if vae.dtype == torch.float16 and not torch.isfinite(images).all():
            vae.to(torch.float32)
            return vae.decode(latents.to(device, torch.float32) / scaling + shift).sample, True
    return images, False


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> latents as the UNet sees them: the encoder's posterior mean (not a sample,
    so x_0 is deterministic), shifted and scaled."""
    scaling, shift = _latent_stats(vae)
    with torch.no_grad():
        encoded = vae.encode(images.to(execution_device(vae), vae.dtype))
        # a KL autoencoder gives a posterior; Sana's deep compression autoencoder (DC-AE) the latent itself
        mean = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latent
    return (mean - shift) * scaling


def check_size(width: int, height: int, multiple: int) -> None:
    if width % multiple or height % multiple:
        raise ValueError(f"`height` and `width` have to be divisible by {multiple} but are {height} and {width}.")
