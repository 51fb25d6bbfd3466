"""The diffusion transformers (SD 3.x, Flux.1, Flux 2, PixArt-α/Σ, Sana) in the studio's tabs.

These families replace the UNet with a transformer over latent patches, and (but PixArt) DDPM's ε-prediction with
flow matching: x_t = (1 − t)·x_0 + t·ε, the model predicting the velocity ε − x_0. Each runs through diffusers' own
pipeline for it, which knows its text encoders (T5, Gemma, two CLIPs, Qwen, Mistral), its packed latents (Flux;
Flux 2's also batch-normalised) and its schedule; the studio's own loop (the Denoiser, guidance beyond CFG,
speculative sampling) stays the UNet families'.

What a family runs (TRANSFORMER_TASKS): Text-to-Image, and Image-to-Image (diffusers' own for SD 3.x and Flux; for
Flux 2, PixArt and Sana, which have none, the family's text-to-image call started from the input image noised to
the strength: `start_from_image`; Flux 2's `image` input is a reference to edit from, not a start); Inpainting and
outpainting for SD 3.x, Flux and Flux 2 [klein] through their inpainting pipelines, and for Flux 2 [dev], PixArt and
Sana through the same start with the cells outside the mask kept after every step (`keep_known`); the original is
pasted back outside the mask bit for bit (the requests' `composite`).

Samplers: the same names as the UNet families' (what A1111 Forge writes for these models), built as the family's
kind: for a flow-matching model "Euler" is FlowMatchEulerDiscreteScheduler, "DPM++ 2M" the multistep solver on flow
sigmas. The menu holds only those whose `set_timesteps` takes what the family's pipeline passes (Flux passes its
own sigmas and the resolution's shift `mu`, so it runs Euler, LCM and UniPC).

Guidance: CFG for all but Flux 2 [dev]; Flux.1 dev and Flux 2 [dev] were distilled to take their guidance as an
input (`distilled_guidance`, one pass per step), and Flux.1's CFG scale (diffusers' `true_cfg_scale`, two passes)
stays 1 unless asked for. Flux 2 [dev] has no CFG at all, and a step-distilled Flux 2 [klein] none either.
"""

from __future__ import annotations

import functools
import inspect

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FlowMatchLCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pipelines.core.families import family_of_pipeline
from pipelines.core.samplers import EDM_SAMPLERS, SPECULATIVE_SAMPLER, STEPWISE_SAMPLER_NAMES, is_edm, make_scheduler
from pipelines.core.vae import encode

TRANSFORMER_FAMILIES = ("SD 3.x", "Flux", "Flux 2", "PixArt-α", "PixArt-Σ", "Sana")
_PAINTS = ("txt2img", "img2img", "inpaint", "outpaint")
TASK_LABELS = {"txt2img": "Text-to-Image", "img2img": "Image-to-Image", "inpaint": "Inpainting",
               "outpaint": "Outpainting", "controlnet": "ControlNet"}
TRANSFORMER_TASKS = {"SD 3.x": (*_PAINTS, "controlnet"), "Flux": (*_PAINTS, "controlnet"), "Flux 2": _PAINTS,
                     "PixArt-α": _PAINTS, "PixArt-Σ": _PAINTS, "Sana": (*_PAINTS, "controlnet")}
# Why a tab does not run a family yet, for its refusal
NOT_YET = {"controlnet": "diffusers has no ControlNet pipeline for it",
           "explorer": "the explorer's step-by-step views drive a UNet"}
# The CFG scale a family is made for (Flux dev: 1, its guidance being the distilled one; Flux 2: klein's)
DEFAULT_CFG = {"SD 3.x": 7.0, "Flux": 1.0, "Flux 2": 4.0, "PixArt-α": 4.5, "PixArt-Σ": 4.5, "Sana": 4.5}
DEFAULT_DISTILLED_GUIDANCE = 3.5

# name -> (flow-matching scheduler class, overrides); the multistep solvers run on flow sigmas
FLOW_SAMPLERS: dict[str, tuple[type, dict]] = {
    "Euler": (FlowMatchEulerDiscreteScheduler, {}),
    "Heun": (FlowMatchHeunDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                               "prediction_type": "flow_prediction", "use_flow_sigmas": True}),
    "UniPC": (UniPCMultistepScheduler, {"prediction_type": "flow_prediction", "use_flow_sigmas": True}),
    "LCM": (FlowMatchLCMScheduler, {}),
}


