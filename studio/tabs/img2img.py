"""Image-to-Image: the shared generation controls plus an input image and the denoising strength."""

from __future__ import annotations

import gradio as gr

from studio.context import StudioContext
from studio.tabs.generate import GenerationTab, TaskControls, build_generation_tab


def _image_controls() -> TaskControls:
    image = gr.Image(label="Input image", type="pil", elem_id="img2img-input", height=256)
    strength = gr.Slider(0.0, 1.0, value=0.6, step=0.01, label="Denoising strength",
                         info="0 keeps the input; 1 ignores it")
    return TaskControls({"init_image": image, "strength": strength}, image_input=image)


def build_img2img_tab(context: StudioContext, defaults: dict) -> GenerationTab:
    return build_generation_tab(context, "img2img", defaults, task_controls=_image_controls)
