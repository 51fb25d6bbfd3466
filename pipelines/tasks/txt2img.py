"""Text-to-Image: the base pipeline's own call, from noise to a picture of the prompt (with guidance beyond plain
CFG, the same loop step by step: pipelines/tasks/guided.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipelines.core.registry import Task, register
from pipelines.core.requests import SamplingSettings
from pipelines.core.samplers import SAMPLER_NAMES
from pipelines.tasks.guided import run_text_or_image


@dataclass(kw_only=True)
class Txt2ImgRequest(SamplingSettings):
    task: ClassVar[str] = "txt2img"


def _text_to_image(base):
    return base

# Text-to-Image also runs the speculative sampler (pipelines/sampling/), which verifies several steps per call
register(Task("txt2img", "Text-to-Image", Txt2ImgRequest, _text_to_image, samplers=SAMPLER_NAMES,
              run=run_text_or_image))