def denoiser_of(pipeline):
    """The pipeline's denoising network: its UNet, or its transformer."""
    unet = getattr(pipeline, "unet", None)
    return unet if unet is not None else getattr(pipeline, "transformer", None)


def is_transformer(pipeline) -> bool:
    return getattr(pipeline, "unet", None) is None and getattr(pipeline, "transformer", None) is not None


def is_flow(scheduler_config: dict) -> bool:
    """Whether the model's schedule is flow matching (its own scheduler a FlowMatch one, or a solver on flow
    sigmas, as Sana ships). A config without its class name is a FlowMatch one when it has a shift and no betas."""
    config = dict(scheduler_config)
    return str(config.get("_class_name", "")).startswith("FlowMatch") or bool(config.get("use_flow_sigmas")) or \
        config.get("prediction_type") == "flow_prediction" or ("shift" in config and "beta_start" not in config)


def takes_distilled_guidance(pipeline) -> bool:
    """Flux.1 dev and its kin: guidance is an input of the transformer (`guidance_embeds`)."""
    return is_transformer(pipeline) and bool(getattr(pipeline.transformer.config, "guidance_embeds", False))


def takes_cfg(pipeline) -> bool:
    """Whether the model is guided by CFG: not Flux 2 [dev] (its guidance is an input only) nor a step-distilled
    Flux 2 [klein]."""
    name = type(pipeline).__name__
    return not (name == "Flux2Pipeline" or (name.startswith("Flux2") and pipeline.config.get("is_distilled")))


def default_cfg(pipeline) -> float:
    """The CFG scale the loaded model is made for (1 where it takes none)."""
    if pipeline is None or not is_transformer(pipeline):
        return 7.5
    return DEFAULT_CFG.get(family_of_pipeline(pipeline), 7.5) if takes_cfg(pipeline) else 1.0


def distilled_guidance_notes(request, pipeline) -> list[str]:
    """A distilled CFG scale set for a model that takes none (a Forge infotext restored onto another model) is
    left unused, and said so."""
    if request.distilled_guidance == DEFAULT_DISTILLED_GUIDANCE or takes_distilled_guidance(pipeline):
        return []
    return [f"Distilled CFG scale {request.distilled_guidance:g} is Flux dev's guidance input; this model has "
            "none, so it was not used (the CFG scale guides it)."]


def _timestep_arguments(pipeline, scheduler_config: dict) -> set[str]:
    """What the family's pipeline passes to `scheduler.set_timesteps` beyond the step count."""
    name = type(pipeline).__name__
    if name.startswith("Flux"):
        return {"sigmas", "mu"}
    if name.startswith("StableDiffusion3") and dict(scheduler_config).get("use_dynamic_shifting"):
        return {"mu"}
    return set()


def transformer_samplers(pipeline, scheduler_config: dict, task: str = "txt2img") -> tuple[str, ...]:
    """The samplers a transformer model runs for `task`: the flow-matching ones its pipeline can drive, or (PixArt,
    a DDPM model) the UNet families' one-step samplers. SD 3's and Flux's image-to-image and inpainting pipelines
    noise their start with `scale_noise`, which only the FlowMatch samplers have."""
    if not is_flow(scheduler_config):
        return tuple(name for name in STEPWISE_SAMPLER_NAMES if name != SPECULATIVE_SAMPLER)
    needed = _timestep_arguments(pipeline, scheduler_config)
    # (start_from_image, for the others, noises with either)
    from_image = (task in ("img2img", "inpaint", "outpaint") and family_of_pipeline(pipeline) in ("SD 3.x", "Flux")) \
        or (task in ("inpaint", "outpaint") and type(pipeline).__name__ == "Flux2KleinPipeline")
    return tuple(name for name, (kind, _) in FLOW_SAMPLERS.items()
                 if needed <= set(inspect.signature(kind.set_timesteps).parameters)
                 and not (from_image and not hasattr(kind, "scale_noise")))


