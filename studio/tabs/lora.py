"""Training: drop images, pick a method (LoRA, DreamBooth, textual inversion), press Train, watch the loss and the
samples, use `<lora:name:1>` (or, for an embedding, its name) in a prompt.

The training is a background job on the device worker (pipelines/jobs/worker.py), the one thread all model
work runs on: a second torch thread pool would halve the speed of both on a small CPU. A generation
asked for meanwhile runs between two training steps; Pause holds the training until Resume. The job's
id is kept in the browser, so a reloaded page follows the run again. What a run shows is training_results.py's;
presets and the command line's settings file are training_presets.py's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from pipelines.jobs.worker import Priority
from pipelines.lora.judge import feature_distances
from pipelines.training.data import dataset_folder, read_dataset
from pipelines.training.loop import train
from pipelines.training.presets import SETTING_FIELDS
from pipelines.training.request import (CAPTION_DROPOUTS, LEARNING_RATES, MAX_REPEATS, METHOD_NAMES, METHODS,
                                        TrainingRequest)
from studio.context import StudioContext, owns, session_of
from studio.errors import user_errors
from studio.tabs.training_presets import PresetControls, preset_layout, refresh_presets, wire_presets
from studio.tabs.training_results import follow_training

QUEUE = {"concurrency_id": "jobs", "concurrency_limit": 16, "show_progress": "hidden"}
THUMBNAIL_PX = 96            # the side of the dropped images' thumbnails
# The settings only some methods read, shown (and passed to a training) for those alone
METHOD_SETTINGS = {"trigger": {"lora", "dreambooth"}, "rank": {"lora", "dreambooth"}, "alpha": {"lora", "dreambooth"},
                   "train_text_encoder": {"lora", "dreambooth"}, "class_prompt": {"dreambooth"},
                   "class_images": {"dreambooth"}, "prior_loss_weight": {"dreambooth"},
                   "vectors": {"textual_inversion"}, "init_word": {"textual_inversion"}}
TRIGGER_LABELS = {"lora": ("Trigger word", "e.g. pencil style"),
                  "dreambooth": ("Identifier (a rare word, then the class)", "sks dog")}
# `/train_lora`'s parameters after images, folder and captions, in the order positional callers rely on (the
# first fifteen as they always were; `repeats`, the API's own, is every image's unless the table gives one)
API_SETTINGS = ("name", "trigger", "steps", "rank", "batch_size", "learning_rate", "alpha", "warmup_steps",
                "min_snr_gamma", "noise_offset", "caption_dropout", "flip", "seed", "checkpoint_every", "sample_every",
                "method", "repeats", "sample_prompts", "bucketing", "train_text_encoder", "vectors", "init_word",
                "class_prompt", "class_images", "prior_loss_weight", "sample_steps")
WHOLE_SETTINGS = {"steps", "rank", "batch_size", "warmup_steps", "seed", "checkpoint_every", "sample_every",
                  "sample_steps", "vectors", "class_images"}


@dataclass
class LoraTab:
    files: gr.File
    folder: gr.Textbox
    thumbnails: gr.Gallery         # the images the training will read, small
    captions: gr.Dataframe         # file, caption, repeats
    settings: dict                 # TrainingRequest field -> control
    presets: PresetControls
    train: gr.Button
    pause: gr.Button
    resume: gr.Button
    stop: gr.Button
    status: gr.Markdown
    loss: gr.LinePlot
    samples: gr.Gallery
    result: gr.JSON
    job_id: gr.Textbox
    saved_job: gr.BrowserState

    @property
    def api_outputs(self) -> list:
        """What `/train_lora` returns, in order: status, loss, samples, result, job id."""
        return [self.status, self.loss, self.samples, self.result, self.job_id]

    @property
    def outputs(self) -> list:
        """What training updates on the page: the API's outputs, then the job id in the browser's storage."""
        return [*self.api_outputs, self.saved_job]


def build_lora_tab(context: StudioContext) -> LoraTab:
    tab = _layout(context.models.models_dir)
    _wire_dataset(context, tab)
    _wire_method(tab)
    wire_presets(context, tab.presets, tab.settings, tab.folder, request_settings)
    _wire_training(context, tab)
    return tab


def _layout(models_dir: Path) -> LoraTab:
    gr.Markdown("Drop a handful of images of one subject or style, pick a method, give it a name, press **Train**. "
                "The loss and sample images update as it learns. A LoRA lands in `models/lora/` and works in any "
                "prompt as `<lora:name:1>` (and in A1111, ComfyUI and diffusers); DreamBooth trains a LoRA on an "
                "identifier beside images of its class; textual inversion an embedding in `models/embeddings/`, "
                "used by writing its name. Training shares the one device thread: a generation asked for meanwhile "
                "runs between two training steps.")
    with gr.Row():
        with gr.Column(scale=2):
            settings = {"method": gr.Radio([(METHOD_NAMES[method], method) for method in METHODS], value="lora",
                                            label="Method", elem_id="lora-method")}
            files, thumbnails, folder, captions = _dataset_controls()
            settings |= _settings_controls()
            presets = preset_layout(models_dir)
            with gr.Row():
                train = gr.Button("Train", variant="primary", elem_id="lora-train")
                pause = gr.Button("Pause", elem_id="lora-pause")
                resume = gr.Button("Resume", elem_id="lora-resume")
                stop = gr.Button("Stop", variant="stop", elem_id="lora-stop")
        with gr.Column(scale=3):
            status = gr.Markdown(label="Status", elem_id="lora-status", latex_delimiters=[])   # no KaTeX pass a second
            loss = gr.LinePlot(x="step", y="loss", color="curve", label="Loss", elem_id="lora-loss", height=260)
            samples = gr.Gallery(label="Samples: step 0 and the latest, same prompts and seeds", columns=4, height=300,
                                 allow_preview=False, interactive=False, elem_id="lora-samples",
                                 elem_classes=["studio-pixels"], format="png")
            result = gr.JSON(label="Result", elem_id="lora-result")
            job_id = gr.Textbox(visible=False, label="Job id")
    return LoraTab(files=files, folder=folder, thumbnails=thumbnails, captions=captions,
                   settings={key: settings[key] for key in API_SETTINGS if key in settings}, presets=presets,
                   train=train, pause=pause, resume=resume, stop=stop, status=status, loss=loss, samples=samples,
                   result=result, job_id=job_id,
                   saved_job=gr.BrowserState(None, storage_key="diffusion-studio-lora-job"))


def _dataset_controls() -> tuple:
    files = gr.File(file_count="multiple", label="Images (or a .zip; a .txt of the same name is the caption)",
                    elem_id="lora-files")
    thumbnails = gr.Gallery(label="The images", columns=8, height="auto", allow_preview=False,
                            interactive=False, elem_id="lora-thumbnails", format="png")
    folder = gr.Textbox(label="…or a dataset folder under models/", placeholder="datasets/my-style",
                        elem_id="lora-folder")
    captions = gr.Dataframe(headers=["file", "caption", "repeats"], datatype=["str", "str", "number"],
                            column_count=(3, "fixed"), interactive=True, elem_id="lora-captions",
                            label="Captions and repeats (edit them; the trigger word goes in front; an image "
                                  "repeated n times counts n times per pass)")
    return files, thumbnails, folder, captions


def _settings_controls() -> dict:
    """The training's settings, each the control of the `TrainingRequest` field of its key."""
    with gr.Row():
        settings = {"name": gr.Textbox(value="my-lora", label="Name (LoRA file, or the embedding's prompt word)",
                                       elem_id="lora-name"),
                    "trigger": gr.Textbox(value="", label=TRIGGER_LABELS["lora"][0],
                                          placeholder=TRIGGER_LABELS["lora"][1], elem_id="lora-trigger")}
    with gr.Row():
        settings["class_prompt"] = gr.Textbox(value="", label="Class prompt", placeholder="dog", visible=False,
                                              elem_id="lora-class-prompt")
        settings["class_images"] = gr.Number(value=50, precision=0, label="Class images", visible=False)
        settings["prior_loss_weight"] = gr.Number(value=1.0, label="Prior-loss weight", visible=False)
    with gr.Row():
        settings["vectors"] = gr.Slider(1, 75, value=8, step=1, precision=0, label="Vectors per token", visible=False)
        settings["init_word"] = gr.Textbox(value="*", label="Initial word (the vectors start as its embedding)",
                                           visible=False, elem_id="lora-init-word")
    with gr.Row():
        settings["steps"] = gr.Slider(10, 3000, value=300, step=10, precision=0, label="Steps", elem_id="lora-steps")
        settings["rank"] = gr.Slider(1, 64, value=8, step=1, precision=0, label="Rank")
        settings["batch_size"] = gr.Slider(1, 16, value=4, step=1, precision=0, label="Batch size")
    settings["sample_prompts"] = gr.Textbox(value="", lines=2, label="Sample prompts (one a line; empty: the first "
                                            "two captions)", elem_id="lora-sample-prompts")
    with gr.Accordion("More settings", open=False):
        with gr.Row():
            settings["learning_rate"] = gr.Number(value=LEARNING_RATES["lora"], label="Learning rate",
                                                  elem_id="lora-learning-rate")
            settings["alpha"] = gr.Number(value=8, label="Alpha (scale = alpha / rank)")
            settings["warmup_steps"] = gr.Number(value=20, precision=0, label="Warm-up steps")
        with gr.Row():
            settings["min_snr_gamma"] = gr.Number(value=5.0, label="Min-SNR γ (0: off)")
            settings["noise_offset"] = gr.Number(value=0.0, label="Noise offset")
            settings["caption_dropout"] = gr.Number(value=CAPTION_DROPOUTS["lora"], label="Caption dropout")
        with gr.Row():
            settings["flip"] = gr.Checkbox(value=True, label="Mirror images at random")
            settings["bucketing"] = gr.Checkbox(value=True, label="Keep aspect ratios (buckets)")
            settings["train_text_encoder"] = gr.Checkbox(value=False, label="Train the text encoder too")
        with gr.Row():
            settings["seed"] = gr.Number(value=0, precision=0, label="Seed")
            settings["checkpoint_every"] = gr.Number(value=50, precision=0, label="Checkpoint every N steps")
            settings["sample_every"] = gr.Number(value=50, precision=0, label="Samples every N steps (0: off)")
            settings["sample_steps"] = gr.Number(value=20, precision=0, label="Sampler steps per sample")
    return settings


