"""Text-to-Image: the shared generation controls, nothing more."""

from __future__ import annotations

from studio.context import StudioContext
from studio.tabs.generate import GenerationTab, build_generation_tab


def build_txt2img_tab(context: StudioContext, defaults: dict) -> GenerationTab:
    return build_generation_tab(context, "txt2img", defaults)