def make_transformer_scheduler(name: str, scheduler_config: dict):
    """Sampler `name` for a transformer model, from its own scheduler config (its shift carried over)."""
    config = dict(scheduler_config)
    if not is_flow(config):
        return make_scheduler(name, config)
    kind, overrides = FLOW_SAMPLERS[name]
    if config.get("_class_name") == kind.__name__ and not overrides:
        return kind.from_config(config)
    shift = config.get("shift", config.get("flow_shift", 1.0))
    keep = set(inspect.signature(kind.__init__).parameters)
    settings = {key: value for key, value in config.items() if key in keep} | overrides
    settings |= {"flow_shift": shift} if "flow_shift" in keep else {"shift": shift}
    return kind(**{key: value for key, value in settings.items() if key in keep})


def sampler_menu(model, task: str, task_samplers: tuple[str, ...]) -> tuple[str, ...]:
    """The samplers a tab offers for the loaded model: the task's, or those the transformer family runs for it."""
    if model is not None and not is_transformer(model.pipeline) and is_edm(model.scheduler_config):
        return tuple(name for name in task_samplers if name in EDM_SAMPLERS)
    if model is None or not is_transformer(model.pipeline):
        return task_samplers
    return transformer_samplers(model.pipeline, model.scheduler_config, task)


def controlnet_pipeline(base, controlnets: list):
    """The family's ControlNet pipeline on the base's components (shared weights), with `controlnets` (several:
    diffusers' multi-ControlNet for the family, whose residuals add up; Sana's takes one)."""
    from diffusers import AutoPipelineForText2Image, SanaControlNetPipeline
    from diffusers.models.controlnets import FluxMultiControlNetModel, SD3MultiControlNetModel

    if type(base).__name__ == "SanaPipeline":       # not in diffusers' auto pipelines
        pipeline = SanaControlNetPipeline(**base.components, controlnet=controlnets[0])
        pipeline.set_progress_bar_config(disable=True)
        return pipeline
    if len(controlnets) > 1:
        multi = FluxMultiControlNetModel if type(base).__name__.startswith("Flux") else SD3MultiControlNetModel
        controlnets = [multi(controlnets)]
    pipeline = AutoPipelineForText2Image.from_pipe(base, controlnet=controlnets[0])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def check_unet_model(model, what: str) -> None:
    """Refuse `what` (a view or a training built on the UNet's step) on a transformer model, naming its family."""
    if model is not None and is_transformer(model.pipeline):
        family = family_of_pipeline(model.pipeline)
        raise ValueError(f"{what} drives a UNet (SD 1.x/2.x, SDXL) step by step; {model.name} is a {family} diffusion "
                         f"transformer, which it does not run yet. {family} models run "
                         f"{', '.join(TASK_LABELS[name] for name in TRANSFORMER_TASKS[family])}.")


def default_transformer_sampler(scheduler_config: dict) -> str:
    """The sampler a flow-matching model ships with, by our name (Euler where it ships another)."""
    config = dict(scheduler_config)
    for name, (kind, _) in FLOW_SAMPLERS.items():
        if config.get("_class_name") == kind.__name__:
            return name
    return "Euler"


# ----------------------------------------------------------------------------- Image-to-Image for PixArt and Sana


def starting_at_strength(scheduler, strength: float):
    """`scheduler` whose `set_timesteps` keeps the last `strength` of the steps, cut where diffusers' image-to-image
    pipelines cut theirs (the UNet loop's and A1111's int(N·s))."""
    return _cut(scheduler, lambda steps: steps - min(int(steps * strength), steps))


def starting_at_step(scheduler, first: int):
    """`scheduler` whose `set_timesteps` keeps the steps from step `first` on: a recorded run continued from there."""
    return _cut(scheduler, lambda steps: min(first, steps))


