"""Models & memory: pick, load and unload a model; choose the memory mode; see the figures."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipelines.core.paths import inside
from pipelines.models.memory import MemoryMode
from pipelines.models.sources import EMBEDDED_NAME
from studio.context import StudioContext
from studio.errors import user_errors

MODE_CHOICES = ["auto", *(m.value for m in MemoryMode if m is not MemoryMode.CPU)]
DEVICE_QUEUE = {"concurrency_id": "device", "concurrency_limit": 1}


@dataclass
class ModelsTab:
    loaded: object     # the Load event: app.py chains what follows a successful load (the tabs' defaults)
    status: gr.Markdown    # the same figures as the page's header, written with it


def local_choices(context: StudioContext) -> list[str]:
    """The embedded model plus every diffusers folder and .safetensors file under models/ (not a link that leads out
    of models/: loading it would be refused)."""
    choices = [EMBEDDED_NAME]
    folder = context.models.models_dir
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if ((entry / "model_index.json").exists() or entry.suffix == ".safetensors") and inside(entry, [folder]):
                choices.append(str(entry))
    return choices


def build_models_tab(context: StudioContext, *, header: gr.Markdown) -> ModelsTab:
    gr.Markdown("Load the embedded model, a diffusers folder or `.safetensors` file under `models/`, or a "
                "Hugging Face hub id (from your local cache when offline). Loading replaces the current model "
                "and gives its memory back; if the new one fails to load, the current one stays.")
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
    status = gr.Markdown(header.value, label="Model and memory", elem_id="models-status")   # one reading
    statuses = {status, header}

    def both(markdown: str) -> dict:
        return {status: markdown, header: markdown}

    @user_errors
    def load_model(model, hub_id_or_path=None, progress=gr.Progress()):
        spec = (hub_id_or_path or "").strip() or model
        progress(0, desc=f"Loading {spec}…")
        context.models.load(spec, from_ui=True)
        context.startup_error = ""
        return both(context.status_markdown())

    @user_errors
    def unload_model():
        context.models.unload()
        gr.Info("The model was unloaded and its memory given back.")
        return both(context.status_markdown())

    @user_errors
    def change_mode(choice):
        if context.models.memory.device.type != "cuda":
            gr.Info(f"Memory modes apply to CUDA GPUs; on {context.models.memory.device.type} everything stays "
                    "where it is, so the mode is left as it was.")
            return both(context.status_markdown())
        context.models.set_memory_mode(choice)
        return both(context.status_markdown())

    # A failure is told in its toast and marked on this tab's status alone (until the next Load, Unload or mode
    # change here), never on the header over every tab, where it outlived any later success.
    on_status = {"show_progress_on": status, **DEVICE_QUEUE}
    loaded = load.click(load_model, inputs=[picker, custom], outputs=statuses, api_name="load_model", **on_status)
    # whatever happened (a failed load keeps the model that was there), the status says what is loaded now
    loaded.then(lambda: both(context.status_markdown()), outputs=statuses, api_visibility="private",
                show_progress="hidden")
    unload.click(unload_model, outputs=statuses, api_name="unload_model", **on_status)
    # `input`, not `change`: putting the radio back below is no new choice. Whatever happened (a CPU, a training
    # that holds the model), the radio then shows the mode asked for and in force.
    mode.input(change_mode, inputs=mode, outputs=statuses, api_visibility="private", **on_status).then(
        lambda: context.models.memory.requested_mode, outputs=mode, api_visibility="private", show_progress="hidden")
    refresh.click(lambda: gr.Dropdown(choices=local_choices(context)), outputs=picker, api_visibility="private")
    return ModelsTab(loaded=loaded, status=status)
