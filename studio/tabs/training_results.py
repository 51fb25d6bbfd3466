"""What a training shows while it runs and when it ends: the status line, the loss curve, the samples, and the
result, each method in its own words (a LoRA's weight 0 and 1; an embedding's initial and trained vectors, and the
word a prompt uses; DreamBooth's identifier beside its class)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pandas as pd

from pipelines.jobs.worker import Job, JobCancelled
from pipelines.training.request import LossPoint, Samples, TrainingResult, TrainingStopped
from studio.tabs.generate import FAILED

# How often a running training is sent to the page: the browser shares the cores with the training, and each
# status line re-renders Markdown and each loss plot re-renders a Vega chart, so sending every step slowed page
# training against the API's (bench/lora_page.py measures the two side by side)
STATUS_EVERY_S = 1.0         # the status line ("Step n of N · loss · steps/s") at most this often
PLOT_EVERY_S = 5.0           # the loss plot at most this often, and at the end
PLOTTED_POINTS = 250         # at most this many points per curve in a plot (evenly spaced steps, the last kept)
SMOOTHING = 0.9              # exponential moving average of the loss, for the smoothed curve

# the two sets of effect samples: untrained and trained, in each method's words
SAMPLE_CAPTIONS = {"lora": ("weight 0", "weight 1"), "dreambooth": ("weight 0", "weight 1"),
                   "textual_inversion": ("initial vectors", "trained")}
DISTANCE_WORDS = {"lora": ("at weight 0", "at weight 1"), "dreambooth": ("at weight 0", "at weight 1"),
                  "textual_inversion": ("with the initial vectors", "with the trained ones")}


def follow_training(tab, job: Job) -> Iterator[dict]:
    """The job's loss points and samples into the tab (lora.py's `LoraTab`): the status at most every
    STATUS_EVERY_S, the plot at most every PLOT_EVERY_S (and at the last step), new samples at once; once the past
    is read (a reloaded page), all of it at once; at the end, everything, with the whole loss curve."""
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
    except JobCancelled as error:
        # queued, or stopped while DreamBooth's class images were drawn
        yield {tab.status: str(error) if isinstance(error, TrainingStopped) else "Stopped before it started."}
        return
    except Exception as error:
        yield {tab.status: f"{FAILED} {error}", tab.loss: _loss_frame(points, at_most=None)}
        raise
    yield {tab.job_id: job.id, tab.loss: _loss_frame(points, at_most=None),
           tab.samples: result_gallery(result, _prompts(first)),
           tab.status: "  \n".join([result_status(result), *result.warnings]), tab.result: result_summary(result)}


def result_status(result: TrainingResult) -> str:
    untrained, trained = DISTANCE_WORDS[result.method]
    verdict = f"moved the images by {result.effect:.1f} of 255 on average" if result.moved else \
        f"**barely changes the images** ({result.effect:.2f} of 255)"
    distances = (f"Distance of the samples to the training images (judge features): "
                 f"{result.feature_distance_before:.2f} {untrained}, {result.feature_distance_after:.2f} {trained}. "
                 if result.feature_distance_before is not None else "")
    use = (f"Use it as `{result.path.stem}` in a prompt or negative prompt." if result.method == "textual_inversion"
           else f"Use it as `<lora:{result.path.stem}:1>`.")
    if result.method == "dreambooth" and result.comparison:
        use += " The last samples are the identifier's prompt beside the class prompt's, at the same seeds."
    return (f"Saved `{result.path}` after {result.steps} steps on {result.base_model} (final loss "
            f"{result.final_loss:.4f}); it {verdict}. {distances}{use}")


def result_gallery(result: TrainingResult, prompts: list[str]) -> list:
    """The sample prompts untrained, then trained (same seeds); DreamBooth's comparison after them, the identifier's
    image and the class's at each seed side by side."""
    untrained, trained = SAMPLE_CAPTIONS[result.method]
    shown = [(image, f"{untrained}: {prompt}") for image, prompt in zip(result.before, prompts)] + \
        [(image, f"{trained}: {prompt}") for image, prompt in zip(result.after, prompts)]
    compared = list(result.comparison.items())
    for number in range(min((len(images) for _, images in compared), default=0)):
        shown += [(images[number], f"{prompt} · seed {number + 1}") for prompt, images in compared]
    return shown


def result_summary(result: TrainingResult) -> dict:
    """The result as JSON: names, not absolute paths (a client would take a path for a file to download)."""
    embedding = result.method == "textual_inversion"
    untrained, trained = (caption.replace(" ", "_") for caption in SAMPLE_CAPTIONS[result.method])
    measured = result.feature_distance_before is not None
    return {"method": result.method, "embedding" if embedding else "lora": result.path.stem,
            "file": f"models/{'embeddings' if embedding else 'lora'}/{result.path.name}", "steps": result.steps,
            "final_loss": result.final_loss, "effect": round(result.effect, 3), "moved": result.moved,
            "stopped": result.stopped, "base_model": result.base_model,
            "feature_distance_to_training": {untrained: round(result.feature_distance_before, 3),
                                             trained: round(result.feature_distance_after, 3)} if measured else None,
            "warnings": result.warnings}


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