def _cut(scheduler, first_step):
    """`scheduler` whose `set_timesteps` drops the steps before `first_step(steps)`. Its sigmas are cut with its
    timesteps and it starts at index 0, so that a multistep solver's last, lower-order step falls on the last step
    kept (and a pipeline that sets the begin index to 0, as PixArt-α's does, keeps the right sigmas)."""
    kind = type(scheduler)

    class Cut(kind):
        @functools.wraps(kind.set_timesteps)     # its signature too: pipelines ask it whether it takes sigmas
        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            steps = self.num_inference_steps or len(self.timesteps) // self.order
            cut = first_step(steps) * self.order
            self.timesteps = self.timesteps[cut:]
            sigmas = getattr(self, "sigmas", None)
            if isinstance(sigmas, torch.Tensor) and len(sigmas) > cut:
                self.sigmas = sigmas[cut:]
            self._step_index = None
            if hasattr(self, "set_begin_index"):
                self.set_begin_index(0)
            if kind.__name__ == "LCMScheduler":   # it re-noises after every step but its count's last
                self.num_inference_steps = len(self.timesteps)

    Cut.__name__ = Cut.__qualname__ = kind.__name__
    return Cut.from_config(scheduler.config)


def start_from_image(base):
    """The family's text-to-image pipeline (shared weights) whose `prepare_latents` starts from `start_image`
    noised to the first step its scheduler keeps: SDEdit, for families diffusers gives no image-to-image
    pipeline. With a `start_mask` (inpainting) its scheduler also keeps the cells outside the mask (`keep_known`)."""
    kind = type(base)
    if kind.__name__.startswith("Flux2"):
        return _flux2_start_from_image(base)

    class StartFromImage(kind):
        start_image: Image.Image | None = None
        start_mask: torch.Tensor | None = None    # inpainting: the latent cells to generate (1); the rest are kept

        def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator,
                            latents=None):
            pixels = self.image_processor.preprocess(self.start_image, height=height, width=width)
            clean = encode(self.vae, pixels).to(device, dtype).repeat(batch_size, 1, 1, 1)
            noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=dtype)
            if self.start_mask is not None:
                keep_known(self.scheduler, clean, noise, self.start_mask.to(device, dtype))
            return noised(self.scheduler, clean, noise, self.scheduler.timesteps[:1].repeat(batch_size))

    StartFromImage.__name__ = StartFromImage.__qualname__ = kind.__name__
    return rebuilt(StartFromImage, base)


def rebuilt(kind, base):
    """A pipeline of class `kind` on the base's components (shared weights; those `kind` has no place for, such as
    SD 3's IP-Adapter image encoder beside its PAG pipeline, left out) and its config flags (a step-distilled Flux 2
    [klein]'s `is_distilled`), which `components` leaves out."""
    takes = inspect.signature(kind.__init__).parameters
    flags = {"is_distilled": bool(base.config.get("is_distilled"))} if "is_distilled" in takes else {}
    return kind(**{name: value for name, value in base.components.items() if name in takes}, **flags)


