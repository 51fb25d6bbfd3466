"""What a LoRA training is asked (`LoraTrainingRequest`, checked when it is made), what it reports while it
runs (`LossPoint`, `Samples`, `TrainingWarning`, emitted on its job) and what it returns
(`LoraTrainingResult`). The loop that reads them is pipelines/training/loop.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipelines.core.checks import check_flag, check_number, check_prompt, check_whole

MAX_IMAGES = 500
MAX_TRAIN_STEPS = 20_000
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]{0,63}$")
EFFECT_THRESHOLD = 2.0        # mean |Δ| in pixel values below which a LoRA is called "no visible effect"

# name -> (low, high) of the request's whole numbers and of its other numbers
WHOLE_RANGES = {"steps": (1, MAX_TRAIN_STEPS), "rank": (1, 128), "batch_size": (1, 64),
                "warmup_steps": (0, MAX_TRAIN_STEPS), "checkpoint_every": (1, MAX_TRAIN_STEPS),
                "sample_every": (0, MAX_TRAIN_STEPS), "seed": (0, 2 ** 63 - 1)}
NUMBER_RANGES = {"learning_rate": (1e-7, 1e-1), "alpha": (0.01, 1024), "caption_dropout": (0, 1),
                 "noise_offset": (0, 1), "min_snr_gamma": (0, 100)}

# The effect score: (training images, samples at weight 0, samples at weight 1) -> how far the weight-0 and the
# weight-1 samples are from the training images. The caller brings it (the studio: the emoji judge's feature
# distance, pipelines/lora/judge.py); without one the result has no distances and says so.
EffectScore = Callable[[list[Image.Image], list[Image.Image], list[Image.Image]], tuple[float, float]]


@dataclass(kw_only=True)
class LoraTrainingRequest:
    name: str                                  # the file: models/lora/<name>.safetensors
    images: list = field(repr=False)           # PIL images
    captions: list[str] | None = None          # one per image; None: none
    trigger: str = ""                          # put in front of every caption (and of the sample prompts)
    steps: int = 300
    rank: int = 8
    alpha: float = 8.0
    learning_rate: float = 5e-4
    warmup_steps: int = 20
    batch_size: int = 4
    min_snr_gamma: float = 5.0                 # 0: plain MSE
    noise_offset: float = 0.0
    caption_dropout: float = 0.1
    flip: bool = True
    seed: int = 0
    checkpoint_every: int = 50
    sample_every: int = 50
    sample_prompts: list[str] | None = None    # None: the first two captions

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise ValueError(f"The LoRA's `name` must be 1 to 64 letters, digits, '.', '-' or '_' (it becomes the "
                             f"file name) but is {self.name!r}.")
        if not self.images or not all(isinstance(image, Image.Image) for image in self.images):
            raise ValueError("Give the training at least one image.")
        if len(self.images) > MAX_IMAGES:
            raise ValueError(f"At most {MAX_IMAGES} images train one LoRA here, but {len(self.images)} were given.")
        if self.captions is not None and len(self.captions) != len(self.images):
            raise ValueError(f"{len(self.captions)} captions for {len(self.images)} images: give one per image.")
        for number, caption in enumerate(self.captions or []):
            check_prompt(f"captions[{number}]", caption)
        for number, prompt in enumerate(self.sample_prompts or []):
            check_prompt(f"sample_prompts[{number}]", prompt)
        check_prompt("trigger", self.trigger)
        for name, (low, high) in WHOLE_RANGES.items():
            check_whole(name, getattr(self, name), low, high)
        for name, (low, high) in NUMBER_RANGES.items():
            check_number(name, getattr(self, name), low, high)
        check_flag("flip", self.flip)

    def prompts(self) -> list[str]:
        """Each image's caption with the trigger word in front."""
        captions = self.captions or [""] * len(self.images)
        return [", ".join(part for part in (self.trigger.strip(), caption.strip()) if part) for caption in captions]

    def samples(self) -> list[str]:
        return self.sample_prompts or list(dict.fromkeys(self.prompts()))[:2]

    def settings(self) -> dict:
        return {key: value for key, value in vars(self).items() if key not in ("images", "captions")}


@dataclass
class LossPoint:
    step: int
    loss: float
    learning_rate: float
    seconds: float            # since the training (or its resumption) started


@dataclass
class Samples:
    step: int
    prompts: list[str]
    images: list[Image.Image]


@dataclass
class TrainingWarning:
    step: int
    message: str


@dataclass
class LoraTrainingResult:
    path: Path
    steps: int
    final_loss: float
    effect: float             # mean |Δ| (0..255) between weight 0 and weight 1 on the sample prompts
    moved: bool
    # how far the samples are from the training images at weight 0 and at weight 1, by the caller's
    # `EffectScore` (closer means the LoRA pulls towards what it was shown); None when none was given
    feature_distance_before: float | None
    feature_distance_after: float | None
    before: list[Image.Image]
    after: list[Image.Image]
    stopped: bool
    warnings: list[str]
    base_model: str = ""      # the model it was trained on (and whose name and hash the file records)
