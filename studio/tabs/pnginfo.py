"""PNG Info: read the generation parameters of any PNG (ours or A1111's) and restore them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import gradio as gr

from pipelines.io.metadata import read_png_metadata
from studio.errors import user_errors


@dataclass
class PngInfoTab:
    file: gr.File
    infotext: gr.Textbox
    to_txt2img: gr.Button
    to_img2img: gr.Button
    to_inpaint: gr.Button
    to_controlnet: gr.Button


def build_pnginfo_tab() -> PngInfoTab:
    """The tab's layout and its read handler; app.py wires the send-to buttons to the tabs."""
    gr.Markdown("Drop a PNG made by this studio or by AUTOMATIC1111: its parameters appear below and can be "
                "sent back to a tab.")
    with gr.Row():
        with gr.Column():
            upload = gr.File(label="PNG file", file_types=[".png"], type="filepath", elem_id="pnginfo-file")
            shown = gr.Image(label="The image", interactive=False, height=256, elem_id="pnginfo-image",
                             elem_classes=["studio-pixels"], format="png")
        with gr.Column():
            infotext = gr.Textbox(label="Parameters", lines=6, elem_id="pnginfo-infotext")
            details = gr.JSON(label="Full request and library versions (this studio's PNGs only)")
            with gr.Row():
                to_txt2img = gr.Button("Send to Text-to-Image")
                to_img2img = gr.Button("Send to Image-to-Image")
                to_inpaint = gr.Button("Send to Inpainting", elem_id="pnginfo-to-inpaint")
                to_controlnet = gr.Button("Send to ControlNet", elem_id="pnginfo-to-controlnet")

    @user_errors
    def read(path):
        if not path:
            return {infotext: "", details: None, shown: None}
        text, extra = read_png_metadata(path)
        if text is None:
            gr.Warning("This PNG carries no generation parameters.")
        return {infotext: text or "", details: json.loads(json.dumps(extra)) if extra else None, shown: path}

    upload.change(read, inputs=upload, outputs=[infotext, details, shown], api_name="png_info")
    return PngInfoTab(file=upload, infotext=infotext, to_txt2img=to_txt2img, to_img2img=to_img2img,
                      to_inpaint=to_inpaint, to_controlnet=to_controlnet)
