"""Typed requests and results between the UI and the pipeline layer.

Every request validates itself in `__post_init__`; the errors say what was received and
what is allowed, so the UI can show them as they are.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field

from PIL import Image

from pipelines.samplers import DEFAULT_SAMPLER, check_sampler

MAX_SIDE = 2048
MAX_BATCH = 16
MAX_STEPS = 200


def draw_seed() -> int:
    return secrets.randbelow(2 ** 32)


@dataclass
class GenerationRequest:
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
    # Image-to-image: an init image and how much of the schedule to run over it.
    init_image: Image.Image | None = field(default=None, repr=False)
    strength: float = 0.75

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise ValueError(f"`prompt` must be text but is {type(self.prompt).__name__}.")
        check_sampler(self.sampler)
        for name, low, high in (("steps", 1, MAX_STEPS), ("batch_size", 1, MAX_BATCH),
                                ("batch_count", 1, 100), ("width", 8, MAX_SIDE), ("height", 8, MAX_SIDE)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"`{name}` must be a whole number from {low} to {high} but is {value!r}.")
        if not 0.0 <= self.guidance_scale <= 50.0:
            raise ValueError(f"`guidance_scale` (CFG) must be between 0 and 50 but is {self.guidance_scale}.")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"`guidance_rescale` must be between 0 and 1 but is {self.guidance_rescale}.")
        if not isinstance(self.seed, int) or not -1 <= self.seed < 2 ** 32:
            raise ValueError(f"`seed` must be -1 (random) or a whole number from 0 to 2**32-1 but is {self.seed!r}.")
        if self.preview_every < 0:
            raise ValueError(f"`preview_every` must be 0 (off) or a positive number of steps but is {self.preview_every}.")
        if self.preview_mode not in ("auto", "linear", "full"):
            raise ValueError(f"`preview_mode` must be auto, linear or full but is {self.preview_mode!r}.")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"`strength` must be between 0 and 1 but is {self.strength}.")

    @property
    def task(self) -> str:
        return "txt2img" if self.init_image is None else "img2img"

    def resolved(self) -> "GenerationRequest":
        """A copy with a concrete seed (-1 drawn now)."""
        if self.seed != -1:
            return self
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        values["seed"] = draw_seed()
        return GenerationRequest(**values)

    def seed_for(self, batch_index: int, image_index: int) -> int:
        return (self.seed + batch_index * self.batch_size + image_index) % 2 ** 32

    def to_json(self) -> dict:
        values = asdict(self) if self.init_image is None else \
            {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "init_image"}
        values.pop("init_image", None)
        values["task"] = self.task
        if self.init_image is not None:
            values["init_image_size"] = list(self.init_image.size)
        return values


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str
    path: str | None = None        # where it was saved; None when not saved (stopped early)
    finished: bool = True
    steps_done: int = 0


@dataclass
class Preview:
    images: list[Image.Image]      # one per image of the batch
    step: int
    total_steps: int
    batch_index: int


@dataclass
class GenerationDone:
    images: list[GeneratedImage]
    seed: int
    stopped: bool
    messages: list[str] = field(default_factory=list)   # what the user should know (OOM retry, ...)
