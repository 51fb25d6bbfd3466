"""The denoising loop's body (diffusers' step 7) one step at a time, for code that drives the loop
itself (the tasks' own loops, the explorer's take-over, speculative sampling). Each step exposes what
it computed:

    eps_u, eps_c      the UNet's predictions for the negative prompt and the prompt (one batched call)
    eps_perturbed     ... for the prompt with perturbed self-attention (PAG)
    eps_guided        classifier-free guidance: eps_u + w (eps_c - eps_u), then PAG, guidance rescale and
                      classifier guidance, as the request asks (pipelines/core/guidance.py)
    mean, variance    the transition x_t -> x_{t-1} as a Gaussian N(mean, variance I) where the
                      sampler makes one: a point mass (variance 0) for deterministic samplers, and
                      DDPM's posterior q(x_{t-1} | x_t, x̂_0) = N(mu_t, beta~_t I) for DDPM

ControlNet residuals and `cross_attention_kwargs` (LoRA scale) pass straight through to the UNet. A loop that
tells each step its place (`index`, `count`) gets the guidance interval; without it, CFG acts at every step.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from pipelines.core.call import PreparedCall
from pipelines.core.ddpm import ddpm_posterior
from pipelines.core.guidance import (ModelRows, PerturbedAttention, classifier_guided, in_interval,
                                     independent_prompt, pag_scale_at, uses_cfg)
from pipelines.core.prompts import prompt_arguments, prompt_texts
from pipelines.core.requests import SamplingSettings
from pipelines.core.samplers import STOCHASTIC
from pipelines.core.vae import execution_device


def prompt_embeddings(pipeline, request: SamplingSettings, device, *, cfg: bool, count: int = 1,
                      emphasis: bool = True, texts: tuple[str, str] | None = None) -> tuple[torch.Tensor, str | None]:
    """The loop's `prompt_embeds` for `count` images: [negative, positive] with CFG, positive alone without.
    `emphasis`: A1111's (word:1.2) and BREAK apply (pipelines/core/prompts.py); otherwise the text is read literally.
    `texts`: the prompt and negative prompt as the encoder reads them (a prepared call's, embedding names expanded);
    by default the request's, LoRA tags taken out."""
    embeddings, _, note = encoded_prompts(pipeline, request, device, cfg=cfg, count=count, emphasis=emphasis,
                                          texts=texts)
    return embeddings, note


def encoded_prompts(pipeline, request: SamplingSettings, device, *, cfg: bool, count: int = 1, emphasis: bool = True,
                    texts: tuple[str, str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    """`prompt_embeddings`, and the pooled text embeddings in the same rows for a UNet that also takes them
    (SDXL's second text encoder: `text_time` added conditioning), else None."""
    prompt, negative_prompt = texts if texts is not None else prompt_texts(request)[:2]
    if cfg and request.cfg_method == "ICG":   # the random prompt ĉ stands in for the negative prompt
        negative_prompt = independent_prompt(pipeline.tokenizer)
    prompts, note = prompt_arguments(pipeline, prompt, negative_prompt, device, emphasis=emphasis)
    arguments = {"prompt_embeds": prompts.get("prompt_embeds"),
                 "negative_prompt_embeds": prompts.get("negative_prompt_embeds")}
    with torch.no_grad():
        if takes_pooled_text(pipeline):
            positive, negative, pooled, negative_pooled = pipeline.encode_prompt(
                prompts.get("prompt"), device=device, num_images_per_prompt=count, do_classifier_free_guidance=cfg,
                negative_prompt=prompts.get("negative_prompt"), **arguments)
            pooled = torch.cat([negative_pooled, pooled]) if cfg else pooled
        else:
            positive, negative = pipeline.encode_prompt(prompts.get("prompt"), device, count, cfg,
                                                        prompts.get("negative_prompt"), **arguments)
            pooled = None
    return (torch.cat([negative, positive]) if cfg else positive), pooled, note


def takes_pooled_text(pipeline) -> bool:
    """Whether the pipeline's UNet takes SDXL's added conditioning: the pooled text and the size and crop ids."""
    unet = getattr(pipeline, "unet", None)
    return unet is not None and unet.config.addition_embed_type == "text_time"


def size_ids(unet, pooled: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SDXL's micro-conditioning for an image made at `height` × `width`, as diffusers' SDXL pipelines send it by
    default: original size, crop top-left (0, 0) and target size, one row per row of `pooled`."""
    ids = [height, width, 0, 0, height, width]
    taken = unet.add_embedding.linear_1.in_features
    given = unet.config.addition_time_embed_dim * len(ids) + pooled.shape[-1]
    if taken != given:     # a refiner's aesthetic score in place of the target size
        raise ValueError(f"This UNet's added conditioning takes {taken} numbers, not SDXL base's {given} (size, crop "
                         "and target size, and the pooled text): an SDXL refiner is not supported here.")
    return torch.tensor([ids], dtype=pooled.dtype, device=pooled.device).repeat(len(pooled), 1)


@dataclass
class NoisePrediction:
    eps_cond: torch.Tensor               # the model's prediction for the prompt
    eps_uncond: torch.Tensor | None      # ... for the negative prompt; None when CFG is off (at this step)
    eps_guided: torch.Tensor             # what the sampler uses
    eps_perturbed: torch.Tensor | None = None       # ... for the prompt under perturbed self-attention (PAG)
    classifier_gradient: torch.Tensor | None = None  # ∇_{x_t} log p(y | x_t) (classifier guidance)


@dataclass
class StepResult:
    latents: torch.Tensor                # x_{t-1}, as the sampler produced it
    prediction: NoisePrediction
    x0_pred: torch.Tensor | None         # the sampler's x̂_0, where it reports one
    mean: torch.Tensor | None            # the transition's mean (None: not a Gaussian we can name)
    variance: float | None               # ... and its variance, per coordinate


class Denoiser:
    """The denoising loop's body for one prepared call, one explicit step at a time, for a batch of
    `call.request.batch_size` images. A stochastic sampler draws its fresh noise from `generators`: pass the
    ones that drew the starting noise to continue them, as diffusers' loop does; the default restarts the
    seed (the explorer's take-over: "fresh noise from the seed, restarted at the branch")."""

    def __init__(self, call: PreparedCall, *, generators: list[torch.Generator] | None = None,
                 cross_attention_kwargs: dict | None = None, size: tuple[int, int] | None = None):
        pipeline, request = call.pipeline, call.request
        self.call = call
        self.unet = pipeline.unet
        self.scheduler = pipeline.scheduler
        self.guidance_scale = request.guidance_scale
        self.guidance_rescale = request.guidance_rescale
        self.cross_attention_kwargs = cross_attention_kwargs
        self.cfg = uses_cfg(pipeline, request.guidance_scale)
        self.request = request
        self.perturbed = PerturbedAttention(self.unet, request.pag_layers) if request.pag_scale > 0 else None
        self.classifier = call.classifier if request.classifier_scale > 0 else None
        self.embeddings, pooled, note = encoded_prompts(pipeline, request, call.device, cfg=self.cfg,
                                                        count=request.batch_size, texts=call.texts)
        if note:
            call.notes.append(note)
        # SDXL's added conditioning, in the embeddings' rows: the pooled text, and the size and crop ids of what is
        # generated (`size`, width × height: an outpainting's box may have another shape than the request's)
        width, height = size or (request.width, request.height)
        self.added = None if pooled is None else \
            {"text_embeds": pooled, "time_ids": size_ids(self.unet, pooled, height, width)}
        self.timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:  # guidance-distilled (LCM) UNets embed w
            self.timestep_cond = pipeline.get_guidance_scale_embedding(
                torch.tensor([request.guidance_scale - 1]), embedding_dim=self.unet.config.time_cond_proj_dim,
            ).to(device=call.device, dtype=self.unet.dtype)
        # What a stochastic sampler draws its fresh noise from (by default the seed, restarted)
        self.extra_step_kwargs = pipeline.prepare_extra_step_kwargs(generators or call.generators(0), 0.0)
        self.deterministic = request.sampler not in STOCHASTIC
        self._devices: dict[int, torch.device] = {}   # model id -> where it computes (predict_rows)

    def rows(self, index: int | None = None, count: int | None = None) -> ModelRows:
        """The rows the UNet call for step `index` of `count` stacks (CFG only inside the guidance interval)."""
        request = self.request
        return ModelRows(uncond=self.cfg and in_interval(request.cfg_start, request.cfg_end, index, count),
                         perturbed=self.perturbed is not None)

    def model_input(self, latents: torch.Tensor, t, rows: ModelRows) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaled UNet input and the prompt embeddings for `rows`, in the order [ε_u, ε_c, ε̃_c]."""
        sample = torch.cat([latents] * rows.chunks) if rows.chunks > 1 else latents
        return self.scheduler.scale_model_input(sample, t), self._in_rows(self.embeddings, rows)

    def added_conditions(self, rows: ModelRows) -> dict | None:
        """SDXL's `added_cond_kwargs` for `rows` (None for a UNet without added conditioning)."""
        return None if self.added is None else {key: self._in_rows(value, rows) for key, value in self.added.items()}

    def _in_rows(self, stacked: torch.Tensor, rows: ModelRows) -> torch.Tensor:
        """[negative; positive] rows (positive alone without CFG) in the order of the UNet call's `rows`."""
        count = self.call.request.batch_size
        positive = stacked[count:] if self.cfg else stacked
        return torch.cat([*([stacked[:count]] if rows.uncond else []), positive,
                          *([positive] if rows.perturbed else [])])

    def predict(self, latents: torch.Tensor, t, *, index: int | None = None, count: int | None = None,
                extra_channels: torch.Tensor | None = None, down_block_additional_residuals=None,
                mid_block_additional_residual=None) -> NoisePrediction:
        """ε_u, ε_c (and ε̃_c) from one batched UNet call, and the guided prediction. `extra_channels` are
        appended to the scaled input (an inpainting UNet's mask and masked-image latents); ControlNet residuals
        must have `self.rows(index, count)`'s rows."""
        rows = self.rows(index, count)
        model_input, embeddings = self.model_input(latents, t, rows)
        if extra_channels is not None:
            model_input = torch.cat([model_input, torch.cat([extra_channels] * rows.chunks)], dim=1)
        perturbation = self.perturbed.applied(rows.uncond) if rows.perturbed else nullcontext()
        with torch.no_grad(), perturbation:
            noise_pred = self.unet(model_input, t, encoder_hidden_states=embeddings,
                                   timestep_cond=self.timestep_cond, cross_attention_kwargs=self.cross_attention_kwargs,
                                   added_cond_kwargs=self.added_conditions(rows),
                                   down_block_additional_residuals=down_block_additional_residuals,
                                   mid_block_additional_residual=mid_block_additional_residual, return_dict=False)[0]
        prediction = self._guided(noise_pred, rows, t)
        if self.classifier is not None:
            x_t = model_input[:len(latents), :latents.shape[1]]   # the variance-preserving x_t the UNet saw
            prediction.eps_guided, prediction.classifier_gradient = classifier_guided(
                prediction.eps_guided, x_t, t, self.scheduler.alphas_cumprod, self.classifier,
                self.call.classifier_index, self.request.classifier_scale)
        return prediction

    def _guided(self, noise_pred: torch.Tensor, rows: ModelRows, t=None) -> NoisePrediction:
        chunks = list(noise_pred.chunk(rows.chunks))
        eps_uncond = chunks.pop(0) if rows.uncond else None
        eps_cond = chunks.pop(0)
        eps_perturbed = chunks.pop(0) if rows.perturbed else None
        guided = eps_cond
        if eps_uncond is not None:   # classifier-free guidance: eps_u + w (eps_c - eps_u)
            guided = eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)
        if eps_perturbed is not None:   # PAG: + s (eps_c - eps~_c)
            scale = pag_scale_at(self.request.pag_scale, self.request.pag_adaptive_scale, t)
            guided = guided + scale * (eps_cond - eps_perturbed)
        if eps_uncond is not None and self.guidance_rescale > 0.0:
            guided = rescale_noise_cfg(guided, eps_cond, guidance_rescale=self.guidance_rescale)
        return NoisePrediction(eps_cond=eps_cond, eps_uncond=eps_uncond, eps_guided=guided,
                               eps_perturbed=eps_perturbed)

    def predict_rows(self, latents: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor, *,
                     unet=None) -> torch.Tensor:
        """The guided prediction for states of different images at different timesteps, in one batched
        call: row j is image `rows[j]` of the batch at `timesteps[j]` (speculative sampling verifies a
        whole draft this way). `unet` replaces the model (a draft UNet reading the same prompt embeddings;
        LoRA scales are not passed to it)."""
        model = unet if unet is not None else self.unet
        count = self.call.request.batch_size
        rows = rows.to(self.embeddings.device)

        def picked(stacked: torch.Tensor) -> torch.Tensor:     # each row's image, negative rows first with CFG
            return torch.cat([stacked[:count][rows], stacked[count:][rows]]) if self.cfg else stacked[rows]
        embeddings = picked(self.embeddings)
        added = None if self.added is None else {key: picked(value) for key, value in self.added.items()}
        model_input, timesteps = (torch.cat([latents, latents]), torch.cat([timesteps, timesteps])) if self.cfg \
            else (latents, timesteps)
        if id(model) not in self._devices:    # walking the modules for offload hooks costs ~1 ms a call
            self._devices[id(model)] = execution_device(model)
        device = self._devices[id(model)]
        timestep_cond = None if self.timestep_cond is None or unet is not None else \
            self.timestep_cond.expand(len(model_input), -1)
        with torch.no_grad():
            noise_pred = model(model_input.to(device, model.dtype), timesteps.to(device),
                               encoder_hidden_states=embeddings.to(device, model.dtype), timestep_cond=timestep_cond,
                               added_cond_kwargs=None if added is None else
                               {key: value.to(device, model.dtype) for key, value in added.items()},
                               cross_attention_kwargs=None if unet is not None else self.cross_attention_kwargs,
                               return_dict=False)[0]
        return self._guided(noise_pred.to(latents.device, latents.dtype), ModelRows(self.cfg, False)).eps_guided

    def step(self, latents: torch.Tensor, t, **inputs) -> StepResult:
        """Predict at (x_t, t) and let the sampler take its step to x_{t-1} (`inputs`: `predict`'s)."""
        prediction = self.predict(latents, t, **inputs)
        with torch.no_grad():
            output = self.scheduler.step(prediction.eps_guided, t, latents, **self.extra_step_kwargs,
                                         return_dict=True)
        previous = output.prev_sample
        x0_pred = getattr(output, "pred_original_sample", None)
        mean, variance = self._transition(previous, x0_pred, latents, t)
        return StepResult(latents=previous, prediction=prediction, x0_pred=x0_pred, mean=mean, variance=variance)

    def _transition(self, previous, x0_pred, latents, t) -> tuple[torch.Tensor | None, float | None]:
        if self.deterministic:
            return previous, 0.0
        scheduler = self.scheduler
        if isinstance(scheduler, DDPMScheduler) and x0_pred is not None and scheduler.variance_type == "fixed_small":
            return ddpm_posterior(scheduler, x0_pred, latents, int(t))
        return None, None
