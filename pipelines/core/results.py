"""What the generation service hands back to the UI and the API (the requests are in pipelines/core/requests.py
and pipelines/tasks/)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


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
