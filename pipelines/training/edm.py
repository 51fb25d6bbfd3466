"""Training on a UNet of the EDM formulation (Karras et al. 2022; Playground v2.5 is SDXL trained so): its noise
levels are σ from 0.002 to 80, x_σ = x_0 + σ·ε, and the UNet F sees them preconditioned:

    D(x_σ) = c_skip(σ)·x_σ + c_out(σ)·F(c_in(σ)·x_σ, c_noise(σ)),   c_in = 1/√(σ² + σ_d²),  c_noise = ¼·log σ

The loss is the denoised image's error, ‖D(x_σ) − x_0‖², as diffusers' EDM-style DreamBooth script trains these
models (σ drawn uniformly from the scheduler's training levels, unweighted). It is written here on F, whose target
is (x_0 − c_skip·x_σ)/c_out, each row weighted by c_out² (the same number), so that the loop's UNet call and its
squared error are the same as for a DDPM model. Min-SNR weighting, defined on DDPM's ᾱ_t, is not applied.
"""

from __future__ import annotations

import torch

from pipelines.core.samplers import is_edm, make_scheduler

MIN_SNR_NOTE = ("This model is trained in the EDM formulation: its loss is the denoised image's error, as diffusers' "
                "EDM-style training has it, and min-SNR γ (defined on DDPM's ᾱ_t) is not applied.")


def training_schedule(model_scheduler_config: dict):
    """The forward process the model was trained on: DDPM's q(x_t | x_0) from its betas, or an EDM model's σ levels
    (diffusers' EDM Euler scheduler as built, before any `set_timesteps`: its training σ and their c_noise)."""
    if is_edm(model_scheduler_config):
        return make_scheduler("Euler", model_scheduler_config)
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(model_scheduler_config)


def is_edm_schedule(scheduler) -> bool:
    return type(scheduler).__name__.startswith("EDM")


def edm_batch(scheduler, x0: torch.Tensor, noise: torch.Tensor, indices: torch.Tensor) -> dict:
    """The UNet's input and timestep, F's target and each row's weight, at the training levels `indices`."""
    sigma = scheduler.sigmas[indices.cpu()].to(x0.device, torch.float32).view(-1, 1, 1, 1)
    x_sigma = x0.float() + sigma * noise.float()
    skipped = scheduler.precondition_outputs(x_sigma, torch.zeros_like(x_sigma), sigma)      # c_skip·x_σ
    c_out = scheduler.precondition_outputs(torch.zeros_like(sigma), torch.ones_like(sigma), sigma)
    return {"x_t": scheduler.precondition_inputs(x_sigma, sigma).to(x0.dtype),
            "t": scheduler.timesteps[indices.cpu()].to(x0.device),
            "target": ((x0.float() - skipped) / c_out).to(x0.dtype), "row_weight": c_out.flatten() ** 2}
