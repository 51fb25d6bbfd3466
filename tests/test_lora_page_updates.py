"""What a running LoRA training sends to the page (issue 25, item 2): the page trained slower than the API because
the browser, sharing the cores, re-rendered the status on every step and the loss plot every second. The follower
now sends the status at most every STATUS_EVERY_S, the plot at most every PLOT_EVERY_S with at most PLOTTED_POINTS
points a curve, new samples at once, and everything at the end. bench/lora_page.py measures the speed itself."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest
from PIL import Image

from pipelines.lora.train_request import LoraTrainingResult, LossPoint, Samples
from studio.tabs import lora

STEPS = 600
STEP_S = 0.05            # the fake clock's advance per event the follower reads


@pytest.fixture
def tab():
    with gr.Blocks():
        return lora._layout()


def _training(job) -> LoraTrainingResult:
    """The events of a 600-step training with samples at steps 0 and 300, as pipelines/lora/training.py emits them."""
    picture = Image.new("RGB", (8, 8), "red")
    job.emit(Samples(0, ["a cat"], [picture]))
    for step in range(1, STEPS + 1):
        job.emit(LossPoint(step, 1.0 / step, 1e-4, step * STEP_S))
        job.report(step, STEPS, f"loss {1.0 / step:.4f}")
        if step == STEPS // 2:
            job.emit(Samples(step, ["a cat"], [picture]))
    return LoraTrainingResult(path=Path("models/lora/cat.safetensors"), steps=STEPS, final_loss=1.0 / STEPS,
                              effect=12.0, moved=True, feature_distance_before=None, feature_distance_after=None,
                              before=[picture], after=[picture], stopped=False, warnings=[], base_model="tiny")


def test_a_running_training_sends_the_page_a_few_updates_a_second_and_all_of_it_at_the_end(tab, worker,
                                                                                           monkeypatch):
    job = worker.submit(_training, kind="train-lora")
    job.result(timeout=60)               # the follower then reads the whole run, as a page following it late does
    ticks = itertools.count()
    monkeypatch.setattr(lora.time, "monotonic", lambda: next(ticks) * STEP_S)   # one tick per event read
    updates = list(lora.follow_training(tab, job))
    seconds = next(ticks) * STEP_S        # the run as the follower's clock saw it
    assert seconds >= STEPS * STEP_S

    statuses = [update[tab.status] for update in updates[:-1] if tab.status in update]
    plots = [update[tab.loss] for update in updates[:-1] if tab.loss in update]
    samples = [update[tab.samples] for update in updates[:-1] if tab.samples in update]
    assert len(statuses) <= math.ceil(seconds / lora.STATUS_EVERY_S) + len(samples) + 1
    assert len(statuses) >= seconds / lora.STATUS_EVERY_S / 2             # and still a few times a second
    assert 2 <= len(plots) <= math.ceil(seconds / lora.PLOT_EVERY_S) + 1
    assert len(samples) == 2                                                # both sample rounds, as they came
    assert all(len(plot) <= 2 * lora.PLOTTED_POINTS for plot in plots)

    final = updates[-1]
    assert "Saved `models/lora/cat.safetensors` after 600 steps" in final[tab.status]
    curve: pd.DataFrame = final[tab.loss]
    raw = curve[curve["curve"] == "loss"]
    assert len(raw) <= lora.PLOTTED_POINTS and raw["step"].iloc[0] <= STEPS // lora.PLOTTED_POINTS + 1
    assert raw["step"].iloc[-1] == STEPS and raw["loss"].iloc[-1] == pytest.approx(1.0 / STEPS)
    assert raw["step"].is_monotonic_increasing


def test_a_short_training_is_plotted_point_for_point():
    points = [LossPoint(step, 1.0 / step, 1e-4, 0.0) for step in range(1, 8)]
    frame = lora._loss_frame(points)
    assert list(frame[frame["curve"] == "loss"]["step"]) == list(range(1, 8))
    smoothed = frame[frame["curve"] == "smoothed"]["loss"]
    assert smoothed.iloc[0] == 1.0 and smoothed.iloc[-1] > 1.0 / 7       # the moving average lags the raw loss
