"""The training tab's presets (settings saved by name, without the data) and its settings file for the command line
(`python -m pipelines.training`, pipelines/training/__main__.py), on the page and as API endpoints:
/training_presets, /save_training_preset (name, settings), /load_training_preset (name -> settings)."""

from __future__ import annotations

import json
import shlex
import tempfile
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import gradio as gr

from pipelines.training.presets import load_preset, preset_names, save_preset, settings_document
from pipelines.training.request import CAPTION_DROPOUTS, LEARNING_RATES, TrainingRequest
from studio.context import StudioContext
from studio.errors import user_errors

COMMAND = "python -m pipelines.training --settings {file} --data {data}{model}"
PARALLEL_COMMAND = "torchrun --nproc_per_node 2 -m pipelines.training --settings {file} --data {data}{model}"


@dataclass
class PresetControls:
    preset: gr.Dropdown          # the saved presets
    preset_name: gr.Textbox      # the name "Save preset" saves under
    save: gr.Button
    load: gr.Button
    export: gr.Button
    settings_file: gr.File       # the exported settings file, to download
    hint: gr.Markdown            # the command that trains with it


def preset_layout(models_dir: Path) -> PresetControls:
    with gr.Accordion("Presets and the settings file", open=False):
        with gr.Row():
            preset = gr.Dropdown(choices=preset_names(models_dir), value=None, label="Preset",
                                 elem_id="lora-preset")
            preset_name = gr.Textbox(label="Save the settings as", placeholder="e.g. portrait style",
                                     elem_id="lora-preset-name")
        with gr.Row():
            load = gr.Button("Load preset", size="sm", elem_id="lora-load-preset")
            save = gr.Button("Save preset", size="sm", elem_id="lora-save-preset")
            export = gr.Button("Export settings file", size="sm", elem_id="lora-export")
        settings_file = gr.File(label="Settings file", interactive=False, elem_id="lora-settings-file")
        hint = gr.Markdown(command_hint("SETTINGS.json", ""))
    return PresetControls(preset=preset, preset_name=preset_name, save=save, load=load, export=export,
                          settings_file=settings_file, hint=hint)


def command_hint(file: str, folder: str, model=None) -> str:
    """The commands that train with an exported settings file, on one process and on several, on `model` (the
    loaded ModelSource; the command line's default is the embedded model)."""
    data = f"models/{folder.strip()}" if folder and folder.strip() else "YOUR_DATASET_FOLDER"
    chosen = f" --model {shlex.quote(model.location)}" if model is not None and model.kind != "embedded" else ""
    return (f"Train with it elsewhere: `{COMMAND.format(file=file, data=data, model=chosen)}`; on several GPUs: "
            f"`{PARALLEL_COMMAND.format(file=file, data=data, model=chosen)}`.")


def control_values(settings: dict) -> dict:
    """What the page's controls show for a preset: its settings, and a request's defaults for those it leaves out
    (as the command line trains with them), the learning rate its method's; sample prompts one a line. The name,
    which has no default, stays as it is when the preset has none."""
    values = {item.name: item.default for item in fields(TrainingRequest) if item.default is not MISSING} | settings
    if values["learning_rate"] is None:
        values["learning_rate"] = LEARNING_RATES[values["method"]]
    if values["caption_dropout"] is None:
        values["caption_dropout"] = CAPTION_DROPOUTS[values["method"]]
    values["sample_prompts"] = "\n".join(values["sample_prompts"] or [])
    return values


def export_settings(settings: dict) -> Path:
    """The settings as a file the command line reads, named after the training, in a folder of its own."""
    path = Path(tempfile.mkdtemp(prefix="training-settings-")) / f"{settings.get('name') or 'training'}.json"
    path.write_text(json.dumps(settings_document(settings), indent=2) + "\n")
    return path


def wire_presets(context: StudioContext, controls: PresetControls, settings_controls: dict, folder: gr.Textbox,
                 request_settings) -> None:
    """`request_settings(page values) -> checked settings` is the tab's (lora.py): what a training would use."""
    inputs = list(settings_controls.values())

    def page_settings(values) -> dict:
        return request_settings(dict(zip(settings_controls, values)))

    @user_errors
    def save(name, *values):
        save_preset(context.models.models_dir, (name or "").strip(), page_settings(values))
        return gr.update(choices=preset_names(context.models.models_dir), value=name.strip())

    @user_errors
    def load(name):
        if not name:
            raise gr.Error("Pick a preset to load (or save one first).")
        return {settings_controls[key]: value
                for key, value in control_values(load_preset(context.models.models_dir, name)).items()
                if key in settings_controls}

    @user_errors
    def export(folder_value, *values):
        path = export_settings(page_settings(values))
        loaded = context.models.current
        return path, command_hint(path.name, folder_value, loaded.source if loaded is not None else None)

    controls.save.click(save, inputs=[controls.preset_name, *inputs], outputs=controls.preset,
                        api_visibility="private")
    controls.load.click(load, inputs=controls.preset, outputs=inputs, api_visibility="private")
    controls.export.click(export, inputs=[folder, *inputs], outputs=[controls.settings_file, controls.hint],
                          api_visibility="private")
    _wire_preset_api(context, request_settings)


def _wire_preset_api(context: StudioContext, request_settings) -> None:
    @user_errors
    def training_presets() -> list[str]:
        return preset_names(context.models.models_dir)

    @user_errors
    def save_training_preset(name, settings) -> list[str]:
        if not isinstance(settings, dict):
            raise gr.Error(f"`settings` must be a JSON object of training settings (as /load_training_preset "
                           f"returns) but is {type(settings).__name__}.")
        save_preset(context.models.models_dir, (name or "").strip(), request_settings(settings))
        return preset_names(context.models.models_dir)

    @user_errors
    def load_training_preset(name) -> dict:
        return load_preset(context.models.models_dir, name or "")

    names = gr.JSON(visible=False, label="Training presets")
    name = gr.Textbox(visible=False, label="Preset name")
    gr.Button(visible=False).click(training_presets, outputs=names, api_name="training_presets", queue=False)
    gr.Button(visible=False).click(save_training_preset, inputs_kwargs={
        "name": name, "settings": gr.JSON(visible=False, label="Training settings (name, method, steps, …)")},
        outputs=names, api_name="save_training_preset", queue=False)
    gr.Button(visible=False).click(load_training_preset, inputs_kwargs={"name": name},
                                   outputs=gr.JSON(visible=False, label="Training settings"),
                                   api_name="load_training_preset", queue=False)


def refresh_presets(app: gr.Blocks, context: StudioContext, controls: PresetControls) -> None:
    """A (re)loaded page lists the presets saved since the app was built, by anyone."""
    app.load(lambda: gr.update(choices=preset_names(context.models.models_dir)), outputs=controls.preset,
             api_visibility="private", queue=False)
