"""The task registry: each kind of generation, its request, its pipeline and its infotext fields.

Every request shares `SamplingSettings` (prompt, negative prompt, sampler, steps, CFG, seed, size,
batch, previews) and validates itself in `__post_init__`, saying what it received and what is
allowed. A task adds its own fields and answers four questions for the one generation path
(`pipelines/denoise.py`, `pipelines/generate.py`):

    pipeline_arguments()   what the task adds to the diffusers call (size, or image + strength)
    notes()                what the request did to its input that the user should know
    unchanged_image()      an answer that needs no denoising at all (img2img at strength 0)
    check_steps()          whether the request leaves any denoising step to run

The registry entry names the request class, the pipeline the task runs on (derived once from the
loaded base with `from_pipe`, so all tasks share one set of weights) and the infotext fields the
task writes and reads back. Adding a task (inpainting, ControlNet) is one request class and one
`register(Task(...))`; nothing else branches on the task's name.
"""

from __future__ import annotations

import math
import secrets
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from PIL import Image

from pipelines.samplers import DEFAULT_SAMPLER, check_sampler
from pipelines.speculative import DEFAULT_DRAFT_LENGTH, DRAFTS, FROZEN_X0_DRAFT, MAX_DRAFT_LENGTH, MODEL_DRAFTS, \
    SPECULATIVE_SAMPLER

MAX_SIDE = 2048
MAX_BATCH = 16
MAX_BATCH_COUNT = 100
MAX_STEPS = 200
MAX_GUIDANCE_SCALE = 50.0
# A prompt is read in windows of 75 tokens, each one text-encoder pass, and the UNet attends to all of them at every
# step: 5,000 characters is some 15 to 60 windows, far past any prompt written by hand.
MAX_PROMPT_CHARS = 5_000
# Input images (img2img, inpainting, ControlNet's init image): 16 megapixels, 4000 × 4000, decoded is 48 MB of RGB.
# Larger inputs are refused before any work; smaller ones, down to 1 × 1, are cropped and resized to the request.
MAX_INPUT_PIXELS = 16_000_000
# Tabs, line breaks and carriage returns are text; every other control character (NUL, ESC of a terminal colour code,
# ...) is refused, since the infotext carries the prompt into a PNG text chunk, which may not hold them.
PROMPT_WHITESPACE = "\t\n\r"
# Seeds as A1111 takes them: any whole number torch's generator accepts (a signed 64-bit one here), counted on
# within a batch without wrapping. Torch's CPU generator seeds its Mersenne Twister with the seed's low 32
# bits, so seeds 2**32 apart draw the same noise, as in A1111 with `RNG: CPU`. A drawn seed stays below 2**32,
# as A1111 draws them.
MAX_SEED = 2 ** 63 - 1
DRAWN_SEED_LIMIT = 2 ** 32
PREVIEW_MODES = ("auto", "linear", "full")


# The ranges every request checks its numbers against (`SamplingSettings`, `Img2ImgRequest`); PNG Info clamps a
# restored infotext to the same ones (pipelines/metadata.py).
WHOLE_NUMBER_RANGES = {"steps": (1, MAX_STEPS), "batch_size": (1, MAX_BATCH), "batch_count": (1, MAX_BATCH_COUNT),
                       "width": (8, MAX_SIDE), "height": (8, MAX_SIDE), "draft_length": (1, MAX_DRAFT_LENGTH)}
NUMBER_RANGES = {"guidance_scale": (0.0, MAX_GUIDANCE_SCALE), "guidance_rescale": (0.0, 1.0), "strength": (0.0, 1.0)}


def draw_seed() -> int:
    return secrets.randbelow(DRAWN_SEED_LIMIT)


def _check_whole(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"`{name}` must be a whole number from {low} to {high} but is {value!r}.")


