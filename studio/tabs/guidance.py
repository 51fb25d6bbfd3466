"""The guidance controls every generation tab shares, beyond the CFG scale: the guidance interval, ICG,
perturbed-attention guidance (PAG) and classifier guidance (what each does: pipelines/core/guidance.py).
Each control is keyed by its request field, so the tabs' API endpoints take them under the same names and
PNG Info restores them by name."""

from __future__ import annotations

import gradio as gr

from pipelines.core.checks import MAX_CLASSIFIER_SCALE, MAX_PAG_SCALE
from pipelines.core.guidance import CFG_METHODS, DEFAULT_PAG_LAYERS
from pipelines.guidance.classifier import classifier_class_names

CFG_METHOD_INFO = "ICG: a random prompt stands in for the negative one (for models trained without empty captions)"


def guidance_controls(task: str) -> dict[str, gr.components.Component]:
    """The accordion of guidance settings (closed: its defaults are plain CFG)."""
    controls = {}
    with gr.Accordion("Guidance: interval, ICG, PAG, classifier", open=False, elem_id=f"{task}-guidance"):
        with gr.Row():
            controls["cfg_method"] = gr.Radio(list(CFG_METHODS), value="CFG", label="CFG method", info=CFG_METHOD_INFO)
            controls["cfg_start"] = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="CFG from",
                                              info="share of the steps; outside, one pass without CFG")
            controls["cfg_end"] = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="CFG until")
        with gr.Row():
            controls["pag_scale"] = gr.Slider(0.0, MAX_PAG_SCALE, value=0.0, step=0.1, label="PAG scale",
                                              info="perturbed-attention guidance; 0 = off, ~3 typical, one more pass",
                                              elem_id=f"{task}-pag-scale")
            controls["pag_adaptive_scale"] = gr.Slider(0.0, 0.01, value=0.0, step=0.0005, label="PAG adaptive scale",
                                                       info="PAG fades by this much per timestep towards the end")
            controls["pag_layers"] = gr.Textbox(value=DEFAULT_PAG_LAYERS, label="PAG layers",
                                                info="self-attention layers to perturb: mid, down_blocks.1, up_blocks.0…")
        with gr.Row():
            classes = classifier_class_names()
            controls["classifier_class"] = gr.Dropdown(
                ["", *classes], value="", label="Classifier guidance: class", allow_custom_value=True,
                info="steers towards a class of the model's noise-aware classifier (the embedded model's: emoji "
                     "categories)" if classes else "no guidance classifier is installed", interactive=bool(classes),
                elem_id=f"{task}-classifier-class")
            controls["classifier_scale"] = gr.Slider(0.0, MAX_CLASSIFIER_SCALE, value=0.0, step=0.5, label="Classifier scale",
                                                     info="s in ε − √(1−ᾱ)·s·∇log p(y|x_t); 0 = off, about 10 steers the embedded model",
                                                     elem_id=f"{task}-classifier-scale")
    return controls
