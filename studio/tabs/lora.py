"""LoRA training: drop images, press Train, watch the loss and the samples, use `<lora:name:1>`.

The training is a background job on the device worker (pipelines/jobs/worker.py), the one thread all model
work runs on: a second torch thread pool would halve the speed of both on a small CPU. A generation
asked for meanwhile runs between two training steps; Pause holds the training until Resume. The job's
id is kept in the browser, so a reloaded page follows the run again.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr
import numpy as np
import pandas as pd

from pipelines.jobs.worker import Job, JobCancelled, Priority
from pipelines.lora.judge import feature_distances
from pipelines.training.data import dataset_folder, read_dataset
from pipelines.training.request import TrainingRequest, LossPoint, Samples
from pipelines.training.loop import train
from studio.context import StudioContext, owns, session_of
from studio.errors import user_errors
from studio.tabs.generate import FAILED

# How often a running training is sent to the page: the browser shares the cores with the training, and each
# status line re-renders Markdown and each loss plot re-renders a Vega chart, so sending every step slowed page
# training against the API's (bench/lora_page.py measures the two side by side)
STATUS_EVERY_S = 1.0         # the status line ("Step n of N · loss · steps/s") at most this often
PLOT_EVERY_S = 5.0           # the loss plot at most this often, and at the end
PLOTTED_POINTS = 250         # at most this many points per curve in a plot (evenly spaced steps, the last kept)
SMOOTHING = 0.9              # exponential moving average of the loss, for the smoothed curve
QUEUE = {"concurrency_id": "jobs", "concurrency_limit": 16, "show_progress": "hidden"}
THUMBNAIL_PX = 96            # the side of the dropped images' thumbnails


@dataclass
class LoraTab:
    files: gr.File
    folder: gr.Textbox
    thumbnails: gr.Gallery         # the images the training will read, small
    captions: gr.Dataframe
    settings: dict                 # TrainingRequest field -> control
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
    tab = _layout()
    _wire_dataset(context, tab)
    _wire_training(context, tab)
    return tab


def _layout() -> LoraTab:
    gr.Markdown("Drop a handful of images of one subject or style, give the LoRA a name and a trigger word, press "
                "**Train**. The loss and sample images update as it learns; the file lands in `models/lora/` and "
                "works in any prompt as `<lora:name:1>` (and in A1111, ComfyUI and diffusers). Training shares the "
                "one device thread: a generation asked for meanwhile runs between two training steps.")
    with gr.Row():
        with gr.Column(scale=2):
            files = gr.File(file_count="multiple", label="Images (or a .zip; a .txt of the same name is the caption)",
                            elem_id="lora-files")
            thumbnails = gr.Gallery(label="The images", columns=8, height="auto", allow_preview=False,
                                    interactive=False, elem_id="lora-thumbnails", format="png")
            folder = gr.Textbox(label="…or a dataset folder under models/", placeholder="datasets/my-style",
                                elem_id="lora-folder")
            captions = gr.Dataframe(headers=["file", "caption"], datatype=["str", "str"], column_count=(2, "fixed"),
                                    interactive=True, label="Captions (edit them; the trigger word goes in front)",
                                    elem_id="lora-captions")
            with gr.Row():
                settings = {"name": gr.Textbox(value="my-lora", label="LoRA name", elem_id="lora-name"),
                            "trigger": gr.Textbox(value="", label="Trigger word", placeholder="e.g. pencil style",
                                                  elem_id="lora-trigger")}
            with gr.Row():
                settings["steps"] = gr.Slider(10, 3000, value=300, step=10, precision=0, label="Steps",
                                              elem_id="lora-steps")
                settings["rank"] = gr.Slider(1, 64, value=8, step=1, precision=0, label="Rank")
                settings["batch_size"] = gr.Slider(1, 16, value=4, step=1, precision=0, label="Batch size")
            with gr.Accordion("More settings", open=False):
                with gr.Row():
                    settings["learning_rate"] = gr.Number(value=5e-4, label="Learning rate")
                    settings["alpha"] = gr.Number(value=8, label="Alpha (scale = alpha / rank)")
                    settings["warmup_steps"] = gr.Number(value=20, precision=0, label="Warm-up steps")
                with gr.Row():
                    settings["min_snr_gamma"] = gr.Number(value=5.0, label="Min-SNR γ (0: off)")
                    settings["noise_offset"] = gr.Number(value=0.0, label="Noise offset")
                    settings["caption_dropout"] = gr.Number(value=0.1, label="Caption dropout")
                with gr.Row():
                    settings["flip"] = gr.Checkbox(value=True, label="Mirror images at random")
                    settings["seed"] = gr.Number(value=0, precision=0, label="Seed")
                    settings["checkpoint_every"] = gr.Number(value=50, precision=0, label="Checkpoint every N steps")
                    settings["sample_every"] = gr.Number(value=50, precision=0, label="Samples every N steps (0: off)")
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
    return LoraTab(files=files, folder=folder, thumbnails=thumbnails, captions=captions, settings=settings,
                   train=train, pause=pause, resume=resume, stop=stop, status=status, loss=loss, samples=samples,
                   result=result, job_id=job_id,
                   saved_job=gr.BrowserState(None, storage_key="diffusion-studio-lora-job"))


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
        return [[item.name, item.caption] for item in items], thumbnails

    for trigger in (tab.files.change, tab.folder.submit):
        trigger(show_dataset, inputs=[tab.files, tab.folder], outputs=[tab.captions, tab.thumbnails],
                api_visibility="private")


def training_request(files, captions, settings: dict) -> TrainingRequest:
    """The training request from the page's (or the API's) values: the table's captions win over the files'."""
    if not files:
        raise ValueError("Drop the training images first (png, jpg, webp, or a .zip of them), or name a dataset "
                         "folder under models/.")
    dataset = read_dataset(files)
    rows = captions.values.tolist() if isinstance(captions, pd.DataFrame) else (captions or [])
    edited = {str(row[0]): str(row[1] or "") for row in rows if row and row[0]}
    whole = {"steps", "rank", "batch_size", "warmup_steps", "seed", "checkpoint_every", "sample_every"}
    values = {key: (int(value) if key in whole else float(value) if isinstance(value, (int, float)) and
                    not isinstance(value, bool) else value) for key, value in settings.items() if value is not None}
    return TrainingRequest(images=[item.image for item in dataset],
                               captions=[edited.get(item.name, item.caption) for item in dataset], **values)


def _wire_training(context: StudioContext, tab: LoraTab) -> None:
    def trainer(outputs: list):
        # `images` has no default: the API requires it (None with a `folder` instead)
        @user_errors
        def train_lora_job(images, folder=None, captions=None, request: gr.Request = None,
                           **settings) -> Iterator[dict]:
            if not images and folder:
                images = dataset_folder(folder, context.models.models_dir)
            training = training_request(images, captions, settings)
            models = context.models
            runs = models.lora_dir / ".runs"      # checkpoints of unfinished runs, beside the LoRAs
            # the effect score: the samples' distance to the training images in the shipped emoji judge's features
            job = context.worker.submit(lambda job: train(models, training, job, cache_dir=runs,
                                                               score=feature_distances),
                                        kind="train-lora", priority=Priority.BACKGROUND, owner=session_of(request))
            started = {tab.job_id: job.id, tab.saved_job: job.id, tab.status: "Preparing the data…"}
            for update in itertools.chain([started], follow_training(tab, job)):
                yield {component: value for component, value in update.items() if component in outputs}
        return train_lora_job

    def controller(action: str):
        def control(job_id, request: gr.Request = None):
            job = context.owned_job(job_id, request)     # another session's training is not this page's to stop
            if job is None or job.finished:
                raise gr.Error("No training is running.")
            getattr(job, action)()
            return {tab.status: {"pause": "Paused: generations run meanwhile; Resume goes on.", "resume": "Resumed…",
                                 "cancel": "Stopping after this step; the LoRA is saved."}[action]}
        return control

    inputs = {"images": tab.files, "folder": tab.folder, "captions": tab.captions, **tab.settings}
    tab.train.click(trainer(tab.outputs), inputs_kwargs=inputs, outputs=tab.outputs, api_visibility="private",
                    **QUEUE)
    # the API's own trigger, which leaves the browser's storage alone
    gr.Button(visible=False).click(trainer(tab.api_outputs), inputs_kwargs=inputs, outputs=tab.api_outputs,
                                   api_name="train_lora", **QUEUE)
    for button, action in ((tab.pause, "pause"), (tab.resume, "resume"), (tab.stop, "cancel")):
        button.click(controller(action), inputs=tab.job_id, outputs={tab.status}, queue=False,
                     api_visibility="private")


def wire_lora_resume(app: gr.Blocks, context: StudioContext, tab: LoraTab) -> None:
    """A reloaded page follows the training it started."""
    @user_errors
    def resume(job_id, request: gr.Request = None):
        job = context.find_job(job_id)
        if job is not None and not owns(request, job):   # the browser's owner cookie was cleared, or another user
            yield {tab.status: "The training this page started last belongs to another session; it is not shown."}
        elif job is not None and job.state.value != "failed":    # running: followed; finished: its result
            yield from follow_training(tab, job)

    app.load(resume, inputs=tab.saved_job, outputs=tab.outputs, api_visibility="private", **QUEUE)


def follow_training(tab: LoraTab, job: Job) -> Iterator[dict]:
    """The job's loss points and samples into the tab: the status at most every STATUS_EVERY_S, the plot at most
    every PLOT_EVERY_S (and at the last step), new samples at once; once the past is read (a reloaded page), all of
    it at once; at the end, everything, with the whole loss curve."""
    points, first, latest = [], None, None
    status_sent = plot_sent = -float("inf")      # the first point is shown at once
    caught_up = object()
    for event in job.events(caught_up=caught_up):
        update, now, progress = {}, time.monotonic(), job.progress
        if isinstance(event, LossPoint):
            points.append(event)
            if now - plot_sent >= PLOT_EVERY_S or (progress is not None and event.step >= progress.total):
                update[tab.loss], plot_sent = _loss_frame(points), now
        elif isinstance(event, Samples):
            first, latest = (event, latest) if first is None else (first, event)
            update[tab.samples] = _sample_gallery(first, latest)
        elif event is caught_up and points:
            update[tab.loss], plot_sent = _loss_frame(points), now
        if progress is not None and (update or now - status_sent >= STATUS_EVERY_S):
            paused = " · paused" if job.paused else ""
            update[tab.status] = f"Step {progress.done} of {progress.total} · {progress.message}{paused}"
            status_sent = now
        if update:
            yield {tab.job_id: job.id, **update}
    try:
        result = job.result()
    except JobCancelled:
        yield {tab.status: "Stopped before it started."}
        return
    except Exception as error:
        yield {tab.status: f"{FAILED} {error}", tab.loss: _loss_frame(points, at_most=None)}
        raise
    verdict = f"moved the images by {result.effect:.1f} of 255 on average" if result.moved else \
        f"**barely changes the images** ({result.effect:.2f} of 255)"
    measured = result.feature_distance_before is not None
    distances = (f"Distance of the samples to the training images (judge features): "
                 f"{result.feature_distance_before:.2f} at weight 0, {result.feature_distance_after:.2f} at weight 1. "
                 if measured else "")
    status = (f"Saved `{result.path}` after {result.steps} steps on {result.base_model} (final loss "
              f"{result.final_loss:.4f}); it {verdict}. {distances}Use it as `<lora:{result.path.stem}:1>`.")
    samples = [(image, f"weight 0: {prompt}") for image, prompt in zip(result.before, _prompts(first))] + \
        [(image, f"weight 1: {prompt}") for image, prompt in zip(result.after, _prompts(first))]
    yield {tab.job_id: job.id, tab.loss: _loss_frame(points, at_most=None), tab.samples: samples,
           tab.status: "  \n".join([status, *result.warnings]),
           # names, not absolute paths: a client would take a path for a file to download
           tab.result: {"lora": result.path.stem, "file": f"models/lora/{result.path.name}", "steps": result.steps, "final_loss": result.final_loss,
                        "effect": round(result.effect, 3), "moved": result.moved, "stopped": result.stopped,
                        "base_model": result.base_model,
                        "feature_distance_to_training": {"weight_0": round(result.feature_distance_before, 3),
                                                         "weight_1": round(result.feature_distance_after, 3)}
                        if measured else None,
                        "warnings": result.warnings}}


def _prompts(samples: Samples | None) -> list[str]:
    return samples.prompts if samples is not None else [""] * 8


def _loss_frame(points: list[LossPoint], at_most: int | None = PLOTTED_POINTS) -> pd.DataFrame:
    """The raw and the smoothed loss (an exponential moving average over every step), at `at_most` evenly spaced
    steps each (None: every step), the first and the last among them."""
    smoothed, average = [], None
    for point in points:
        average = point.loss if average is None else SMOOTHING * average + (1 - SMOOTHING) * point.loss
        smoothed.append(average)
    kept = range(len(points)) if at_most is None or len(points) <= at_most else \
        np.unique(np.round(np.linspace(0, len(points) - 1, at_most)).astype(int))
    steps = [points[index].step for index in kept]
    return pd.DataFrame({"step": steps * 2, "loss": [points[index].loss for index in kept] +
                         [smoothed[index] for index in kept],
                         "curve": ["loss"] * len(kept) + ["smoothed"] * len(kept)})


def _sample_gallery(first: Samples, latest: Samples | None) -> list:
    shown = [(image, f"step {first.step}: {prompt}") for image, prompt in zip(first.images, first.prompts)]
    if latest is not None:
        shown += [(image, f"step {latest.step}: {prompt}") for image, prompt in zip(latest.images, latest.prompts)]
    return shown