def method_updates(tab: LoraTab, method: str) -> dict:
    """Each method's own settings shown, the others' hidden; the trigger box named for LoRA or DreamBooth."""
    updates = {tab.settings[key]: gr.update(visible=method in methods) for key, methods in METHOD_SETTINGS.items()}
    if method in TRIGGER_LABELS:
        label, placeholder = TRIGGER_LABELS[method]
        updates[tab.settings["trigger"]] = gr.update(visible=True, label=label, placeholder=placeholder)
    return updates


def _wire_method(tab: LoraTab) -> None:
    method = tab.settings["method"]
    # `change` also follows a loaded preset; the learning rate and the caption dropout follow the user's choice
    # alone (`input`), so that a preset's own stay
    method.change(lambda chosen: method_updates(tab, chosen), inputs=method,
                  outputs=[tab.settings[key] for key in METHOD_SETTINGS], api_visibility="private", queue=False)
    method.input(lambda chosen: (LEARNING_RATES[chosen], CAPTION_DROPOUTS[chosen]), inputs=method,
                 outputs=[tab.settings["learning_rate"], tab.settings["caption_dropout"]], api_visibility="private",
                 queue=False)


def _wire_dataset(context: StudioContext, tab: LoraTab) -> None:
    @user_errors
    def show_dataset(files, folder):
        paths = files or (dataset_folder(folder, context.models.models_dir) if folder else [])
        items = read_dataset(paths) if paths else []
        thumbnails = []
        for item in items:
            thumbnail = item.image.copy()
            thumbnail.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            thumbnails.append((thumbnail, item.name))
        return [[item.name, item.caption, 1] for item in items], thumbnails

    for trigger in (tab.files.change, tab.folder.submit):
        trigger(show_dataset, inputs=[tab.files, tab.folder], outputs=[tab.captions, tab.thumbnails],
                api_visibility="private")


