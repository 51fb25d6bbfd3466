"""A generation on a diffusion transformer (SD 3.x, Flux.1, Flux 2, PixArt, Sana): `prepare_transformer` checks
the request against what the family runs (pipelines/core/transformers.py) and returns a `TransformerCall`, which the
generator drives as it drives a UNet model's `PreparedCall` (call.py): one call per batch, latents out, then
`decode`.

The noise is drawn on the CPU from the request's seeds by the family's own pipeline, so a seed gives the same image
on any device; Flux's latents come out packed in 2×2 patches and are unpacked for the VAE and the previews (Flux 2's
also batch-normalised: `flux2_to_vae`).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from pipelines.core.families import family_of_pipeline
from pipelines.core.guidance import DEFAULT_PAG_LAYERS, pag_layer_ids
from pipelines.core.images import to_pil
from pipelines.core.prompts import prompt_texts, uses_emphasis
from pipelines.core.requests import SamplingSettings
from pipelines.core.samplers import DEFAULT_SAMPLER, SPECULATIVE_SAMPLER
from pipelines.core.transformers import (
    NOT_YET,
    TASK_LABELS,
    TRANSFORMER_TASKS,
    controlnet_pipeline,
    default_transformer_sampler,
    distilled_guidance_notes,
    flux2_to_patches,
    flux2_to_vae,
    make_transformer_scheduler,
    rebuilt,
    starting_at_strength,
    takes_cfg,
    transformer_samplers,
)
from pipelines.core.vae import VAE_UPCAST_NOTE, check_size, decode


class _Stopped(Exception):
    """PixArt's old-style step callback cannot interrupt its loop: it raises this, with the latents so far."""

    def __init__(self, latents: torch.Tensor):
        super().__init__("stopped")
        self.latents = latents


@dataclass
class _OldStyleProgress:
    """What the generator's step callback reads off a pipeline, for a pipeline with PixArt's `callback`."""
    num_timesteps: int
    _interrupt: bool = False


