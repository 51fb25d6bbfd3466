"""What a training is asked (`TrainingRequest`, checked when it is made), what it reports while it runs
(`LossPoint`, `Samples`, `TrainingWarning`, emitted on its job) and what it returns (`TrainingResult`).
The loop that reads them is pipelines/training/loop.py.

Three methods share the request (`method`):
- "lora": a LoRA on the UNet's transformer layers (attention, feed-forward; and, with `train_text_encoder`, the
  text encoder's attention); the trigger word goes in front of every caption.
- "dreambooth": the same LoRA, taught an identifier (`trigger`, e.g. "sks dog") with prior preservation: class
  images of `class_prompt` ("dog"), drawn by the model itself, are trained on beside the instance images,
  their loss weighted by `prior_loss_weight` (Ruiz et al. 2023, eq. 2).
- "textual_inversion": only `vectors` new token embeddings train, everything else frozen (Gal et al. 2022);
  the token is the embedding's `name`, which goes in front of every caption and is what a prompt writes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipelines.core.checks import check_flag, check_number, check_prompt, check_whole
from pipelines.jobs.worker import JobCancelled

METHODS = ("lora", "dreambooth", "textual_inversion")
METHOD_NAMES = {"lora": "LoRA", "dreambooth": "DreamBooth (LoRA)", "textual_inversion": "Textual inversion"}
# each method's default learning rate (`learning_rate=None`): a LoRA's matrices and a token's vectors move at
# very different rates (kohya's and A1111's defaults are of these orders)
LEARNING_RATES = {"lora": 2e-3, "dreambooth": 1e-3, "textual_inversion": 5e-3}
# each method's default caption dropout (`caption_dropout=None`): a LoRA learns the unconditional picture too (for
# CFG); DreamBooth must not teach the instance to the empty prompt (its prior would leak into every image), and a
# dropped caption gives textual inversion's vectors nothing to learn
CAPTION_DROPOUTS = {"lora": 0.1, "dreambooth": 0.0, "textual_inversion": 0.0}
MAX_IMAGES = 500
MAX_TRAIN_STEPS = 20_000
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]{0,63}$")
EFFECT_THRESHOLD = 2.0        # mean |Δ| in pixel values below which a LoRA is called "no visible effect"

# name -> (low, high) of the request's whole numbers and of its other numbers
WHOLE_RANGES = {"steps": (1, MAX_TRAIN_STEPS), "rank": (1, 128), "batch_size": (1, 64),
                "warmup_steps": (0, MAX_TRAIN_STEPS), "checkpoint_every": (1, MAX_TRAIN_STEPS),
                "sample_every": (0, MAX_TRAIN_STEPS), "sample_steps": (1, 200), "seed": (0, 2 ** 63 - 1), "vectors": (1, 75),
                "class_images": (1, MAX_IMAGES)}
NUMBER_RANGES = {"learning_rate": (1e-7, 1e-1), "alpha": (0.01, 1024), "caption_dropout": (0, 1),
                 "noise_offset": (0, 1), "min_snr_gamma": (0, 100), "prior_loss_weight": (0, 100)}
MAX_REPEATS = 100

# The effect score: (training images, samples at weight 0, samples at weight 1) -> how far the weight-0 and the
# weight-1 samples are from the training images. The caller brings it (the studio: the emoji judge's feature
# distance, pipelines/lora/judge.py); without one the result has no distances and says so.
EffectScore = Callable[[list[Image.Image], list[Image.Image], list[Image.Image]], tuple[float, float]]


@dataclass(kw_only=True)
class TrainingRequest:
    name: str                                  # the file: models/lora/<name>.safetensors (an embedding's:
                                               # models/embeddings/<name>.safetensors, and its prompt word)
    images: list = field(repr=False)           # PIL images
    captions: list[str] | None = None          # one per image; None: none
    repeats: list[int] | None = None           # how often each image counts per pass (kohya's "10_name"); None: 1
    method: str = "lora"
    trigger: str = ""                          # put in front of every caption (and of the sample prompts)
    steps: int = 300
    rank: int = 8
    alpha: float = 8.0
    learning_rate: float | None = None         # None: the method's (LEARNING_RATES)
    warmup_steps: int = 20
    batch_size: int = 4
    min_snr_gamma: float = 5.0                 # 0: plain MSE
    noise_offset: float = 0.0
    caption_dropout: float | None = None       # None: the method's (CAPTION_DROPOUTS)
    flip: bool = True
    seed: int = 0
    checkpoint_every: int = 50
    sample_every: int = 50
    sample_prompts: list[str] | None = None    # None: the first two captions
    sample_steps: int = 20                     # the sampler's steps for each sample image (the model's own sampler)
    bucketing: bool = True                     # images keep their aspect ratio (buckets); off: square centre crops
    train_text_encoder: bool = False           # LoRA and DreamBooth: a LoRA on the text encoder too
    # textual inversion: vectors per token (a style on held-out prompts, bench.training_generalisation: 8 moved it
    # 57% of the way, 4 47%)
    vectors: int = 8
    init_word: str = "*"                       # textual inversion: the vectors start as this word's embedding
    class_prompt: str = ""                     # DreamBooth: the class ("dog"), for the prior images
    class_images: int = 50                     # DreamBooth: how many prior images (generated once, cached)
    prior_loss_weight: float = 1.0             # DreamBooth: the prior loss's weight

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(METHODS)} but is {self.method!r}.")
        if self.learning_rate is None:
            self.learning_rate = LEARNING_RATES[self.method]
        if self.caption_dropout is None:
            self.caption_dropout = CAPTION_DROPOUTS[self.method]
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise ValueError(f"The `name` must be 1 to 64 letters, digits, '.', '-' or '_' (it becomes the "
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
        check_prompt("class_prompt", self.class_prompt)
        check_prompt("init_word", self.init_word)
        if self.repeats is not None:
            if len(self.repeats) != len(self.images):
                raise ValueError(f"{len(self.repeats)} repeats for {len(self.images)} images: give one per image.")
            for number, count in enumerate(self.repeats):
                check_whole(f"repeats[{number}]", count, 1, MAX_REPEATS)
        if self.method == "dreambooth" and not (self.trigger.strip() and self.class_prompt.strip()):
            raise ValueError("DreamBooth needs an identifier (`trigger`, e.g. \"sks dog\") and the class it belongs "
                             "to (`class_prompt`, e.g. \"dog\"), whose images keep the model's idea of the class.")
        if self.method == "textual_inversion" and not self.init_word.strip():
            raise ValueError("Textual inversion starts its vectors from a word (`init_word`, e.g. \"style\" or \"*\"); "
                             "give one.")
        for name, (low, high) in WHOLE_RANGES.items():
            check_whole(name, getattr(self, name), low, high)
        for name, (low, high) in NUMBER_RANGES.items():
            check_number(name, getattr(self, name), low, high)
        for name in ("flip", "bucketing", "train_text_encoder"):
            check_flag(name, getattr(self, name))
        if self.method == "textual_inversion" and self.train_text_encoder:
            raise ValueError("Textual inversion trains the new token's vectors alone; turn `train_text_encoder` off.")

    @property
    def word(self) -> str:
        """What goes in front of every caption: the trigger, or (textual inversion) the embedding's own name."""
        return self.name if self.method == "textual_inversion" else self.trigger.strip()

    def prompts(self) -> list[str]:
        """Each image's caption with the trigger word (or the embedding's name) in front."""
        captions = self.captions or [""] * len(self.images)
        return [", ".join(part for part in (self.word, caption.strip()) if part) for caption in captions]

    def image_repeats(self) -> list[int]:
        return list(self.repeats or [1] * len(self.images))

    def learning_rate_factor(self, step: int) -> float:
        """The learning rate's share at `step`: a linear warm-up, then cosine decay to 10%."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def samples(self) -> list[str]:
        return self.sample_prompts or list(dict.fromkeys(self.prompts()))[:2]

    def settings(self) -> dict:
        return {key: value for key, value in vars(self).items() if key not in ("images", "captions", "repeats")}


class TrainingStopped(JobCancelled):
    """Stop was pressed before the first step (while DreamBooth's class images were drawn, or before a step ran):
    nothing was trained, and the message says what is kept."""


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
class TrainingResult:
    path: Path                # the LoRA file, or (textual inversion) the embedding file
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
    method: str = "lora"
    # DreamBooth: the identifier's prompts and the class prompt's, at the same seeds, with the LoRA on
    comparison: dict[str, list[Image.Image]] = field(default_factory=dict)
