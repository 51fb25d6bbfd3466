"""One way into the denoising loop, for the generator, the explorer and the samplers to come.

`prepare(models, request)` turns a task request into a `PreparedCall`: the task's pipeline with the
request's sampler (built from the model's own scheduler config), the prompts (in windows when too
long), the size checked once, and the seeds. Calling it runs one batch, with CPU-seeded noise, so a
seed gives the same image on any device: through the sampler's own loop where it has one (speculative
DDPM, registered by pipelines/sampling/), else the task's (inpainting, ControlNet), else diffusers'.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pipelines.core.fast import fast_notes, lcm_sampler_notes, made_fast
from pipelines.core.guidance import PerturbedAttention, guidance_notes, only_icg
from pipelines.core.images import to_pil
from pipelines.core.prompts import LoraUse, prompt_arguments, prompt_texts
from pipelines.core.registry import Task, task_of
from pipelines.core.requests import SamplingSettings
from pipelines.core.samplers import MODEL_DRAFTS, edm_default, edm_refusal, is_edm, make_scheduler, sampler_loop
from pipelines.core.schedules import DEFAULT_SCHEDULE
from pipelines.core.transformer_call import prepare_transformer
from pipelines.core.transformers import distilled_guidance_notes, is_transformer
from pipelines.core.vae import VAE_UPCAST_NOTE, check_size, decode


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
    texts: tuple[str, str] | None = None   # prompt, negative prompt as the text encoder reads them: LoRA tags out,
                                           # embedding names expanded to their tokens
    notes: list[str] = field(default_factory=list)
    loras: dict = field(default_factory=dict)   # name -> LoadedLora, the LoRAs the prompt switched on
    draft: Any = None                  # the draft UNet, for the DDPM speculative sampler's "draft model"
    speculative: list = field(default_factory=list)   # its ChainStats, one per image generated so far
    controlnets: dict = field(default_factory=dict)   # name -> ControlNetModel, for the request's units
    classifier: Any = None             # the noise-aware classifier, for classifier guidance
    classifier_index: int = 0          # ... and the class it steers to

    def generators(self, batch_index: int) -> list[torch.Generator]:
        """Image i of batch b draws its noise from seed + b * batch_size + i, on the CPU."""
        return self.request.generators(batch_index)

    def initial_noise(self, generators: list[torch.Generator], *, device: torch.device | None = None) -> torch.Tensor:
        """x_T as the pipeline's `prepare_latents` draws it: one image per generator, drawn from those CPU
        generators, in the prompt embeddings' dtype (encode_prompt casts them to the text encoder's), not yet
        scaled by the sampler's initial sigma."""
        pipeline, request = self.pipeline, self.request
        factor = pipeline.vae_scale_factor
        shape = (len(generators), pipeline.unet.config.in_channels, request.height // factor, request.width // factor)
        dtype = pipeline.text_encoder.dtype if pipeline.text_encoder is not None else pipeline.unet.dtype
        return randn_tensor(shape, generator=generators, device=device or self.device, dtype=dtype)

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
        """Run batch `batch_index` (the sampler's own loop, the task's, or diffusers'); returns its final latents.

        `latents` replaces the initial noise (drawn from `generators`); `callback` is
        callback_on_step_end, which also sees the loop's tensors named in `expose`.
        """
        own_loop = sampler_loop(self.request.sampler)
        run = own_loop.run if own_loop is not None else self.task.run
        if run is not None:
            return run(self, batch_index, generators=generators, latents=latents, callback=callback, expose=expose)
        return self.run_pipeline(batch_index, generators=generators, latents=latents, callback=callback, expose=expose)

    def run_pipeline(self, batch_index: int = 0, *, generators: list[torch.Generator] | None = None,
                     latents: torch.Tensor | None = None, callback=None, expose: tuple[str, ...] = (),
                     pipeline=None, extra: dict | None = None) -> torch.Tensor:
        """`__call__` through the task's diffusers pipeline call, or through `pipeline` (one derived from it, such
        as diffusers' PAG pipeline) with the `extra` arguments it takes."""
        self.seed_brownian_noise(batch_index)
        pipeline = pipeline or self.pipeline
        arguments = self.arguments(batch_index, generators=generators) | (extra or {})
        if latents is not None:
            arguments["latents"] = latents
        if callback is not None:
            arguments.update(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", *expose])
        try:
            with exposed_tensors(pipeline, expose):
                return pipeline(**arguments).images
        finally:   # a Stop interrupts the pipeline that ran; the task's pipeline is where the generator reads it
            self.pipeline._interrupt = getattr(pipeline, "_interrupt", False)

    def seed_brownian_noise(self, batch_index: int) -> None:
        """DPM++ SDE draws its Brownian noise from torch's global RNG unless seeded: one tree per image."""
        if hasattr(self.pipeline.scheduler, "noise_sampler_seed"):
            self.pipeline.scheduler.noise_sampler_seed = [self.request.seed_for(batch_index, i)
                                                          for i in range(self.request.batch_size)]

    def spatial(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the VAE reads them (a UNet's are already)."""
        return latents

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """The call's latents as the task's final images (noting an fp16 VAE upcast)."""
        images, upcast = decode(self.pipeline.vae, latents)
        if upcast and VAE_UPCAST_NOTE not in self.notes:
            self.notes.append(VAE_UPCAST_NOTE)
        return [self.request.composite(image) for image in to_pil(images)]


def encoder_texts(models, request: SamplingSettings) -> tuple[tuple[str, str], list[LoraUse], list[str]]:
    """The prompt and negative prompt as the text encoder reads them: LoRA tags taken out, and the embeddings they
    name loaded (on the device thread) with each name expanded to its tokens; the LoRAs asked for; notes."""
    prompt, negative_prompt, uses, notes = prompt_texts(request)
    prompt, negative_prompt, embedding_notes = models.use_embeddings(prompt, negative_prompt)
    return (prompt, negative_prompt), uses, notes + embedding_notes


def prepare(models, request: SamplingSettings) -> PreparedCall:
    """Check `request` against the loaded model and set up its pipeline (on the device thread)."""
    # 1. Check inputs and resolve the seed
    if not isinstance(request, SamplingSettings):
        raise ValueError(f"Expected a task request (e.g. Txt2ImgRequest) but received {type(request).__name__}.")
    request = request.resolved()
    task = task_of(request)
    model = models.require()
    if is_transformer(model.pipeline):     # SD 3.x, Flux, PixArt, Sana: their own pipelines' calls
        return prepare_transformer(models, request, task, model)
    fast, request = request.fast, made_fast(request, model)   # the model's LCM-LoRA and sampler, CFG 1
    if is_edm(model.scheduler_config) and request.schedule != DEFAULT_SCHEDULE:   # refused before the sampler is
        raise ValueError(edm_refusal(request.schedule, "it runs its own σ spacing, with the Default schedule"))
    sampler, default_note = edm_default(request.sampler, model.scheduler_config)   # an EDM model's own sampler
    request = replace(request, sampler=sampler) if default_note else request
    pipeline = models.pipeline(task.name)
    # diffusers' SD pipelines require multiples of 8 whatever the VAE's factor
    check_size(request.width, request.height, max(8, pipeline.vae_scale_factor))
    own_loop = sampler_loop(request.sampler)
    if own_loop is not None:
        own_loop.check(task, pipeline, model.name)
        if not request.plain_guidance() and not only_icg(request):
            raise ValueError(f"The {request.sampler} sampler runs its own loop with plain CFG (or ICG) on its own "
                             "schedule; turn off PAG, classifier guidance, the guidance interval and the schedule, "
                             "or pick another sampler.")
    kind = pipeline.unet.config.addition_embed_type
    if kind not in (None, "text_time"):      # SDXL's is built by the studio's loop; other kinds are not
        raise ValueError(f"{model.name} adds `{kind}` conditioning to its UNet, which the studio does not build; "
                         "it runs SD 1.x/2.x and SDXL models.")
    if pipeline.unet.config.in_channels == 9 and task.name not in ("inpaint", "outpaint"):
        raise ValueError(f"{model.name} is an inpainting model (its UNet reads the mask and the masked image beside "
                         "the latents), which runs in Inpainting and outpainting only; for anything else, load a "
                         "text-to-image model.")
    if request.unchanged_image() is None:
        request.check_steps()
    for name in request.controlnet_names():   # loaded first, so that the memory budget counts them
        models.controlnet(name)
    models.fit(request)
    controlnets = {name: models.controlnet(name) for name in request.controlnet_names()}   # beside the UNet
    # 2. Sampler from the model's own scheduler config
    pipeline.scheduler = make_scheduler(request.sampler, model.scheduler_config)
    # 3. LoRAs named in the prompt (<lora:name:weight>), embeddings named in either prompt (each name expanded to
    #    its tokens), then the prompts (weighted, in windows when too long)
    texts, uses, prompt_notes = encoder_texts(models, request)
    loras = models.use_loras(uses)
    prompt_notes += [f"LoRA {use.name}: weight {use.weight:g}, {loras[use.name].modules} modules patched."
                     for use in uses]
    # where the model computes: the memory manager's device unless offload hooks decide (diffusers' own search walks
    # every module of every component, a cost at every request of a small model)
    memory = models.memory
    device = memory.device if memory.mode.value in ("cpu", "high") else pipeline._execution_device
    prompts, note = prompt_arguments(pipeline, *texts, device)
    notes = default_note + request.notes() + prompt_notes + ([note] if note else []) \
        + (fast_notes(request.steps) if fast else []) \
        + lcm_sampler_notes(request, pipeline, loras) + distilled_guidance_notes(request, pipeline)
    side = model.native_side
    if side and max(request.width, request.height) > 2 * side:
        notes.append(f"{request.width}×{request.height} is more than twice this model's native size ({side} px): "
                     "expect repeated patterns or doubled subjects. Generate at its native size and upscale.")
    draft = models.draft_unet() if request.speculative and request.draft in MODEL_DRAFTS else None
    # 4. Guidance beyond CFG: what it needs checked and loaded (pipelines/core/guidance.py)
    classifier, classifier_index = None, 0
    if request.classifier_scale > 0.0:
        if is_edm(model.scheduler_config):
            raise ValueError(edm_refusal("Classifier guidance (−√(1−ᾱ_t)·s·∇log p(y|x_t))", "set its scale to 0"))
        if pipeline.scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"Classifier guidance here corrects an ε-prediction; {model.name} predicts "
                             f"{pipeline.scheduler.config.prediction_type}.")
        classifier = models.guidance_classifier()
        classifier_index = classifier.class_index(request.classifier_class)
    if request.pag_scale > 0.0:
        PerturbedAttention(pipeline.unet, request.pag_layers)   # refuses layers the UNet does not have
    notes += guidance_notes(request, pipeline)
    return PreparedCall(request=request, task=task, model=model, pipeline=pipeline, prompts=prompts, device=device,
                        texts=texts, notes=notes, loras=loras, draft=draft, controlnets=controlnets,
                        classifier=classifier, classifier_index=classifier_index)


