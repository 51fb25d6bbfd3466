"""The pickers under each prompt that write what a prompt names from models/: a LoRA as `<lora:name:weight>`, a
textual-inversion embedding as its name (in the prompt, or in the negative prompt, where negative embeddings go).
The files are listed again whenever a list is opened, so a file put there meanwhile shows up."""

from __future__ import annotations

import gradio as gr

from pipelines.lora.adapters import lora_files
from pipelines.models.embeddings import embedding_files
from studio.context import StudioContext


def network_pickers(context: StudioContext, task: str, prompt: gr.Textbox, negative_prompt: gr.Textbox) -> None:
    """Both pickers, folded away (as A1111's extra networks are): open, they would push the results below the fold."""
    with gr.Accordion("LoRAs and embeddings", open=False, elem_id=f"{task}-networks"):
        lora_picker(context, task, prompt)
        embedding_picker(context, task, prompt, negative_prompt)


def lora_picker(context: StudioContext, task: str, prompt: gr.Textbox) -> None:
    """A LoRA list that writes `<lora:name:weight>` into the prompt (the files under models/lora/)."""
    def names() -> list[str]:
        return list(lora_files(context.models.lora_dir))

    with gr.Row():
        picker = gr.Dropdown(names(), value=None, label="LoRA", scale=3, elem_id=f"{task}-lora",
                             info="from models/lora/; inserted as <lora:name:weight>")
        weight = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="LoRA weight", scale=2)
        insert = gr.Button("Add to prompt", scale=1, size="sm", elem_id=f"{task}-lora-add")

    def add(text: str, name: str | None, amount: float) -> str:
        if not name:
            raise gr.Error("Pick a LoRA first (put .safetensors files in models/lora/).")
        return f"{text.rstrip()} <lora:{name}:{amount:g}>".strip()

    insert.click(add, inputs=[prompt, picker, weight], outputs=prompt, api_visibility="private")
    picker.focus(lambda: gr.Dropdown(choices=names()), outputs=picker, api_visibility="private")


def embedding_picker(context: StudioContext, task: str, prompt: gr.Textbox, negative_prompt: gr.Textbox) -> None:
    """An embedding list that writes the embedding's name into the prompt or the negative prompt (the files under
    models/embeddings/); the name in a prompt is what applies it."""
    def names() -> list[str]:
        return list(embedding_files(context.models.embeddings_dir))

    with gr.Row():
        picker = gr.Dropdown(names(), value=None, label="Embedding", scale=3, elem_id=f"{task}-embedding",
                             info="from models/embeddings/; a textual inversion, applied where its name is written")
        to_prompt = gr.Button("Add to prompt", scale=1, size="sm", elem_id=f"{task}-embedding-add")
        to_negative = gr.Button("Add to negative", scale=1, size="sm", elem_id=f"{task}-embedding-negative")

    def add(text: str, name: str | None) -> str:
        if not name:
            raise gr.Error("Pick an embedding first (put .safetensors files in models/embeddings/).")
        return f"{text.rstrip()} {name}".strip()

    to_prompt.click(add, inputs=[prompt, picker], outputs=prompt, api_visibility="private")
    to_negative.click(add, inputs=[negative_prompt, picker], outputs=negative_prompt, api_visibility="private")
    picker.focus(lambda: gr.Dropdown(choices=names()), outputs=picker, api_visibility="private")
