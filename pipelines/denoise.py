"""One way into the denoising loop, for the generator, the explorer and the samplers to come.

`prepare(models, request)` turns a task request into a `PreparedCall`: the task's pipeline with the
request's sampler (built from the model's own scheduler config), the prompts (in windows when too
long), the size checked once, and the seeds. Calling it runs diffusers' own loop for one batch,
with CPU-seeded noise, so a seed gives the same image on any device.

`Denoiser` is that loop's body (diffusers' step 7) one step at a time, for code that drives the
loop itself (the explorer's take-over, speculative sampling). Each step exposes what it computed:

    eps_u, eps_c      the UNet's predictions for the negative prompt and the prompt (one batched call)
    eps_guided        classifier-free guidance: eps_u + w (eps_c - eps_u), then guidance rescale
    mean, variance    the transition x_t -> x_{t-1} as a Gaussian N(mean, variance I) where the
                      sampler makes one: a point mass (variance 0) for deterministic samplers, and
                      DDPM's posterior q(x_{t-1} | x_t, x̂_0) = N(mu_t, beta~_t I) for DDPM

ControlNet residuals and `cross_attention_kwargs` (LoRA scale) pass straight through to the UNet.

`decode` is the one VAE decode (with the fp16 overflow fix) and `encode` the one encode.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from PIL import Image

from pipelines.lora import LoraUse, split_lora_tags
from pipelines.prompts import prompt_arguments
from pipelines.samplers import STOCHASTIC, make_scheduler
from pipelines.speculative import MODEL_DRAFTS, check_supported, run_speculative
from pipelines.tasks import SamplingSettings, Task, task_of

VAE_UPCAST_NOTE = "The VAE overflowed in fp16 (the black-image bug), so it now decodes in fp32."


# ----------------------------------------------------------------------------- the VAE


def _latent_stats(vae) -> tuple[float, float]:
    # SD3/Flux VAEs also have a `shift_factor`: latents = (mean - shift) * scale
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


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
        mean = vae.encode(images.to(execution_device(vae), vae.dtype)).latent_dist.mean
    return (mean - shift) * scaling


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def check_size(width: int, height: int, multiple: int) -> None:
    if width % multiple or height % multiple:
        raise ValueError(f"`height` and `width` have to be divisible by {multiple} but are {height} and {width}.")


# ----------------------------------------------------------------------------- one prepared call


@contextmanager
def exposed_tensors(pipeline, names: tuple[str, ...]):
    """Let callback_on_step_end see more of the denoising loop's locals (e.g. `noise_pred`), for one call."""
    own = "_callback_tensor_inputs" in vars(pipeline)
    saved = pipeline._callback_tensor_inputs
    pipeline._callback_tensor_inputs = [*saved, *(name for name in names if name not in saved)]
    try:
        yield
    finally:
        if own:
            pipeline._callback_tensor_inputs = saved
        else:
            del pipeline._callback_tensor_inputs


