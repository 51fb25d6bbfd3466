"""Model families: which one a pipeline, a diffusers folder or a single checkpoint is, and whether the studio's
tabs run it. SD 1.x/2.x and SDXL (UNets with CLIP text encoders) run everywhere; the diffusion transformers
SD 3.x, Flux.1, Flux 2, PixArt and Sana (flow matching or DiT denoisers with T5, Gemma, Qwen or Mistral text
encoders) run the tabs that pipelines/core/transformers.py lists, and each other tab refuses them naming why. Other
families are refused at load, before their weights are read where the folder says what it holds, with a message
that names the family, instead of failing somewhere inside a tab.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.core.paths import ModelLoadError

# diffusers' pipeline class (a folder's model_index.json `_class_name`) -> the family users know it by
FAMILY_BY_PIPELINE = {
    "StableDiffusionPipeline": "SD 1.x/2.x", "StableDiffusionImg2ImgPipeline": "SD 1.x/2.x",
    "StableDiffusionInpaintPipeline": "SD 1.x/2.x", "LatentConsistencyModelPipeline": "SD 1.x/2.x",
    "StableDiffusionXLPipeline": "SDXL", "StableDiffusionXLImg2ImgPipeline": "SDXL",
    "StableDiffusionXLInpaintPipeline": "SDXL",
    "StableDiffusion3Pipeline": "SD 3.x", "StableDiffusion3Img2ImgPipeline": "SD 3.x",
    "FluxPipeline": "Flux", "FluxImg2ImgPipeline": "Flux", "FluxInpaintPipeline": "Flux",
    "Flux2Pipeline": "Flux 2", "Flux2KleinPipeline": "Flux 2",
    "PixArtAlphaPipeline": "PixArt-α", "PixArtSigmaPipeline": "PixArt-Σ", "SanaPipeline": "Sana",
    "AuraFlowPipeline": "AuraFlow", "HunyuanDiTPipeline": "Hunyuan-DiT", "LuminaText2ImgPipeline": "Lumina",
    "KolorsPipeline": "Kolors", "IFPipeline": "DeepFloyd IF", "KandinskyV22Pipeline": "Kandinsky 2.2",
    "WuerstchenCombinedPipeline": "Würstchen", "StableCascadeCombinedPipeline": "Stable Cascade",
    "QwenImagePipeline": "Qwen-Image", "CogView4Pipeline": "CogView 4",
    # UNet models whose UNet reads more than the noise and a prompt: no text-to-image form, so no tab runs them
    "StableDiffusionInstructPix2PixPipeline": "InstructPix2Pix",
    "StableDiffusionXLInstructPix2PixPipeline": "SDXL InstructPix2Pix",
    "StableDiffusionUpscalePipeline": "SD x4 upscaler", "StableDiffusionLatentUpscalePipeline": "SD latent upscaler",
    "StableDiffusionDepth2ImgPipeline": "SD 2 depth-to-image", "StableUnCLIPPipeline": "SD 2.1 unCLIP",
    "StableUnCLIPImg2ImgPipeline": "SD 2.1 unCLIP", "PaintByExamplePipeline": "Paint-by-Example",
    "StableDiffusionImageVariationPipeline": "SD image variations",
    "StableVideoDiffusionPipeline": "Stable Video Diffusion", "AnimateDiffPipeline": "AnimateDiff",
    "FluxFillPipeline": "Flux Fill", "FluxKontextPipeline": "Flux Kontext", "ChromaPipeline": "Chroma",
}
# diffusers' single-file model types (infer_diffusers_model_type) -> family
FAMILY_BY_CHECKPOINT_PREFIX = (
    ("xl_refiner", "SDXL refiner"), ("xl_", "SDXL"), ("playground", "SDXL"), ("v1", "SD 1.x/2.x"),
    ("v2", "SD 1.x/2.x"), ("inpainting", "SD 1.x/2.x"),
    ("upscale", "SD x4 upscaler"), ("sd3", "SD 3.x"), ("flux-2", "Flux 2"), ("flux-3", "Flux 3"),
    ("flux", "Flux"), ("sana", "Sana"),
    ("auraflow", "AuraFlow"), ("lumina", "Lumina"), ("hidream", "HiDream"), ("chroma", "Chroma"),
    ("qwen", "Qwen-Image"), ("z-image", "Z-Image"), ("ltx", "LTX-Video"), ("wan", "Wan"), ("hunyuan", "Hunyuan"),
    ("cosmos", "Cosmos"), ("mochi", "Mochi"), ("stable_cascade", "Stable Cascade"), ("cogview", "CogView"))
SUPPORTED = ("SD 1.x/2.x", "SDXL", "SD 3.x", "Flux", "Flux 2", "PixArt-α", "PixArt-Σ", "Sana")
WHY = {"AuraFlow": "a diffusion transformer with flow matching", "Lumina": "a diffusion transformer",
       "Hunyuan-DiT": "a diffusion transformer with two text encoders", "Qwen-Image": "a 20B diffusion transformer",
       "Flux 3": "diffusers 0.42 runs it as a modular pipeline only",
       "InstructPix2Pix": "an instruction-editing model: its UNet reads the input image's latents beside the noise",
       "SDXL InstructPix2Pix": "an instruction-editing model: its UNet reads the input image's latents beside the "
                               "noise",
       "SD x4 upscaler": "an upscaler: its UNet reads the low-resolution image beside the noise",
       "SD latent upscaler": "an upscaler of SD latents", "SD 2 depth-to-image": "its UNet reads a depth map beside "
                                                                                 "the noise",
       "SD 2.1 unCLIP": "it is conditioned on a CLIP image embedding", "Paint-by-Example": "it is conditioned on an "
                                                                                           "example image",
       "SD image variations": "it is conditioned on a CLIP image embedding, not a prompt",
       "Stable Video Diffusion": "a video model", "AnimateDiff": "a video model",
       "Flux Fill": "Flux's inpainting model: its transformer reads the mask and the masked image beside the noise",
       "Flux Kontext": "Flux's image-editing model: its transformer reads a reference image beside the noise",
       "SDXL refiner": "it refines an SDXL base model's images, its UNet conditioned on an aesthetic score where the "
                       "base takes the target size, and no tab drives that yet: load the SDXL base model"}


def family_of_pipeline(pipeline) -> str | None:
    """The family of a pipeline read into memory: its class's, or for a class not listed, a diffusion transformer
    named by its class when it has no UNet (None: not known, left to run)."""
    name = type(pipeline).__name__
    if FAMILY_BY_PIPELINE.get(name) == "SDXL" and (getattr(pipeline.config, "requires_aesthetics_score", False)
                                                   or _takes_an_aesthetic_score(pipeline)):
        return "SDXL refiner"
    if name in FAMILY_BY_PIPELINE:
        return FAMILY_BY_PIPELINE[name]
    if getattr(pipeline, "unet", None) is None and getattr(pipeline, "transformer", None) is not None:
        return name.removesuffix("Pipeline")
    return None


def _takes_an_aesthetic_score(pipeline) -> bool:
    """Whether an SDXL pipeline's UNet is a refiner's: five added ids (an aesthetic score in place of the target size)
    beside the pooled text, where the base takes six. Read off the weights' shapes, which every way of loading keeps
    (a refiner read as a text-to-image pipeline, as a hub id is, loses its `requires_aesthetics_score` flag)."""
    unet, encoder = getattr(pipeline, "unet", None), getattr(pipeline, "text_encoder_2", None)
    pooled = getattr(getattr(encoder, "config", None), "projection_dim", None)
    if unet is None or pooled is None or unet.config.addition_embed_type != "text_time":
        return False
    return unet.config.projection_class_embeddings_input_dim == unet.config.addition_time_embed_dim * 5 + pooled


def family_of_folder(folder: Path) -> str | None:
    """The family a diffusers folder holds, read off its model_index.json (None: not known, or no such file)."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    family = FAMILY_BY_PIPELINE.get(index.get("_class_name"))
    if family == "SDXL" and index.get("requires_aesthetics_score"):
        family = "SDXL refiner"
    if family is None and "transformer" in index and "unet" not in index:
        family = str(index.get("_class_name", "diffusion transformer")).removesuffix("Pipeline")
    return family


def family_of_checkpoint(model_type: str) -> str | None:
    """The family of a single checkpoint, from diffusers' guess at its type (None: not known, left to run)."""
    return next((family for prefix, family in FAMILY_BY_CHECKPOINT_PREFIX if model_type.startswith(prefix)), None)


def with_article(family: str) -> str:
    """"an SDXL refiner", "an AuraFlow", "a Flux Fill": an initialism is read letter by letter."""
    first = family.split()[0].split("-")[0]
    initialism = first.isupper() and len(first) > 1
    vowel = first[0] in ("FHLMNRSX" if initialism else "") + "AEIOU"
    return f"{'an' if vowel else 'a'} {family}"


def check_family(family: str | None, name: str) -> None:
    """Refuse a family the tabs do not run yet, naming it and what runs."""
    if family is None or family in SUPPORTED:
        return
    what = f" ({WHY[family]})" if family in WHY else ""
    raise ModelLoadError(f"{name} is {with_article(family)} model{what}. The studio's tabs run "
                         f"{', '.join(SUPPORTED)} models; {family} is not supported yet. Load a model of one of those "
                         "families.")
