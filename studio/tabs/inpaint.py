"""Inpainting and outpainting: paint over what should change; everything else stays as it was.

The image editor holds the image and the painted mask (white strokes on a layer); a mask image can
be uploaded instead. The API takes the request's own fields (`init_image`, `mask`, …) at `/inpaint`,
and the image with the four extension sizes at `/outpaint`. The Mask X-ray shows the mask the UNet
really sees, on its latent grid.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from pipelines.core.guidance import GUIDANCE_FIELDS
from pipelines.tasks.inpaint import INPAINT_AREAS, MASK_MODES, MASKED_CONTENT, MAX_MASK_BLUR, MAX_PADDING
from pipelines.tasks.masks import mask_xray
from pipelines.tasks.outpaint import MAX_EXTEND, PREFILLS, OutpaintRequest
from studio.context import StudioContext
from studio.errors import user_errors
from studio.tabs.generate import (GenerationTab, TaskControls, build_generation_tab, request_from_controls,
                                  wire_generation)

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"   # the explorer's example pictures


OUTPAINT_DEFAULTS = {item.name: item.default for item in fields(OutpaintRequest) if item.default is not MISSING}


def editor_image_and_mask(value) -> tuple[Image.Image | None, Image.Image | None]:
    """The image and the painted mask (white = repaint, from every layer's strokes) of an ImageEditor value."""
    if not value or value.get("background") is None:
        return None, None
    background = value["background"]
    image = background.convert("RGB")
    painted = np.zeros((image.height, image.width), dtype=np.uint8)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA").resize(image.size))[..., 3]
        painted = np.maximum(painted, alpha)
    return image, Image.fromarray(painted)


def _editor_to_fields(values: dict) -> dict:
    """Inpainting's fields from the page: the editor's image, and the uploaded mask or else the painted one."""
    image, painted = editor_image_and_mask(values.pop("editor"))
    uploaded = values.pop("mask_upload")
    if image is None:
        raise ValueError("Upload an image to inpaint first (or send one from Text-to-Image or PNG Info).")
    if uploaded is not None and np.asarray(painted).any():
        gr.Info("The uploaded mask is used; the strokes painted on the image are not. Clear the upload to use them.")
    return values | {"init_image": image, "mask": uploaded if uploaded is not None else painted}


def _editor_to_outpaint_fields(values: dict) -> dict:
    """Outpainting's fields from the page: the editor's image alone."""
    image, _ = editor_image_and_mask(values.pop("editor"))
    values.pop("mask_upload")
    if image is None:
        raise ValueError("Upload an image to outpaint first (or send one from Text-to-Image or PNG Info).")
    return values | {"init_image": image}


def _inpaint_controls() -> TaskControls:
    editor = gr.ImageEditor(label="Image: paint over what should change", type="pil", elem_id="inpaint-editor",
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=6),
                            eraser=gr.Eraser(default_size=6), layers=False, format="png", height=360)
    # image_mode None keeps a mask's alpha: transparent with painted strokes, or grey (white = repaint)
    mask_upload = gr.Image(label="…or upload a mask (white = repaint)", type="pil", image_mode=None,
                           elem_id="inpaint-mask", height=140)
    examples = sorted(EXAMPLES_DIR.glob("*.png")) if EXAMPLES_DIR.is_dir() else []
    if examples:
        gr.Examples([[str(path)] for path in examples], inputs=[editor], label="Example pictures (then paint on one)",
                    elem_id="inpaint-examples")
    with gr.Row():
        mask_blur = gr.Slider(0, MAX_MASK_BLUR, value=4, step=1, precision=0, label="Mask blur (px)",
                              info="the feather of the paste-back, outside the mask")
        padding = gr.Slider(0, MAX_PADDING, value=32, step=1, precision=0, label="Only masked padding (px)")
    mask_mode = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], label="Mask mode")
    masked_content = gr.Radio(list(MASKED_CONTENT), value="original", label="Masked content",
                              info="what the masked part starts from")
    inpaint_area = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], label="Inpaint area",
                            info="only masked: the mask's box at the model's size, so a small model edits a big image")
    with gr.Row():
        strength = gr.Slider(0.0, 1.0, value=0.75, step=0.01, label="Denoising strength")
        soft = gr.Checkbox(value=False, label="Soft inpainting",
                           info="grey in the mask is a per-pixel strength (differential diffusion)")
    fields = {"init_image": gr.Image(type="pil", visible=False, label="Input image"),
              "mask": gr.Image(type="pil", image_mode=None, visible=False, label="Mask (white = repaint)"),
              "mask_blur": mask_blur, "mask_mode": mask_mode, "masked_content": masked_content,
              "inpaint_area": inpaint_area, "only_masked_padding": padding, "strength": strength,
              "soft_inpainting": soft}
    return TaskControls(fields, page={"editor": editor, "mask_upload": mask_upload}, to_fields=_editor_to_fields,
                        image_input=editor)