def _check_number(name: str, value: Any, low: float, high: float, what: str = "") -> None:
    """A finite number in [low, high]; NaN and infinities are named as received."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not low <= value <= high:
        raise ValueError(f"`{name}`{what} must be a number from {low:g} to {high:g} but is {value!r}.")


def check_prompt(name: str, text: Any) -> None:
    """Text of at most MAX_PROMPT_CHARS characters, without control characters other than tabs and line breaks."""
    if not isinstance(text, str):
        raise ValueError(f"`{name}` must be text but is {type(text).__name__}.")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"`{name}` is {len(text):,} characters long; at most {MAX_PROMPT_CHARS:,} are taken. "
                         "Shorten it (a prompt is read 75 tokens at a time, and every window costs time and memory).")
    for position, character in enumerate(text):
        if unicodedata.category(character) == "Cc" and character not in PROMPT_WHITESPACE:
            raise ValueError(f"`{name}` holds the control character U+{ord(character):04X} at position {position}; "
                             "prompts take text, tabs and line breaks only. Remove it (terminal colour codes and "
                             "NUL bytes come in with copied text).")


def check_input_image(name: str, image: Any) -> None:
    """An image of at most MAX_INPUT_PIXELS pixels (any smaller size is taken, and fitted to the request)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"`{name}` must be an image but is {type(image).__name__}.")
    if image.width * image.height > MAX_INPUT_PIXELS:
        raise ValueError(f"`{name}` is {image.width}×{image.height} ({image.width * image.height / 1e6:.1f} "
                         f"megapixels); at most {MAX_INPUT_PIXELS / 1e6:g} megapixels (4000×4000) are taken. "
                         "Scale it down first.")


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

    def __post_init__(self):
        for name in ("prompt", "negative_prompt"):
            check_prompt(name, getattr(self, name))
        check_sampler(self.sampler)
        for name, (low, high) in WHOLE_NUMBER_RANGES.items():
            _check_whole(name, getattr(self, name), low, high)
        _check_number("guidance_scale", self.guidance_scale, *NUMBER_RANGES["guidance_scale"], " (CFG)")
        _check_number("guidance_rescale", self.guidance_rescale, *NUMBER_RANGES["guidance_rescale"])
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -1 <= self.seed <= MAX_SEED:
            raise ValueError(f"`seed` must be -1 (random) or a whole number from 0 to 2**63-1 ({MAX_SEED}) "
                             f"but is {self.seed!r}.")
        if self.seed + self.batch_count * self.batch_size - 1 > MAX_SEED:
            raise ValueError(f"`seed` {self.seed} leaves no room for {self.batch_count * self.batch_size} images: "
                             f"image i uses seed + i, which must stay at most 2**63-1 ({MAX_SEED}).")
        if isinstance(self.preview_every, bool) or not isinstance(self.preview_every, int) or self.preview_every < 0:
            raise ValueError(f"`preview_every` must be 0 (off) or a positive number of steps "
                             f"but is {self.preview_every!r}.")
        if self.draft not in DRAFTS:
            raise ValueError(f"`draft` must be one of {', '.join(DRAFTS)} but is {self.draft!r}.")
        if self.preview_mode not in PREVIEW_MODES:
            raise ValueError(f"`preview_mode` must be one of {', '.join(PREVIEW_MODES)} "
                             f"but is {self.preview_mode!r}.")

    # -- seeds ----------------------------------------------------------------------------------
    def resolved(self):
        """A copy with a concrete seed (-1 drawn now)."""
        return self if self.seed != -1 else replace(self, seed=draw_seed())

    def seed_for(self, batch_index: int, image_index: int) -> int:
        """Image i of batch b: seed + b * batch_size + i, counted on past 2**32 as A1111 does."""
        return self.seed + batch_index * self.batch_size + image_index

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

    @property
    def speculative(self) -> bool:
        return self.sampler == SPECULATIVE_SAMPLER

    def model_batch(self) -> int:
        """Rows of the largest model call, for the memory budget: speculative sampling verifies L states
        per image in one call."""
        return self.batch_size * (self.draft_length if self.speculative else 1)

    def slots(self) -> tuple[str, ...]:
        """The model slots (pipelines/models.py) this request runs on."""
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