def request_settings(settings: dict) -> dict:
    """The training settings of the page's (or the API's, or a preset's) values, checked as a request checks them:
    numbers typed, an empty learning rate the method's default, sample prompts one a line, and the settings of the
    other methods left out (the page keeps them, hidden)."""
    unknown = sorted(set(settings) - set(SETTING_FIELDS))
    if unknown:
        raise ValueError(f"Not training settings: {', '.join(unknown)}. Known: {', '.join(SETTING_FIELDS)}.")
    method = settings.get("method") or "lora"
    values = {}
    for key, value in settings.items():
        if value is None or value == "" or method not in METHOD_SETTINGS.get(key, {method}):
            continue
        if (key, value) in (("learning_rate", 0), ("caption_dropout", -1)):   # /train_lora's "the method's own"
            continue
        if key == "sample_prompts" and isinstance(value, str):
            value = [line.strip() for line in value.splitlines() if line.strip()] or None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = int(value) if key in WHOLE_SETTINGS else float(value)
        if value is not None:
            values[key] = value
    # the request's own checks, with the data left out (and a name, which a preset need not carry)
    TrainingRequest(images=[Image.new("RGB", (8, 8))],
                    **({"name": "settings", "trigger": "sks", "class_prompt": "class"} | values))
    return values


def training_request(files, captions, settings: dict, repeats=None) -> TrainingRequest:
    """The training request from the page's (or the API's) values: the table's captions and repeats win over the
    files' captions and `repeats` (every image's, 1 when not given)."""
    if not files:
        raise ValueError("Drop the training images first (png, jpg, webp, or a .zip of them), or name a dataset "
                         "folder under models/.")
    dataset = read_dataset(files)
    rows = captions.values.tolist() if isinstance(captions, pd.DataFrame) else (captions or [])
    table = {str(row[0]): list(row[1:]) for row in rows if row and row[0]}     # file -> [caption, repeats]
    every = _count(repeats, "`repeats`") or 1
    image_captions, image_repeats = [], []
    for item in dataset:
        caption, count = (table.get(item.name, []) + [None, None])[:2]
        image_captions.append(item.caption if item.name not in table else str(caption or ""))
        image_repeats.append(_count(count, f"The repeats of {item.name}") or every)
    values = request_settings(settings)
    if "name" not in values:
        raise ValueError("Training needs a `name` (the LoRA's file, or the embedding's prompt word).")
    return TrainingRequest(images=[item.image for item in dataset], captions=image_captions, repeats=image_repeats,
                           **values)