@dataclass
class TransformerCall:
    """A request made ready for a diffusion transformer's pipeline; call it once per batch (as `PreparedCall`)."""

    request: SamplingSettings
    task: Any
    model: Any
    pipeline: Any
    family: str
    device: torch.device
    texts: tuple[str, str]
    notes: list[str] = field(default_factory=list)
    loras: dict = field(default_factory=dict)
    speculative: list = field(default_factory=list)     # never: speculative sampling is the UNet families'

    def generators(self, batch_index: int) -> list[torch.Generator]:
        return self.request.generators(batch_index)

    def arguments(self, batch_index: int, generators: list[torch.Generator]) -> dict:
        """The family pipeline's keyword arguments for one batch (latents out)."""
        request, pipeline = self.request, self.pipeline
        prompt, negative_prompt = self.texts
        arguments = dict(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=request.steps,
                         guidance_scale=request.guidance_scale, num_images_per_prompt=request.batch_size,
                         output_type="latent", generator=generators, width=request.width, height=request.height)
        takes = inspect.signature(type(pipeline).__call__).parameters
        if request.task in ("inpaint", "outpaint"):
            inpainting = request.as_inpainting()
            region = inpainting.region(pipeline.vae_scale_factor)
            arguments.update(width=inpainting.width, height=inpainting.height)
            if hasattr(pipeline, "start_image"):   # Flux 2 [dev], PixArt, Sana: started from the region, the rest
                                                   # kept (keep_known)
                pipeline.start_image, pipeline.start_steps = region.image, request.steps
                pipeline.start_mask = torch.from_numpy((region.latent_mask > 0).astype("float32"))[None, None]
            else:
                mask = Image.fromarray((region.mask * 255).round().astype("uint8"))
                arguments.update(image=region.image, mask_image=mask, strength=inpainting.strength)
        elif request.task == "controlnet":
            units = request.units
            images = [unit.control_image(request.width, request.height, seed=request.seed) for unit in units]
            many = len(units) > 1
            arguments.update(control_image=images if many else images[0],
                             controlnet_conditioning_scale=[u.weight for u in units] if many else units[0].weight,
                             control_guidance_start=[u.start for u in units] if many else units[0].start,
                             control_guidance_end=[u.end for u in units] if many else units[0].end)
        elif request.task == "img2img":
            image = request.fitted_image()
            if hasattr(pipeline, "start_image"):   # Flux 2, PixArt, Sana: their text-to-image call started from it
                pipeline.start_image, pipeline.start_steps = image, request.steps
            else:              # one per image of the batch: SD 3's encodes image i with generator i
                arguments.update(image=[image] * request.batch_size, strength=request.strength)
        if self.family == "Flux":
            # CFG is Flux's "true CFG" (two passes, with the negative prompt); its own is the distilled guidance
            arguments.update(true_cfg_scale=request.guidance_scale, guidance_scale=request.distilled_guidance)
        if self.family == "Flux 2":
            # [dev]'s guidance_scale is its distilled guidance; [klein]'s is CFG (with an empty negative prompt)
            arguments["guidance_scale"] = request.guidance_scale if "Klein" in type(pipeline).__name__ else \
                request.distilled_guidance
            arguments["text_encoder_out_layers"] = text_encoder_layers(pipeline)
        if request.pag_scale:                      # diffusers' PAG pipeline (pag_pipeline)
            arguments.update(pag_scale=request.pag_scale, pag_adaptive_scale=request.pag_adaptive_scale)
        if "use_resolution_binning" in takes:      # the size asked for, not the nearest trained aspect ratio
            arguments["use_resolution_binning"] = False
        if "clean_caption" in takes:                # PixArt's caption cleaning needs bs4 and ftfy: the prompt as typed
            arguments["clean_caption"] = False
        if "negative_prompt" not in takes:          # Flux 2's pipelines (their notes say so)
            del arguments["negative_prompt"]
        if request.task == "controlnet" and "control_guidance_start" not in takes:   # Sana's: 0 and 1, checked
            del arguments["control_guidance_start"], arguments["control_guidance_end"]
        return arguments

    def __call__(self, batch_index: int = 0, *, generators: list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, callback=None, expose: tuple[str, ...] = ()) -> torch.Tensor:
        pipeline = self.pipeline
        generators = generators or self.generators(batch_index)
        if latents is None and self.family == "Flux" and self.request.task == "controlnet":
            # Flux's ControlNet pipeline samples the control image's latents from the generators before the noise:
            # the noise is drawn first, as Text-to-Image draws it, so that a unit at weight 0 gives its image
            latents = type(self.model.pipeline).prepare_latents(
                pipeline, self.request.batch_size, pipeline.transformer.config.in_channels // 4, self.request.height,
                self.request.width, pipeline.transformer.dtype, self.device, generators)[0]
        arguments = self.arguments(batch_index, generators)
        if latents is not None:
            arguments["latents"] = latents
        pipeline._interrupt = False
        takes = inspect.signature(type(pipeline).__call__).parameters
        if callback is not None and "callback_on_step_end" in takes:
            arguments.update(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
        elif callback is not None:                  # PixArt: callback(step, t, latents) after each step
            progress = _OldStyleProgress(num_timesteps=self.request.steps)

            def old_style(step, timestep, latents):
                progress.num_timesteps = len(pipeline.scheduler.timesteps)
                callback(progress, step, timestep, {"latents": latents})
                if progress._interrupt:
                    raise _Stopped(latents)

            arguments.update(callback=old_style, callback_steps=1)
        # a PAG pipeline sets its processors on the shared transformer and puts them back only if its loop ends
        kept = pipeline.transformer.attn_processors if self.request.pag_scale else None
        try:
            return pipeline(**arguments).images
        except _Stopped as stopped:
            pipeline._interrupt = True
            pipeline.maybe_free_model_hooks()        # as the pipeline's own end would (offload modes)
            return stopped.latents
        finally:
            if hasattr(pipeline, "start_image"):   # the input image is this call's, not the cached pipeline's
                pipeline.start_image = pipeline.start_mask = None
            if kept is not None:
                pipeline.transformer.set_attn_processor(kept)

    def spatial(self, latents: torch.Tensor, *, difference: bool = False) -> torch.Tensor:
        """Latents as the VAE reads them: Flux's 2×2-packed sequence unpacked to channels × height × width (Flux 2's
        also un-normalised; a `difference` of latents, such as a velocity, only scaled)."""
        if latents.dim() == 3:
            request = self.request.as_inpainting() if self.request.task in ("inpaint", "outpaint") else self.request
            if self.family == "Flux 2":
                return flux2_to_vae(self.pipeline, latents, request.height, request.width, difference=difference)
            return self.pipeline._unpack_latents(latents, request.height, request.width, self.pipeline.vae_scale_factor)
        return latents

    def packed(self, latents: torch.Tensor) -> torch.Tensor:
        """`spatial`'s inverse: latents as the VAE reads them, in the form the family's pipeline takes as `latents`
        (Flux's 2×2-packed sequence; Flux 2's normalised 2×2 patches, which its pipeline packs)."""
        dtype = self.pipeline.transformer.dtype
        if self.family == "Flux 2":         # normalised in float32, then cast
            return flux2_to_patches(self.pipeline, latents.to(self.device, torch.float32)).to(dtype)
        latents = latents.to(self.device, dtype)
        if self.family == "Flux":
            return self.pipeline._pack_latents(latents, *latents.shape)
        return latents

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        images, upcast = decode(self.pipeline.vae, self.spatial(latents))
        if upcast and VAE_UPCAST_NOTE not in self.notes:
            self.notes.append(VAE_UPCAST_NOTE)
        return [self.request.composite(image) for image in to_pil(images)]


def check_transformer_request(request: SamplingSettings, task, pipeline, family: str, scheduler_config: dict) -> None:
    """Refuse, before any work, what the family does not run, saying why and what to do instead."""
    if request.task not in TRANSFORMER_TASKS[family]:
        runs = ", ".join(TASK_LABELS[name] for name in TRANSFORMER_TASKS[family])
        raise ValueError(f"{task.label} does not run {family} models yet: {NOT_YET.get(request.task, 'not built')}. "
                         f"{family} models run {runs}; load an SD 1.x, SD 2.x or SDXL model for {task.label}.")
    if request.task == "controlnet" and family == "Sana" and (len(request.units) > 1 or any(
            (unit.start, unit.end) != (0.0, 1.0) for unit in request.units)):
        raise ValueError("Sana's ControlNet pipeline takes one unit, steering every step: set Starting and Ending "
                         "control step to 0 and 1, and use one unit.")
    if request.task == "controlnet" and (request.init_image is not None or
                                         any(unit.control_mode != "balanced" for unit in request.units)):
        raise ValueError(f"ControlNet on {family} runs from noise in balanced mode: an input image (Image-to-Image) "
                         "and the control modes that scale residuals per block are the UNet loop's. Leave them off.")
    if request.fast:
        raise ValueError(f"Fast runs a UNet model's LCM-LoRA; {family} has none here. Turn Fast off, or load a "
                         f"few-step {family} model (e.g. a distilled one) and lower the steps.")
    if request.pag_scale and (family not in PAG_PIPELINES or request.task != "txt2img"):
        raise ValueError(f"PAG on a diffusion transformer runs in Text-to-Image on {', '.join(PAG_PIPELINES)} models "
                         f"(diffusers' PAG pipelines); {task.label} on {family} runs without it. Set PAG scale to 0.")
    if request.pag_scale:
        _check_pag(request, pipeline, family, scheduler_config)
    if not replace(request, pag_scale=0.0).plain_guidance() or request.guidance_rescale:
        raise ValueError(f"{family} models run with plain CFG{' and PAG' if family in PAG_PIPELINES else ''}: ICG, "
                         "classifier guidance, the guidance interval, guidance rescale and Align Your Steps run in the "
                         "studio's own UNet loop. Turn them off.")
    samplers = transformer_samplers(pipeline, scheduler_config, request.task)
    if request.sampler not in samplers:
        why = " (speculative sampling verifies DDPM steps of a UNet)" if request.sampler == SPECULATIVE_SAMPLER else ""
        if request.sampler in transformer_samplers(pipeline, scheduler_config):
            why = (f" for {task.label}: its pipeline noises the image it starts from with scale_noise, which only "
                   "the flow-matching samplers have")
        raise ValueError(f"{family} models run the samplers {', '.join(samplers)}; {request.sampler!r} is not one "
                         f"of them{why}.")



def _check_pag(request: SamplingSettings, pipeline, family: str, scheduler_config: dict) -> None:
    """What diffusers' PAG pipeline for the family cannot run, refused before any work; the layers resolved."""
    import diffusers

    if getattr(pipeline.transformer.config, "qk_norm", None):
        raise ValueError(f"diffusers' PAG attention for {family} leaves out this model's q/k normalisation "
                         f"({pipeline.transformer.config.qk_norm}, as SD 3.5's), so it would change the model's own "
                         "prediction, not only the perturbed one; set PAG scale to 0.")
    if family == "SD 3.x" and scheduler_config.get("use_dynamic_shifting"):
        raise ValueError("diffusers' SD 3 PAG pipeline does not shift its schedule by the image's size, which this "
                         "model's sampler is set to do; set PAG scale to 0.")
    pag_module_names(pipeline.transformer, family, pag_ids(getattr(diffusers, PAG_PIPELINES[family]),
                                                           request.pag_layers))


def transformer_notes(request: SamplingSettings, family: str, pipeline) -> list[str]:
    """What a transformer family's pipeline leaves out of the request, said rather than silently dropped."""
    notes = distilled_guidance_notes(request, pipeline)
    takes = inspect.signature(type(pipeline).__call__).parameters
    if request.negative_prompt.strip() and "negative_prompt" not in takes:
        notes.append(f"{family}'s pipeline takes no negative prompt" + (" (its CFG guides away from the empty "
                     "prompt)" if takes_cfg(pipeline) else "") + "; the negative prompt was not used.")
    if request.guidance_scale != 1 and not takes_cfg(pipeline):
        notes.append(f"This {family} model is guidance-distilled: it runs one pass per step and takes no CFG, so "
                     f"CFG scale {request.guidance_scale:g} was not used (set it to 1)."
                     + (" Its guidance is the distilled CFG scale." if type(pipeline).__name__ == "Flux2Pipeline"
                        else ""))
    if request.task not in ("inpaint", "outpaint"):
        return notes
    inpainting = request.as_inpainting()
    if inpainting.masked_content in ("latent noise", "latent nothing"):
        notes.append(f"Masked content \"{inpainting.masked_content}\" is the UNet loop's; {family}'s inpainting "
                     "pipeline starts from the image (\"original\").")
    if inpainting.soft_inpainting:
        notes.append(f"A soft mask is the UNet loop's; {family}'s inpainting pipeline takes the mask as hard (the "
                     "original is still pasted back through the soft mask, and outpainting's feather still joins "
                     "the new area's colours to it).")
    return notes


def text_encoder_layers(pipeline) -> tuple[int, ...]:
    """Which of the text encoder's hidden states Flux 2's pipeline stacks into the prompt's embedding: as many as the
    transformer reads (its joint width over the encoder's), spaced evenly through the encoder as the released models'
    are (Mistral's 40 layers: 10, 20, 30; Qwen 3's 36: 9, 18, 27), so that a smaller encoder works too."""
    text = pipeline.text_encoder.config
    text = text.get_text_config() if hasattr(text, "get_text_config") else text
    count = max(1, pipeline.transformer.config.joint_attention_dim // text.hidden_size)
    return tuple(max(1, round(text.num_hidden_layers * index / (count + 1))) for index in range(1, count + 1))


# the families diffusers has a PAG pipeline for (perturbed-attention guidance: ε_c + s·(ε_c − ε_perturbed), the
# perturbed pass with identity self-attention in the named blocks), and the block each perturbs by default
PAG_PIPELINES = {"SD 3.x": "StableDiffusion3PAGPipeline", "PixArt-Σ": "PixArtSigmaPAGPipeline",
                 "Sana": "SanaPAGPipeline"}


def pag_pipeline(base, family: str, layers: str):
    """The family's diffusers PAG pipeline on the base's components, perturbing exactly the modules `layers` names
    (`pag_module_names`), with the family's own PAG processors; `pag_layer_ids` says which ids ran."""
    import diffusers

    pipeline = rebuilt(getattr(diffusers, PAG_PIPELINES[family]), base)
    pipeline.set_progress_bar_config(disable=True)
    ids = pag_ids(type(pipeline), layers)
    pipeline.set_pag_applied_layers([f"^{re.escape(name)}$" for name in pag_module_names(base.transformer, family,
                                                                                        ids)],
                                    pag_attn_processors=pipeline._pag_attn_processors)
    pipeline.pag_layer_ids = ids
    return pipeline


def pag_ids(kind, layers: str) -> list[str]:
    """The layer ids asked for; the UNet default "mid" stands for the PAG pipeline class's own default block."""
    if layers.strip() != DEFAULT_PAG_LAYERS:
        return pag_layer_ids(layers)
    default = inspect.signature(kind.__init__).parameters["pag_applied_layers"].default
    return [default] if isinstance(default, str) else list(default)


def pag_module_names(transformer, family: str, ids: list[str]) -> list[str]:
    """The self-attention modules the layer ids name, each id a regular expression matching the end of a dotted
    prefix of a module's name (or of it and the dot after it), from its start or a dot or underscore: "blocks.1" is
    block 1, not blocks 10 to 19, which diffusers' own search (and so its default on a larger model) would also take,
    and "1" is block 1, not 11 or 21. PAG perturbs SD 3's joint
    attention (a second, image-only attention, `attn2`, is not one its PAG processor reads), PixArt's and Sana's
    image self-attention."""
    from diffusers.models.attention_processor import Attention

    names = [name for name, module in transformer.named_modules() if isinstance(module, Attention)
             and not module.is_cross_attention and (family != "SD 3.x" or getattr(module, "add_q_proj", None)
                                                    is not None)]
    chosen = []
    for layer in ids:
        try:
            whole = re.compile(f"(?:^|[._])(?:{layer})$")
        except re.error as error:
            raise ValueError(f"PAG layer {layer!r} is not a valid layer pattern ({error}).") from None
        found = [name for name in names if any(whole.search(prefix) or whole.search(prefix + ".") for prefix in
                                               (".".join(name.split(".")[:end]) for end in
                                                range(1, name.count(".") + 2)))]
        if not found:
            raise ValueError(f"PAG layer {layer!r} names no self-attention module of this {family} transformer that "
                             f"PAG perturbs; they are {', '.join(names[:4])}… "
                             f"(e.g. \"{names[0].rsplit('.', 1)[0]}\").")
        chosen += [name for name in found if name not in chosen]
    return chosen


def _multiple(pipeline, family: str) -> int:
    """What width and height must be divisible by: the VAE's factor times the transformer's patch (Flux's latents
    are packed 2×2 on top; Sana's pipeline asks for 32 whatever its autoencoder)."""
    patch = getattr(pipeline.transformer.config, "patch_size", 1) or 1
    return max(32 if family == "Sana" else 8,
               pipeline.vae_scale_factor * patch * (2 if family in ("Flux", "Flux 2") else 1))


def prepare_transformer(models, request: SamplingSettings, task, model) -> TransformerCall:
    """`prepare` (call.py) for a diffusion transformer model (on the device thread)."""
    family = family_of_pipeline(model.pipeline)
    default_note = []
    samplers = transformer_samplers(model.pipeline, model.scheduler_config, request.task)
    if request.sampler == DEFAULT_SAMPLER and request.sampler not in samplers:
        own = default_transformer_sampler(model.scheduler_config)   # the studio's default, where the model has not it
        own = own if own in samplers else samplers[0]
        request = replace(request, sampler=own)
        default_note = [f"{DEFAULT_SAMPLER} does not run {task.label} on {family} models; this ran {own}."]
    if request.task == "outpaint":        # its generated box in multiples of the transformer's patch of cells
        request = replace(request)        # (after the last replace, which would set it back to 8)
        request.size_multiple = _multiple(model.pipeline, family)
    check_transformer_request(request, task, model.pipeline, family, model.scheduler_config)
    if request.unchanged_image() is None:
        request.check_steps()
    controlnets = [models.controlnet(name) for name in request.controlnet_names()]   # into their slots, checked
    models.fit(request)
    pipeline = models.pipeline(task.name)
    if request.pag_scale:
        pipeline = pag_pipeline(pipeline, family, request.pag_layers)
        request = replace(request, pag_layers=", ".join(pipeline.pag_layer_ids))   # what ran, for the infotext
    if controlnets:
        by_name = dict(zip(request.controlnet_names(), controlnets))
        pipeline = controlnet_pipeline(pipeline, [by_name[unit.model] for unit in request.units])
    size = request.as_inpainting() if request.task in ("inpaint", "outpaint") else request
    check_size(size.width, size.height, _multiple(pipeline, family))
    pipeline.scheduler = make_transformer_scheduler(request.sampler, model.scheduler_config)
    if hasattr(pipeline, "start_image"):          # StartFromImage's schedule: the last `strength` of the steps
        pipeline.scheduler = starting_at_strength(pipeline.scheduler, size.strength)
    prompt, negative_prompt, uses, notes = prompt_texts(request)
    loras = models.use_loras(uses)
    notes = default_note + request.notes() + notes + [
        f"LoRA {use.name}: weight {use.weight:g}, {loras[use.name].modules} modules patched." for use in uses]
    notes += transformer_notes(request, family, model.pipeline)
    if uses_emphasis(prompt) or uses_emphasis(negative_prompt):
        notes.append(f"Prompt weights like (word:1.2) are A1111's for CLIP; {family}'s pipeline reads them as "
                     "plain text.")
    memory = models.memory
    device = memory.device if memory.mode.value in ("cpu", "high") else pipeline._execution_device
    return TransformerCall(request=request, task=task, model=model, pipeline=pipeline, family=family, device=device,
                           texts=(prompt, negative_prompt), notes=notes, loras=loras)
