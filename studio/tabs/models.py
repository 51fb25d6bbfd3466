"""Models & memory: pick, load and unload a model; choose the memory mode; see the figures."""

from __future__ import annotations

import gradio as gr

from pipelines.memory import MemoryMode
from pipelines.models import EMBEDDED_NAME
from studio.context import StudioContext
from studio.errors import user_errors

MODE_CHOICES = ["auto", *(m.value for m in MemoryMode if m is not MemoryMode.CPU)]


def local_choices(context: StudioContext) -> list[str]:
    """The embedded model plus every diffusers folder and .safetensors file under models/."""
    choices = [EMBEDDED_NAME]
    folder = context.models.models_dir
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if (entry / "model_index.json").exists() or entry.suffix == ".safetensors":
                choices.append(str(entry))
    return choices


def build_models_tab(context: StudioContext, status_outputs: list) -> None:
    gr.Markdown("Load the embedded model, a diffusers folder or `.safetensors` file under `models/`, or a "
                "Hugging Face hub id (from your local cache when offline). Loading replaces the current model "
                "and gives its memory back.")
    with gr.Row():
        picker = gr.Dropdown(local_choices(context), value=EMBEDDED_NAME, label="Local models",
                             allow_custom_value=False, scale=3)
        refresh = gr.Button("↻ Rescan models/", scale=1)
    custom = gr.Textbox(label="…or a hub id / path", placeholder="owner/model-name or models/my-model.safetensors")
    with gr.Row():
        load = gr.Button("Load", variant="primary", elem_id="models-load")
        unload = gr.Button("Unload")
    mode = gr.Radio(MODE_CHOICES, value=context.models.memory.requested_mode, label="Memory mode (GPU only)",
                    info="high: all on GPU · balanced: model offload · low: + attention slicing, VAE tiling · "
                         "sequential: layer-by-layer offload")
    status = gr.Markdown(context.status_markdown(), elem_id="models-status")

    @user_errors
    def load_model(choice, typed, progress=gr.Progress()):
        spec = (typed or "").strip() or choice
        progress(0, desc=f"Loading {spec}…")
        context.models.load(spec, from_ui=True)
        context.startup_note = ""
        markdown = context.status_markdown()
        return [markdown] * (1 + len(status_outputs))

    @user_errors
    def unload_model():
        context.models.unload()
        context.startup_note = "The model was unloaded."
        markdown = context.status_markdown()
        return [markdown] * (1 + len(status_outputs))

    @user_errors
    def change_mode(choice):
        context.models.memory.requested_mode = choice
        if context.models.current is not None and context.models.memory.device.type == "cuda":
            if choice == "auto":
                context.models.memory.place(context.models.current.pipeline)
            else:
                context.models.set_memory_mode(MemoryMode(choice))
        elif context.models.memory.device.type != "cuda":
            gr.Info("Memory modes apply to CUDA GPUs; on this device everything stays where it is.")
        return context.status_markdown()

    outputs = [status, *status_outputs]
    load.click(load_model, inputs=[picker, custom], outputs=outputs, concurrency_id="device", concurrency_limit=1,
               api_name="load_model")
    unload.click(unload_model, outputs=outputs, concurrency_id="device", concurrency_limit=1, api_name="unload_model")
    mode.change(change_mode, inputs=mode, outputs=status, concurrency_id="device", concurrency_limit=1,
                api_visibility="private")
    refresh.click(lambda: gr.Dropdown(choices=local_choices(context)), outputs=picker, api_visibility="private")
