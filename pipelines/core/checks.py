"""The checks every request runs on what it is given, and the one table of number ranges.

Each check names the field, what it received and what is allowed, in diffusers' words ("`steps` must be
a whole number from 1 to 200 but is 0."): requests call them in `__post_init__`, so a bad value is
refused before any work, with the same sentence in the UI, the Gradio API and the REST API.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

from PIL import Image

from pipelines.core.samplers import MAX_DRAFT_LENGTH

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


MAX_CONTROL_WEIGHT = 2.0
MAX_LORA_WEIGHT = 4.0       # <lora:name:weight>: negative weights subtract the LoRA
MAX_PAG_SCALE = 20.0        # perturbed-attention guidance (the paper and diffusers use about 3)
MAX_CLASSIFIER_SCALE = 100.0
PREVIEW_MODES = ("auto", "linear", "full")


# The ranges every request checks its numbers against (`SamplingSettings` and every task's request); PNG Info
# clamps a restored infotext to the same ones (pipelines/io/metadata.py).
WHOLE_NUMBER_RANGES = {"steps": (1, MAX_STEPS), "batch_size": (1, MAX_BATCH), "batch_count": (1, MAX_BATCH_COUNT),
                       "width": (8, MAX_SIDE), "height": (8, MAX_SIDE), "draft_length": (1, MAX_DRAFT_LENGTH)}
# ControlNet's `weight` scales its residuals; `start` and `end` are shares of the steps; a LoRA tag's weight
NUMBER_RANGES = {"guidance_scale": (0.0, MAX_GUIDANCE_SCALE), "distilled_guidance": (0.0, MAX_GUIDANCE_SCALE),
                 "guidance_rescale": (0.0, 1.0), "strength": (0.0, 1.0),
                 "weight": (0.0, MAX_CONTROL_WEIGHT), "start": (0.0, 1.0), "end": (0.0, 1.0),
                 "lora_weight": (-MAX_LORA_WEIGHT, MAX_LORA_WEIGHT),
                 # guidance beyond CFG (pipelines/core/guidance.py); the interval's ends are shares of the steps
                 "cfg_start": (0.0, 1.0), "cfg_end": (0.0, 1.0), "pag_scale": (0.0, MAX_PAG_SCALE),
                 "pag_adaptive_scale": (0.0, 1.0), "classifier_scale": (0.0, MAX_CLASSIFIER_SCALE)}


def check_whole(name: str, value: Any, low: int, high: int, unit: str = "") -> None:
    """A whole number (not a bool) in [low, high]; `unit` names what it counts ("px")."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        of = f" of {unit}" if unit else ""
        raise ValueError(f"`{name}` must be a whole number{of} from {low} to {high} but is {value!r}.")


def check_number(name: str, value: Any, low: float, high: float, what: str = "") -> None:
    """A finite number in [low, high]; NaN and infinities are named as received."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not low <= value <= high:
        raise ValueError(f"`{name}`{what} must be a number from {low:g} to {high:g} but is {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)} but is {value!r}.")


def check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False but is {value!r}.")


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
