"""Assembles the tabs into one Gradio app. No torch here: the tabs call `pipelines` services."""

from __future__ import annotations

import gradio as gr

from pipelines.samplers import model_default_sampler
from studio.context import StudioContext
from studio.tabs.explorer import build_explorer_tab
from studio.tabs.generate import build_generate_tab, settings_from_infotext
from studio.tabs.models import build_models_tab
from studio.tabs.pnginfo import build_pnginfo_tab
from studio.errors import user_errors

TITLE = "Diffusion Studio"


def model_defaults(context: StudioContext) -> dict:
    """Native size and sampler of the loaded model, for the controls' starting values."""
    model = context.models.current
    if model is None:
        return {"width": 512, "height": 512}
    pipeline = model.pipeline
    side = pipeline.unet.config.sample_size * pipeline.vae_scale_factor if hasattr(pipeline, "unet") else 512
    side = side if isinstance(side, int) else 512
    return {"width": side, "height": side, "sampler": model_default_sampler(model.scheduler_config),
            "preview_every": 1 if side <= 128 else 5}


def build_app(context: StudioContext) -> gr.Blocks:
    defaults = model_defaults(context)
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"# {TITLE}")
        header = gr.Markdown(context.status_markdown(), elem_id="studio-status")
        with gr.Tabs() as tabs:
            with gr.Tab("Text-to-Image", id="txt2img"):
                txt2img = build_generate_tab(context, task="txt2img", defaults=defaults)
                send_to_img2img = gr.Button("Send selected image to Image-to-Image", size="sm")
            with gr.Tab("Image-to-Image", id="img2img"):
                img2img = build_generate_tab(context, task="img2img", defaults=defaults)
            with gr.Tab("PNG Info", id="pnginfo"):
                png_text, png_to_txt2img, png_to_img2img, png_file = build_pnginfo_tab()
            with gr.Tab("Diffusion Explorer", id="explorer"):
                build_explorer_tab(context)
            with gr.Tab("Models & memory", id="models"):
                build_models_tab(context, status_outputs=[header])

        def selected_image(gallery_value, index, texts):
            if not gallery_value:
                raise gr.Error("Generate an image first, then select it in the gallery.")
            index = index or 0
            item = gallery_value[index]
            image = item[0] if isinstance(item, (list, tuple)) else item.get("image", item)
            image = getattr(image, "path", None) or (image.get("path") if isinstance(image, dict) else image)
            settings = settings_from_infotext(texts[index]) if texts and index < len(texts) else \
                [gr.skip()] * len(img2img.settings_outputs())
            return [image, *settings, gr.Tabs(selected="img2img")]

        send_to_img2img.click(user_errors(selected_image), inputs=[txt2img.gallery, txt2img.selected, txt2img.infotexts],
                              outputs=[img2img.init_image, *img2img.settings_outputs(), tabs], api_visibility="private")

        def restore(text, target):
            return [*settings_from_infotext(text), gr.Tabs(selected=target)]

        png_to_txt2img.click(user_errors(lambda text: restore(text, "txt2img")), inputs=png_text,
                             outputs=[*txt2img.settings_outputs(), tabs], api_visibility="private")
        png_to_img2img.click(user_errors(lambda text, path: [path, *restore(text, "img2img")]),
                             inputs=[png_text, png_file], outputs=[img2img.init_image, *img2img.settings_outputs(), tabs],
                             api_visibility="private")
        app.load(context.status_markdown, outputs=header, api_visibility="private")
    return app