@dataclass
class PreparedCall:
    """A request made ready for its task's pipeline; call it once per batch."""

    request: SamplingSettings          # resolved: the seed is concrete
    task: Task
    model: Any                         # the LoadedModel it runs on
    pipeline: Any                      # the task's pipeline, with the request's sampler
    prompts: dict                      # prompt / negative_prompt, or their embeddings when chunked
    device: torch.device
    notes: list[str] = field(default_factory=list)
    loras: dict = field(default_factory=dict)   # name -> LoadedLora, the LoRAs the prompt switched on
    draft: Any = None                  # the draft UNet, for the DDPM speculative sampler's "draft model"
    speculative: list = field(default_factory=list)   # its ChainStats, one per image generated so far
    controlnets: dict = field(default_factory=dict)   # name -> ControlNetModel, for the request's units

    def generators(self, batch_index: int) -> list[torch.Generator]:
        """Image i of batch b draws its noise from seed + b * batch_size + i, on the CPU."""
        return [torch.Generator("cpu").manual_seed(self.request.seed_for(batch_index, i))
                for i in range(self.request.batch_size)]

    def arguments(self, batch_index: int = 0, *, generators: list[torch.Generator] | None = None) -> dict:
        """The diffusers call's keyword arguments for one batch (latents out)."""
        request = self.request
        arguments = dict(self.prompts, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                         num_images_per_prompt=request.batch_size, output_type="latent",
                         generator=generators if generators is not None else self.generators(batch_index),
                         **request.pipeline_arguments())
        if request.guidance_rescale > 0.0:  # not every pipeline takes it
            arguments["guidance_rescale"] = request.guidance_rescale
        return arguments

    def __call__(self, batch_index: int = 0, *, generators: list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, callback=None, expose: tuple[str, ...] = ()) -> torch.Tensor:
        """Run diffusers' loop for batch `batch_index`; returns its final latents.

        `latents` replaces the initial noise (drawn from `generators`); `callback` is
        callback_on_step_end, which also sees the loop's tensors named in `expose`.
        """
        if self.request.speculative:
            return run_speculative(self, batch_index, generators=generators, latents=latents, callback=callback,
                                   expose=expose)
        if self.task.run is not None:
            return self.task.run(self, batch_index, generators=generators, latents=latents, callback=callback,
                                 expose=expose)
        if hasattr(self.pipeline.scheduler, "noise_sampler_seed"):
            # DPM++ SDE draws its Brownian noise from torch's global RNG unless seeded: one tree per image
            self.pipeline.scheduler.noise_sampler_seed = [self.request.seed_for(batch_index, i)
                                                          for i in range(self.request.batch_size)]
        arguments = self.arguments(batch_index, generators=generators)
        if latents is not None:
            arguments["latents"] = latents
        if callback is None:
            return self.pipeline(**arguments).images
        arguments.update(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", *expose])
        with exposed_tensors(self.pipeline, expose):
            return self.pipeline(**arguments).images

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """The call's latents as the task's final images (noting an fp16 VAE upcast)."""
        images, upcast = decode(self.pipeline.vae, latents)
        if upcast and VAE_UPCAST_NOTE not in self.notes:
            self.notes.append(VAE_UPCAST_NOTE)
        return [self.request.composite(image) for image in to_pil(images)]


def prepare(models, request: SamplingSettings) -> PreparedCall:
    """Check `request` against the loaded model and set up its pipeline (on the device thread)."""
    # 1. Check inputs and resolve the seed
    if not isinstance(request, SamplingSettings):
        raise ValueError(f"Expected a task request (e.g. Txt2ImgRequest) but received {type(request).__name__}.")
    request = request.resolved()
    task = task_of(request)
    model = models.require()
    pipeline = models.pipeline(task.name)
    # diffusers' SD pipelines require multiples of 8 whatever the VAE's factor
    check_size(request.width, request.height, max(8, pipeline.vae_scale_factor))
    if request.speculative:
        check_supported(task, pipeline, model.name)
    if request.unchanged_image() is None:
        request.check_steps()
    for name in request.controlnet_names():   # loaded first, so that the memory budget counts them
        models.controlnet(name)
    models.fit(request)
    controlnets = {name: models.controlnet(name) for name in request.controlnet_names()}   # beside the UNet
    # 2. Sampler from the model's own scheduler config
    pipeline.scheduler = make_scheduler(request.sampler, model.scheduler_config)
    # 3. LoRAs named in the prompt (<lora:name:weight>), then the prompts (weighted, in windows when too long)
    prompt, negative_prompt, uses, lora_notes = prompt_texts(request)
    loras = models.use_loras(uses)
    lora_notes += [f"LoRA {use.name}: weight {use.weight:g}, {loras[use.name].modules} modules patched."
                   for use in uses]
    device = pipeline._execution_device
    prompts, note = prompt_arguments(pipeline, prompt, negative_prompt, device)
    notes = request.notes() + lora_notes + ([note] if note else [])
    side = model.native_side
    if side and max(request.width, request.height) > 2 * side:
        notes.append(f"{request.width}×{request.height} is more than twice this model's native size ({side} px): "
                     "expect repeated patterns or doubled subjects. Generate at its native size and upscale.")
    draft = models.draft_unet() if request.speculative and request.draft in MODEL_DRAFTS else None
    return PreparedCall(request=request, task=task, model=model, pipeline=pipeline, prompts=prompts, device=device,
                        notes=notes, loras=loras, draft=draft, controlnets=controlnets)


def prompt_texts(request: SamplingSettings) -> tuple[str, str, list[LoraUse], list[str]]:
    """The prompt and negative prompt as the text encoder reads them (LoRA tags taken out), the LoRAs the
    prompt asks for, and notes. Tags in the negative prompt are taken out and not applied, as in A1111."""
    prompt, uses = split_lora_tags(request.prompt)
    negative_prompt, ignored = split_lora_tags(request.negative_prompt)
    notes = [f"<lora:{use.name}:…> in the negative prompt is not applied; LoRAs go in the prompt."
             for use in ignored]
    return prompt, negative_prompt, uses, notes


# ----------------------------------------------------------------------------- one step at a time


def uses_cfg(pipeline, guidance_scale: float) -> bool:
    """StableDiffusionPipeline.do_classifier_free_guidance for this scale (guidance-distilled UNets embed it)."""
    return guidance_scale > 1 and pipeline.unet.config.time_cond_proj_dim is None


def prompt_embeddings(pipeline, request: SamplingSettings, device, *, cfg: bool, count: int = 1,
                      emphasis: bool = True) -> tuple[torch.Tensor, str | None]:
    """The loop's `prompt_embeds` for `count` images: [negative, positive] with CFG, positive alone without.
    `emphasis`: A1111's (word:1.2) and BREAK apply (pipelines/prompts.py); otherwise the text is read literally."""
    prompt, negative_prompt, _, _ = prompt_texts(request)
    prompts, note = prompt_arguments(pipeline, prompt, negative_prompt, device, emphasis=emphasis)
    with torch.no_grad():
        positive, negative = pipeline.encode_prompt(
            prompts.get("prompt"), device, count, cfg, prompts.get("negative_prompt"),
            prompt_embeds=prompts.get("prompt_embeds"), negative_prompt_embeds=prompts.get("negative_prompt_embeds"))
    return (torch.cat([negative, positive]) if cfg else positive), note


@dataclass
class NoisePrediction:
    eps_cond: torch.Tensor               # the model's prediction for the prompt
    eps_uncond: torch.Tensor | None      # ... for the negative prompt; None when CFG is off
    eps_guided: torch.Tensor             # what the sampler uses


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
                 cross_attention_kwargs: dict | None = None):
        pipeline, request = call.pipeline, call.request
        self.call = call
        self.unet = pipeline.unet
        self.scheduler = pipeline.scheduler
        self.guidance_scale = request.guidance_scale
        self.guidance_rescale = request.guidance_rescale
        self.cross_attention_kwargs = cross_attention_kwargs
        self.cfg = uses_cfg(pipeline, request.guidance_scale)
        self.embeddings, note = prompt_embeddings(pipeline, request, call.device, cfg=self.cfg,
                                                  count=request.batch_size)
        if note:
            call.notes.append(note)
        self.timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:  # guidance-distilled (LCM) UNets embed w
            self.timestep_cond = pipeline.get_guidance_scale_embedding(
                torch.tensor([request.guidance_scale - 1]), embedding_dim=self.unet.config.time_cond_proj_dim,
            ).to(device=call.device, dtype=self.unet.dtype)
        # What a stochastic sampler draws its fresh noise from (by default the seed, restarted)
        self.extra_step_kwargs = pipeline.prepare_extra_step_kwargs(generators or call.generators(0), 0.0)
        self.deterministic = request.sampler not in STOCHASTIC
        self._devices: dict[int, torch.device] = {}   # model id -> where it computes (predict_rows)

    def predict(self, latents: torch.Tensor, t, *, extra_channels: torch.Tensor | None = None,
                down_block_additional_residuals=None, mid_block_additional_residual=None) -> NoisePrediction:
        """eps_u, eps_c from one batched UNet call (CFG), and the guided prediction. `extra_channels` are
        appended to the scaled input (an inpainting UNet's mask and masked-image latents)."""
        model_input = torch.cat([latents] * 2) if self.cfg else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        if extra_channels is not None:
            model_input = torch.cat([model_input, torch.cat([extra_channels] * 2) if self.cfg else extra_channels],
                                    dim=1)
        with torch.no_grad():
            noise_pred = self.unet(model_input, t, encoder_hidden_states=self.embeddings,
                                   timestep_cond=self.timestep_cond, cross_attention_kwargs=self.cross_attention_kwargs,
                                   down_block_additional_residuals=down_block_additional_residuals,
                                   mid_block_additional_residual=mid_block_additional_residual, return_dict=False)[0]
        return self._guided(noise_pred)

    def _guided(self, noise_pred: torch.Tensor) -> NoisePrediction:
        if not self.cfg:
            return NoisePrediction(eps_cond=noise_pred, eps_uncond=None, eps_guided=noise_pred)
        eps_uncond, eps_cond = noise_pred.chunk(2)
        # classifier-free guidance: eps_u + w (eps_c - eps_u)
        guided = eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)
        if self.guidance_rescale > 0.0:
            guided = rescale_noise_cfg(guided, eps_cond, guidance_rescale=self.guidance_rescale)
        return NoisePrediction(eps_cond=eps_cond, eps_uncond=eps_uncond, eps_guided=guided)

    def predict_rows(self, latents: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor, *,
                     unet=None) -> torch.Tensor:
        """The guided prediction for states of different images at different timesteps, in one batched
        call: row j is image `rows[j]` of the batch at `timesteps[j]` (speculative sampling verifies a
        whole draft this way). `unet` replaces the model (a draft UNet reading the same prompt embeddings;
        LoRA scales are not passed to it)."""
        model = unet if unet is not None else self.unet
        count = self.call.request.batch_size
        rows = rows.to(self.embeddings.device)
        if self.cfg:
            embeddings = torch.cat([self.embeddings[:count][rows], self.embeddings[count:][rows]])
            model_input, timesteps = torch.cat([latents, latents]), torch.cat([timesteps, timesteps])
        else:
            embeddings, model_input = self.embeddings[rows], latents
        if id(model) not in self._devices:    # walking the modules for offload hooks costs ~1 ms a call
            self._devices[id(model)] = execution_device(model)
        device = self._devices[id(model)]
        timestep_cond = None if self.timestep_cond is None or unet is not None else \
            self.timestep_cond.expand(len(model_input), -1)
        with torch.no_grad():
            noise_pred = model(model_input.to(device, model.dtype), timesteps.to(device),
                               encoder_hidden_states=embeddings.to(device, model.dtype), timestep_cond=timestep_cond,
                               cross_attention_kwargs=None if unet is not None else self.cross_attention_kwargs,
                               return_dict=False)[0]
        return self._guided(noise_pred.to(latents.device, latents.dtype)).eps_guided

    def step(self, latents: torch.Tensor, t, **unet_inputs) -> StepResult:
        """Predict at (x_t, t) and let the sampler take its step to x_{t-1}."""
        prediction = self.predict(latents, t, **unet_inputs)
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


def ddpm_posterior(scheduler, x0_pred: torch.Tensor, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, float]:
    """DDPM's reverse transition q(x_{t-1} | x_t, x̂_0) = N(mu_t, beta~_t I) (Ho et al. 2020, eq. 7):

        mu_t     = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x̂_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        beta~_t  = (1 - abar_{t-1}) / (1 - abar_t) beta_t

    where t-1 is the previous timestep of the sampler's (possibly strided) schedule and
    alpha_t = abar_t / abar_{t-1}. At the last step (t-1 < 0) the transition is the point mu_t.
    """
    previous_t = scheduler.previous_timestep(t)
    previous_t = int(previous_t) if not isinstance(previous_t, int) else previous_t
    alpha_bar = float(scheduler.alphas_cumprod[t])
    alpha_bar_prev = float(scheduler.alphas_cumprod[previous_t]) if previous_t >= 0 else 1.0
    alpha = alpha_bar / alpha_bar_prev
    beta = 1.0 - alpha
    mean = (math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)) * x0_pred \
        + (math.sqrt(alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)) * x_t
    variance = max((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, 1e-20) if t > 0 else 0.0
    return mean, variance