def noised(scheduler, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """`clean` noised to `timestep` the scheduler's way: flow matching's (1 − t)·x_0 + t·ε, or DDPM's."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(clean, timestep, noise)
    return scheduler.add_noise(clean, noise, timestep)


def keep_known(scheduler, clean: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> None:
    """Blended latent diffusion on `scheduler`: after each of its steps the cells outside `mask` are the input's
    latents noised to where the step landed (after the last, the input itself; a step's x̂_0, where it returns one,
    is the input there too), so that only the masked cells are generated, as diffusers' SD 3 and Flux inpainting
    pipelines do and A1111 does with a model not trained to inpaint. (Set once per batch: the step it wraps is the
    scheduler's own; its signature too, which pipelines read to pass the seed's generator.)"""
    step = scheduler.__dict__.get("_own_step", scheduler.step)
    scheduler._own_step = step
    calls = [0]

    @functools.wraps(step)
    def blended(model_output, timestep, sample, *args, **kwargs):
        output = step(model_output, timestep, sample, *args, **kwargs)
        calls[0] += 1
        parts = list(output) if isinstance(output, tuple) else [output.prev_sample]
        parts[0] = (1 - mask) * _known(scheduler, clean, noise, calls[0]) + mask * parts[0]
        if len(parts) > 1 and isinstance(parts[1], torch.Tensor) and parts[1].shape == clean.shape:
            parts[1] = (1 - mask) * clean + mask * parts[1]          # the step's x̂_0 (LCM's denoised)
        if isinstance(output, tuple):
            return tuple(parts)
        output.prev_sample = parts[0]
        return output

    scheduler.step = blended


def _known(scheduler, clean: torch.Tensor, noise: torch.Tensor, calls: int) -> torch.Tensor:
    """The input's latents at the noise level the `calls`-th step of `scheduler` has just landed on."""
    if getattr(scheduler, "mid_point_sigma", None) is not None:     # DPM++ SDE, halfway through its step
        return clean + noise * scheduler.mid_point_sigma
    # DDIM, DDPM and PNDM keep no index (and PNDM repeats a timestep): the steps taken are the index
    index = scheduler.step_index if hasattr(scheduler, "step_index") else calls
    if index is None or index >= len(scheduler.timesteps):
        return clean
    return noised(scheduler, clean, noise, scheduler.timesteps[index:index + 1].repeat(len(clean)))


# ----------------------------------------------------------------------------- Flux 2's latents


def flux2_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation that Flux 2's transformer sees its (2×2-patchified) latents normalised by:
    its VAE's batch-norm statistics."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def flux2_to_vae(pipeline, packed: torch.Tensor, height: int, width: int, *, difference: bool = False):
    """Flux 2's packed sequence of normalised 2×2 patches (the transformer's view) -> the VAE's latents. A
    `difference` of two latents (a velocity) is only scaled: the mean cancels."""
    rows, columns = height // (pipeline.vae_scale_factor * 2), width // (pipeline.vae_scale_factor * 2)
    patches = packed.permute(0, 2, 1).reshape(packed.shape[0], packed.shape[2], rows, columns)
    mean, std = flux2_statistics(pipeline.vae, patches)
    patches = patches * std + (0 if difference else mean)
    return pipeline._unpatchify_latents(patches)


def flux2_to_patches(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's latents (B, C, H, W) -> Flux 2's 2×2 patches (B, 4C, H/2, W/2), normalised by the VAE's batch-norm
    statistics: what its pipeline takes as `latents` (and packs)."""
    patches = pipeline._patchify_latents(latents)
    mean, std = flux2_statistics(pipeline.vae, patches)
    return (patches - mean) / std


def flux2_to_packed(pipeline, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latents (B, C, H, W) -> Flux 2's transformer view: `flux2_to_patches` packed to a sequence
    (B, H/2·W/2, 4C), as its pipeline encodes an image; with their position ids."""
    patches = flux2_to_patches(pipeline, latents)
    return pipeline._pack_latents(patches), pipeline._prepare_latent_ids(patches).to(latents.device)


def _flux2_start_from_image(base):
    """`start_from_image` for Flux 2, whose pipeline packs normalised 2×2 patches and sets its timesteps only after
    `prepare_latents` (their shift depends on the sequence's length): the first timestep kept is read off a copy of
    its scheduler set the way the pipeline will set it (`start_steps`: the request's steps)."""
    import copy

    import numpy as np

    kind = type(base)
    module = inspect.getmodule(kind)

    class StartFromImage(kind):
        start_image: Image.Image | None = None
        start_steps: int = 0
        start_mask: torch.Tensor | None = None    # inpainting: the latent cells to generate (1); the rest are kept

        def prepare_latents(self, batch_size, num_latents_channels, height, width, dtype, device, generator,
                            latents=None):
            noise, ids = super().prepare_latents(batch_size, num_latents_channels, height, width, dtype, device,
                                                 generator, latents)
            pixels = self.image_processor.preprocess(self.start_image, height=height, width=width)
            clean = flux2_to_packed(self, encode(self.vae, pixels).to(device, dtype))[0].repeat(batch_size, 1, 1)
            scheduler, steps = copy.deepcopy(self.scheduler), self.start_steps     # as the pipeline's step 6
            sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
            module.retrieve_timesteps(scheduler, steps, device, sigmas=sigmas,
                                      mu=module.compute_empirical_mu(image_seq_len=noise.shape[1], num_steps=steps))
            if self.start_mask is not None:       # a patch is generated where any of its 2×2 cells is
                cells = torch.nn.functional.max_pool2d(self.start_mask.to(device, dtype), 2)
                keep_known(self.scheduler, clean, noise, self._pack_latents(cells))
            return noised(scheduler, clean, noise, scheduler.timesteps[:1].repeat(batch_size)), ids

    StartFromImage.__name__ = StartFromImage.__qualname__ = kind.__name__
    return rebuilt(StartFromImage, base)