def _count(value, what: str) -> int | None:
    """A whole number from a table cell or the API (None: not given)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    refused = ValueError(f"{what} must be a whole number from 1 to {MAX_REPEATS} but is {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise refused from None
    if math.isnan(number):     # an empty cell of a number column
        return None
    if not number.is_integer():
        raise refused
    return int(number)


def _wire_training(context: StudioContext, tab: LoraTab) -> None:
    def trainer(outputs: list, method: str | None = None):
        # `images` has no default: the API requires it (None with a `folder` instead)
        @user_errors
        def train_job(images, folder=None, captions=None, repeats=None, identifier=None,
                      request: gr.Request = None, **settings) -> Iterator[dict]:
            if not images and folder:
                images = dataset_folder(folder, context.models.models_dir)
            settings |= {"method": method} if method else {}
            settings |= {"trigger": identifier} if identifier is not None else {}
            training = training_request(images, captions, settings, repeats)
            models = context.models
            runs = models.lora_dir / ".runs"      # checkpoints of unfinished runs, beside the LoRAs
            # the effect score: the samples' distance to the training images in the shipped emoji judge's features
            job = context.worker.submit(lambda job: train(models, training, job, cache_dir=runs,
                                                          score=feature_distances),
                                        kind=f"train-{training.method.replace('_', '-')}",
                                        priority=Priority.BACKGROUND, owner=session_of(request))
            started = {tab.job_id: job.id, tab.saved_job: job.id, tab.status: "Preparing the data…"}
            for update in itertools.chain([started], follow_training(tab, job)):
                yield {component: value for component, value in update.items() if component in outputs}
        if method != "dreambooth":
            return train_job

        # DreamBooth's identifier and class are the training itself: the API requires them
        def train_dreambooth(images, identifier, class_prompt, folder=None, captions=None, repeats=None,
                             request: gr.Request = None, **settings) -> Iterator[dict]:
            yield from train_job(images, folder, captions, repeats, identifier, request, class_prompt=class_prompt,
                                 **settings)
        return train_dreambooth

    def controller(action: str):
        def control(job_id, request: gr.Request = None):
            job = context.owned_job(job_id, request)     # another session's training is not this page's to stop
            if job is None or job.finished:
                raise gr.Error("No training is running.")
            getattr(job, action)()
            return {tab.status: {"pause": "Paused: generations run meanwhile; Resume goes on.", "resume": "Resumed…",
                                 "cancel": "Stopping after this step; the file is saved (before the first "
                                           "step: nothing is written)."}[action]}
        return control

    page = {"images": tab.files, "folder": tab.folder, "captions": tab.captions, **tab.settings}
    tab.train.click(trainer(tab.outputs), inputs_kwargs=page, outputs=tab.outputs, api_visibility="private", **QUEUE)
    # the API's own triggers, which leave the browser's storage alone
    for method, inputs in _api_inputs(tab).items():
        gr.Button(visible=False).click(trainer(tab.api_outputs, None if method == "lora" else method),
                                       inputs_kwargs=inputs, outputs=tab.api_outputs, api_name=f"train_{method}",
                                       **QUEUE)
    for button, action in ((tab.pause, "pause"), (tab.resume, "resume"), (tab.stop, "cancel")):
        button.click(controller(action), inputs=tab.job_id, outputs={tab.status}, queue=False,
                     api_visibility="private")


def _api_inputs(tab: LoraTab) -> dict[str, dict]:
    """Each training endpoint's parameters: `/train_lora` all of the page's, in API_SETTINGS order; the other
    methods' their own and the shared ones, a name of their kind, the method's default learning rate, and
    DreamBooth's trigger called what it is, the identifier."""
    repeats = gr.Number(value=1, precision=0, visible=False, label="Repeats of every image (the captions' third "
                                                                   "column, where given, wins)")
    data = {"images": tab.files, "folder": tab.folder, "captions": tab.captions}
    inputs = {"lora": data | {key: repeats if key == "repeats" else tab.settings[key] for key in API_SETTINGS}}
    inputs["lora"]["learning_rate"] = gr.Number(value=0, visible=False,
                                                label="Learning rate (0: the method's own)")
    inputs["lora"]["caption_dropout"] = gr.Number(value=-1, visible=False, label="Caption dropout (-1: the method's "
                                                  "own, LoRA 0.1, DreamBooth and textual inversion 0)")
    for method, name, label in (("textual_inversion", "my-embedding", "Name (the embedding's file and prompt word)"),
                                ("dreambooth", "my-dreambooth", "Name (the LoRA's file)")):
        own = {key: control for key, control in tab.settings.items() if key != "method" and
               method in METHOD_SETTINGS.get(key, {method})}
        own["name"] = gr.Textbox(value=name, visible=False, label=label)
        own["learning_rate"] = gr.Number(value=LEARNING_RATES[method], visible=False, label="Learning rate")
        own["caption_dropout"] = gr.Number(value=CAPTION_DROPOUTS[method], visible=False, label="Caption dropout")
        if method == "dreambooth":     # what it learns and what it keeps: no default, so the API requires them
            own = {"identifier" if key == "trigger" else key: control for key, control in own.items()}
            own["identifier"] = gr.Textbox(value=None, visible=False, label="Identifier (e.g. sks dog)")
            own["class_prompt"] = gr.Textbox(value=None, visible=False, label="Class prompt (e.g. dog)")
        inputs[method] = data | {"repeats": repeats} | own
    return inputs


def wire_lora_resume(app: gr.Blocks, context: StudioContext, tab: LoraTab) -> None:
    """A reloaded page follows the training it started, and lists the presets saved meanwhile."""
    @user_errors
    def resume(job_id, request: gr.Request = None):
        job = context.find_job(job_id)
        if job is not None and not owns(request, job):   # the browser's owner cookie was cleared, or another user
            yield {tab.status: "The training this page started last belongs to another session; it is not shown."}
        elif job is not None and job.state.value != "failed":    # running: followed; finished: its result
            yield from follow_training(tab, job)

    app.load(resume, inputs=tab.saved_job, outputs=tab.outputs, api_visibility="private", **QUEUE)
    refresh_presets(app, context, tab.presets)
