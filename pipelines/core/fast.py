"""Fast (few-step) generation: a request with `fast` on runs the loaded model's distilled version through the
ordinary LoRA and sampler path, so it is the request a user would write by hand.

Latent consistency distillation (Luo et al. 2023) trains a model to jump from any point of the
probability-flow ODE to its end, with classifier-free guidance distilled into the weights: 2 to 8 steps
of the LCM sampler, one UNet pass each (CFG 1 switches the unconditional pass off). The embedded model
ships an LCM-LoRA (recipe/lcm.py, `pipelines/lora/adapters.SHIPPED_LORAS`): fast adds its
`<lora:emoji-ldm-lcm:1>` to the prompt, picks the LCM sampler and sets CFG to 1. A model that is itself
distilled (an LCM UNet embeds the guidance scale: `time_cond_proj_dim`) keeps its CFG, which it reads as
w. The request that runs, and so the infotext, says all of this: PNG Info restores the same image with
fast off. A user's own LCM-, TCD-, Lightning- or Hyper-SD LoRA goes the same way by hand: its tag in the
prompt, the LCM sampler, CFG 1.
"""

from __future__ import annotations

import re
from dataclasses import replace

from pipelines.core.paths import ASSETS_DIR, LORA_FOLDER_WEIGHTS

FAST_SAMPLER = "LCM"
FAST_STEPS = 4
FAST_GUIDANCE = 1.0
EMBEDDED_FAST_LORA = "emoji-ldm-lcm"
EMBEDDED_FAST_LORA_FOLDER = ASSETS_DIR / EMBEDDED_FAST_LORA    # recipe/lcm.py writes it; a shipped LoRA (adapters.py)
FAST_STEP_RANGE = (1, 8)     # what consistency models are distilled for; more steps only add time


def is_distilled(pipeline) -> bool:
    """Whether the UNet is a guidance-distilled LCM UNet (it embeds w through `time_cond_proj_dim`)."""
    unet = getattr(pipeline, "unet", None)
    return getattr(getattr(unet, "config", None), "time_cond_proj_dim", None) is not None


def fast_lora(model) -> str | None:
    """The LoRA that makes the loaded model fast: the embedded model's shipped LCM-LoRA; None for a model that
    is distilled itself. Raises, saying what to do, for a model that has no fast version here."""
    if is_distilled(model.pipeline):
        return None
    if model.source.kind == "embedded" and (EMBEDDED_FAST_LORA_FOLDER / LORA_FOLDER_WEIGHTS).is_file():
        return EMBEDDED_FAST_LORA
    raise ValueError(f"Fast (4 steps) needs a few-step version of {model.name}, and the studio has none for it (the "
                     "embedded model ships one). Put an LCM-LoRA made for this model (LCM, TCD, Lightning or "
                     "Hyper-SD) in models/lora/, name it in the prompt as <lora:NAME:1>, and pick the LCM sampler "
                     "with 4 steps and CFG 1; or load an LCM model.")


def made_fast(request, model):
    """`request` as it runs when `fast` is on: the model's LCM-LoRA named in the prompt (once), the LCM sampler,
    CFG 1 for a LoRA (an LCM UNet keeps its CFG as w); `fast` itself off. The steps stay the request's."""
    if not request.fast:
        return request
    lora = fast_lora(model)
    prompt = request.prompt
    changes = {"fast": False, "sampler": FAST_SAMPLER}
    if lora is not None:
        changes["guidance_scale"] = FAST_GUIDANCE
        if not re.search(rf"<lora:{re.escape(lora)}(:[^>]*)?>", prompt):
            prompt = f"{prompt} <lora:{lora}:1>".strip()
    return replace(request, prompt=prompt, **changes)


def fast_notes(steps: int) -> list[str]:
    low, high = FAST_STEP_RANGE
    if low <= steps <= high:
        return []
    return [f"Fast ran {steps} steps; a consistency-distilled model is made for {low}–{high} (4 is the default): "
            "more only add time."]


def lcm_sampler_notes(request, pipeline, loras: dict) -> list[str]:
    """A word when the LCM sampler runs a model that is not consistency-distilled and no LoRA is on: its few steps
    then give a blur of the prompt, not the model's image."""
    if request.sampler != FAST_SAMPLER or loras or is_distilled(pipeline):
        return []
    return ["The LCM sampler expects a consistency-distilled model; this one is not, and no LoRA is on, so a few "
            "steps give a rough image. Tick Fast (the model's LCM-LoRA, where it has one) or add an LCM-LoRA."]
