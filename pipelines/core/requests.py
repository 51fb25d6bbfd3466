"""What every generation asks for: `SamplingSettings`, the base of every task's request.

Every request shares `SamplingSettings` (prompt, negative prompt, sampler, steps, CFG, seed, size,
batch, previews) and validates itself in `__post_init__` (pipelines/core/checks.py), saying what it
received and what is allowed. A task (pipelines/tasks/) adds its own fields and answers four questions
for the one generation path (pipelines/core/call.py, pipelines/generation/):

    pipeline_arguments()   what the task adds to the diffusers call (size, or image + strength)
    notes()                what the request did to its input that the user should know
    unchanged_image()      an answer that needs no denoising at all (img2img at strength 0)
    check_steps()          whether the request leaves any denoising step to run
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from PIL import Image

from pipelines.core.checks import (DRAWN_SEED_LIMIT, MAX_SEED, NUMBER_RANGES, PREVIEW_MODES, WHOLE_NUMBER_RANGES,
                                   check_choice, check_number, check_prompt, check_whole)
from pipelines.core.guidance import DEFAULT_PAG_LAYERS, check_guidance
from pipelines.core.samplers import (DEFAULT_DRAFT_LENGTH, DEFAULT_SAMPLER, DRAFTS, FROZEN_X0_DRAFT, MODEL_DRAFTS,
                                     SPECULATIVE_SAMPLER, check_sampler)


def draw_seed() -> int:
    return secrets.randbelow(DRAWN_SEED_LIMIT)


@dataclass(kw_only=True)
class SamplingSettings:
    """What every task asks for. Subclasses set `task` and add their own fields."""

    task: ClassVar[str] = ""
    prompt: str
    negative_prompt: str = ""
    sampler: str = DEFAULT_SAMPLER
    steps: int = 25
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    width: int = 64
    height: int = 64
    seed: int = -1               # -1: draw one, and report it
    batch_size: int = 1          # images per pipeline call (image i uses seed + i)
    batch_count: int = 1         # pipeline calls, one after another
    preview_every: int = 0       # steps between live previews; 0 = off
    preview_mode: str = "auto"   # auto | linear | full
    # the DDPM speculative sampler's: the draft, and how many steps it proposes per target call
    draft: str = FROZEN_X0_DRAFT
    draft_length: int = DEFAULT_DRAFT_LENGTH
    # guidance beyond plain CFG (pipelines/core/guidance.py says what each does) and the sampler's schedule
    cfg_method: str = "CFG"      # CFG | ICG (independent condition: a random prompt stands in for the negative)
    cfg_start: float = 0.0       # the guidance interval: CFG acts for the steps in [start, end) of the schedule
    cfg_end: float = 1.0
    pag_scale: float = 0.0       # perturbed-attention guidance; 0 = off
    pag_adaptive_scale: float = 0.0
    pag_layers: str = DEFAULT_PAG_LAYERS
    classifier_class: str = ""   # classifier guidance towards this class of the model's guidance classifier
    classifier_scale: float = 0.0
    schedule: str = "Default"    # the sampler's timesteps: its own, or e.g. "Align Your Steps"
    fast: bool = False           # the model's few-step (LCM) version: pipelines/core/fast.py
    distilled_guidance: float = 3.5   # Flux dev's guidance input (pipelines/core/transformers.py)

    def __post_init__(self):
        for name in ("prompt", "negative_prompt"):
            check_prompt(name, getattr(self, name))
        check_sampler(self.sampler)
        for name, (low, high) in WHOLE_NUMBER_RANGES.items():
            check_whole(name, getattr(self, name), low, high)
        check_number("guidance_scale", self.guidance_scale, *NUMBER_RANGES["guidance_scale"], " (CFG)")
        check_number("guidance_rescale", self.guidance_rescale, *NUMBER_RANGES["guidance_rescale"])
        check_number("distilled_guidance", self.distilled_guidance, *NUMBER_RANGES["distilled_guidance"],
                     " (Flux's distilled CFG scale)")
        if not isinstance(self.fast, bool):
            raise ValueError(f"`fast` must be true or false but is {self.fast!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -1 <= self.seed <= MAX_SEED:
            raise ValueError(f"`seed` must be -1 (random) or a whole number from 0 to 2**63-1 ({MAX_SEED}) "
                             f"but is {self.seed!r}.")
        if self.seed + self.batch_count * self.batch_size - 1 > MAX_SEED:
            raise ValueError(f"`seed` {self.seed} leaves no room for {self.batch_count * self.batch_size} images: "
                             f"image i uses seed + i, which must stay at most 2**63-1 ({MAX_SEED}).")
        if isinstance(self.preview_every, bool) or not isinstance(self.preview_every, int) or self.preview_every < 0:
            raise ValueError(f"`preview_every` must be 0 (off) or a positive number of steps "
                             f"but is {self.preview_every!r}.")
        check_choice("draft", self.draft, DRAFTS)
        check_guidance(self)
        check_choice("preview_mode", self.preview_mode, PREVIEW_MODES)

    # -- seeds ----------------------------------------------------------------------------------
    def resolved(self):
        """A copy with a concrete seed (-1 drawn now)."""
        return self if self.seed != -1 else replace(self, seed=draw_seed())

    def seed_for(self, batch_index: int, image_index: int) -> int:
        """Image i of batch b: seed + b * batch_size + i, counted on past 2**32 as A1111 does."""
        return self.seed + batch_index * self.batch_size + image_index

    def generators(self, batch_index: int) -> list[torch.Generator]:
        """Image i of batch b draws its noise from seed + b * batch_size + i, on the CPU."""
        return [torch.Generator("cpu").manual_seed(self.seed_for(batch_index, i)) for i in range(self.batch_size)]

    # -- what the task adds (overridden per task) ----------------------------------------------
    def pipeline_arguments(self) -> dict:
        """Keyword arguments the task adds to the diffusers pipeline call."""
        return {"width": self.width, "height": self.height}

    def notes(self) -> list[str]:
        """What the request did to its input that the user should be told."""
        return []

    def unchanged_image(self) -> Image.Image | None:
        """The answer when no denoising step is needed (None: denoise as usual)."""
        return None

    def check_steps(self) -> None:
        """Raise when the request leaves no denoising step to run."""

    def plain_guidance(self) -> bool:
        """Plain CFG on the sampler's own schedule: what diffusers' pipeline call runs as it is."""
        return (self.cfg_method == "CFG" and self.cfg_start <= 0.0 and self.cfg_end >= 1.0 and self.pag_scale == 0.0
                and self.classifier_scale == 0.0 and self.schedule == "Default")

    @property
    def speculative(self) -> bool:
        return self.sampler == SPECULATIVE_SAMPLER

    def model_batch(self) -> int:
        """Rows of the largest model call, for the memory budget: speculative sampling verifies L states
        per image in one call."""
        return self.batch_size * (self.draft_length if self.speculative else 1)

    def slots(self) -> tuple[str, ...]:
        """The model slots (pipelines/models/manager.py) this request runs on."""
        return ("base", "draft") if self.speculative and self.draft in MODEL_DRAFTS else ("base",)

    def controlnet_names(self) -> tuple[str, ...]:
        """The ControlNets the request runs with (loaded into their slots by `prepare`)."""
        return ()

    def composite(self, image: Image.Image) -> Image.Image:
        """The final image from a decoded one (inpainting pastes it back onto the original)."""
        return image

    # -- records --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The request as JSON-ready values (images as their sizes), with its task's name."""
        values: dict[str, Any] = {"task": self.task}
        for item in fields(self):
            if not item.init:
                continue
            value = getattr(self, item.name)
            if isinstance(value, Image.Image):
                values[f"{item.name}_size"] = list(value.size)
            else:
                values[item.name] = value
        return values