def build_inpaint_tab(context: StudioContext, defaults: dict) -> GenerationTab:
    tab = build_generation_tab(context, "inpaint", defaults, task_controls=_inpaint_controls)
    _build_xray(context, tab)
    _build_outpaint(context, tab)
    return tab


def _build_xray(context: StudioContext, tab: GenerationTab) -> None:
    with gr.Accordion("Mask X-ray: the mask the UNet sees", open=False):
        show = gr.Button("Show the mask on the latent grid", elem_id="inpaint-xray-button")
        with gr.Row():
            picture = gr.Image(label="Repainted latent cells (red: masked; amber: only touched)",
                               interactive=False, elem_id="inpaint-xray", height=320)
            explanation = gr.Markdown(elem_id="inpaint-xray-text")

    @user_errors
    def xray(**values):
        request = request_from_controls(tab.task, _editor_to_fields(dict(values)))
        model = context.models.require()
        image, text = mask_xray(request, model.pipeline.vae_scale_factor)
        return {picture: image, explanation: text}

    inputs = {name: component for name, component in tab.controls.items() if component.visible} | tab.own.page
    show.click(xray, inputs_kwargs=inputs, outputs={picture, explanation}, api_visibility="private")


def _build_outpaint(context: StudioContext, tab: GenerationTab) -> None:
    with gr.Accordion("Outpaint: extend the canvas", open=False):
        with gr.Row():
            sides = {side: gr.Slider(0, MAX_EXTEND, value=0, step=8, precision=0,
                                     label=f"{side.capitalize()} (px)") for side in ("left", "right", "top", "bottom")}
        with gr.Row():
            prefill = gr.Radio(list(PREFILLS), value=OUTPAINT_DEFAULTS["prefill"], label="Pre-fill the new area",
                               info="what it starts from next to the original: edge: the border pixels stretched; "
                                    "blur: blurred surroundings")
            overlap = gr.Slider(0, 64, value=OUTPAINT_DEFAULTS["overlap"], step=1, precision=0, label="Overlap (px)",
                                info="the feather starts this far inside the original (which comes back as it was)")
        with gr.Row():   # its own: outpainting wants other defaults than inpainting
            area = gr.Radio(list(INPAINT_AREAS), value=OUTPAINT_DEFAULTS["inpaint_area"], label="Inpaint area",
                            info="only masked: the new side's box, at the model's scale")
            blur = gr.Slider(0, MAX_MASK_BLUR, value=OUTPAINT_DEFAULTS["mask_blur"], step=1, precision=0,
                             label="Feather (px)", info="next to the original the new area joins the denoising "
                                                        "gradually over this, and its colours meet the original's")
            strength = gr.Slider(0.0, 1.0, value=OUTPAINT_DEFAULTS["strength"], step=0.01, label="Denoising strength",
                                 info="1: the new area starts from fresh noise")
            outpaint = gr.Button("Outpaint", variant="primary", elem_id="outpaint-generate")
    shared = {name: tab.controls[name] for name in tab.controls if name not in tab.own.fields}
    # last: positional callers keep their order
    later = {name: shared.pop(name) for name in (*GUIDANCE_FIELDS, "fast", "distilled_guidance")}
    controls = shared | sides | {"init_image": tab.controls["init_image"], "prefill": prefill, "overlap": overlap,
                                 "inpaint_area": area, "mask_blur": blur, "only_masked_padding":
                                 tab.controls["only_masked_padding"], "strength": strength} | later
    wire_generation(context, tab, task="outpaint", button=outpaint, controls=controls,
                    own=TaskControls({"init_image": tab.controls["init_image"]},
                                     page={"editor": tab.own.page["editor"], "mask_upload": tab.own.page["mask_upload"]},
                                     to_fields=_editor_to_outpaint_fields))