@dataclass(kw_only=True)
class Txt2ImgRequest(SamplingSettings):
    task: ClassVar[str] = "txt2img"


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` as RGB at width×height: cropped to that aspect ratio around its centre, then resized
    (A1111's "crop and resize"), so a different aspect ratio is never stretched."""
    image = image.convert("RGB")
    source_width, source_height = image.size
    if source_width * height != source_height * width:
        if source_width * height > source_height * width:   # wider than wanted: trim the sides
            crop_width = round(source_height * width / height)
            left = (source_width - crop_width) // 2
            image = image.crop((left, 0, left + crop_width, source_height))
        else:                                                 # taller than wanted: trim top and bottom
            crop_height = round(source_width * height / width)
            top = (source_height - crop_height) // 2
            image = image.crop((0, top, source_width, top + crop_height))
    return image.resize((width, height), Image.Resampling.LANCZOS)


@dataclass(kw_only=True)
class Img2ImgRequest(SamplingSettings):
    """Image-to-image: start from `init_image` noised to `strength` of the schedule (SDEdit)."""

    task: ClassVar[str] = "img2img"
    init_image: Image.Image = field(repr=False)
    strength: float = 0.75

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.init_image, Image.Image):
            raise ValueError("Image-to-Image needs an input image (`init_image`); upload one or send one from "
                             "Text-to-Image.")
        check_input_image("init_image", self.init_image)
        _check_number("strength", self.strength, *NUMBER_RANGES["strength"])

    def fitted_image(self) -> Image.Image:
        return fit_image(self.init_image, self.width, self.height)

    def pipeline_arguments(self) -> dict:
        return {"image": self.fitted_image(), "strength": self.strength}

    def notes(self) -> list[str]:
        notes = ["Strength 0 keeps the input image unchanged."] if self.strength == 0.0 else []
        width, height = self.init_image.size
        if width * self.height != height * self.width:
            notes.append(f"The input image is {width}×{height}, another shape than {self.width}×{self.height}: it "
                         "was cropped around its centre to that shape, not stretched. Set the size to the input's "
                         "shape to keep all of it.")
        return notes

    def unchanged_image(self) -> Image.Image | None:
        return self.fitted_image() if self.strength == 0.0 else None

    def check_steps(self) -> None:
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"`strength` {self.strength} × {self.steps} steps leaves no denoising step; raise the "
                             "steps or the strength (or use strength 0 to keep the image).")


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class InfotextField:
    """One `Key: value` of the A1111 infotext and the request field it holds."""
    key: str
    field: str
    kind: type


# Written by every task (Sampler and Size have formats of their own, see pipelines/metadata.py).
SHARED_INFOTEXT_FIELDS = (InfotextField("Steps", "steps", int), InfotextField("CFG scale", "guidance_scale", float),
                          InfotextField("Seed", "seed", int), InfotextField("Guidance rescale", "guidance_rescale", float),
                          InfotextField("Batch size", "batch_size", int),
                          InfotextField("Draft", "draft", str), InfotextField("Draft length", "draft_length", int))


@dataclass(frozen=True)
class Task:
    name: str
    label: str
    request_class: type[SamplingSettings]
    derive: Callable[[Any], Any]      # the task's pipeline from the base pipeline, sharing its weights
    infotext_fields: tuple[InfotextField, ...] = ()
    # The task's own denoising loop (pipelines/denoise.py `PreparedCall.__call__`'s signature), for tasks
    # that diffusers' pipeline call does not cover; None: the derived pipeline's own call.
    run: Callable[..., Any] | None = None
    # `Key: value`s that are not one field each (ControlNet's units), from the request
    extra_infotext: Callable[[SamplingSettings], dict] | None = None

    def infotext_values(self, request: SamplingSettings) -> dict:
        """The task's `Key: value`s; a switch that is off is left out, as A1111 does."""
        values = {item.key: None if getattr(request, item.field) is False else getattr(request, item.field)
                  for item in self.infotext_fields}
        return values | (self.extra_infotext(request) if self.extra_infotext is not None else {})


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.request_class.task != task.name:
        raise ValueError(f"Task {task.name!r} names request class {task.request_class.__name__}, whose task is "
                         f"{task.request_class.task!r}.")
    TASKS[task.name] = task
    return task


def task_of(request: SamplingSettings) -> Task:
    if request.task not in TASKS:
        raise ValueError(f"Unknown task {request.task!r}; known tasks: {', '.join(TASKS)}.")
    return TASKS[request.task]


def _text_to_image(base):
    return base


def _image_to_image(base):
    from diffusers import AutoPipelineForImage2Image
    return AutoPipelineForImage2Image.from_pipe(base)


register(Task("txt2img", "Text-to-Image", Txt2ImgRequest, _text_to_image))
register(Task("img2img", "Image-to-Image", Img2ImgRequest, _image_to_image,
              (InfotextField("Denoising strength", "strength", float),)))

# Tasks defined in their own modules register themselves there; importing them here makes every
# task known wherever the registry is (PNG Info reads their infotext fields).
import pipelines.controlnet  # noqa: E402,F401
import pipelines.inpaint  # noqa: E402,F401
