"""What a running LoRA training sends to the page (issue 25, item 2): the page trained slower than the API because
the browser, sharing the cores, re-rendered the status on every step and the loss plot every second. The follower
now sends the status at most every STATUS_EVERY_S, the plot at most every PLOT_EVERY_S with at most PLOTTED_POINTS
points a curve, new samples at once, and everything at the end. bench/lora_page.py measures the speed itself."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd
import pytest
from PIL import Image

from pipelines.training.request import LossPoint, Samples, TrainingResult
from studio.tabs import lora, training_results

STEPS = 600
STEP_S = 0.05            # the fake clock's advance per event the follower reads


@pytest.fixture
def tab(tmp_path):
    with gr.Blocks():
        return lora._layout(tmp_path)


def _training(job) -> TrainingResult:
    """The events of a 600-step training with samples at steps 0 and 300, as pipelines/training/loop.py emits them."""
    picture = Image.new("RGB", (8, 8), "red")
    job.emit(Samples(0, ["a cat"], [picture]))
    for step in range(1, STEPS + 1):
        job.emit(LossPoint(step, 1.0 / step, 1e-4, step * STEP_S))
        job.report(step, STEPS, f"loss {1.0 / step:.4f}")
        if step == STEPS // 2:
            job.emit(Samples(step, ["a cat"], [picture]))
    return _training_result(STEPS)


def _training_result(steps: int) -> TrainingResult:
    picture = Image.new("RGB", (8, 8), "red")
    return TrainingResult(path=Path("models/lora/cat.safetensors"), steps=steps, final_loss=1.0 / steps,
                          effect=12.0, moved=True, feature_distance_before=None, feature_distance_after=None,
                          before=[picture], after=[picture], stopped=False, warnings=[], base_model="tiny")


def test_a_running_training_sends_the_page_a_few_updates_a_second_and_all_of_it_at_the_end(tab, worker,
                                                                                           monkeypatch):
    job = worker.submit(_training, kind="train-lora")
    job.result(timeout=60)               # the follower then reads the whole run, as a page following it late does
    ticks = itertools.count()
    monkeypatch.setattr(training_results, "time", SimpleNamespace(monotonic=lambda: next(ticks) * STEP_S))  # a tick an event
    updates = list(training_results.follow_training(tab, job))
    seconds = next(ticks) * STEP_S        # the run as the follower's clock saw it
    assert seconds >= STEPS * STEP_S

    statuses = [update[tab.status] for update in updates[:-1] if tab.status in update]
    plots = [update[tab.loss] for update in updates[:-1] if tab.loss in update]
    samples = [update[tab.samples] for update in updates[:-1] if tab.samples in update]
    assert len(statuses) <= math.ceil(seconds / training_results.STATUS_EVERY_S) + len(samples) + 1
    assert len(statuses) >= seconds / training_results.STATUS_EVERY_S / 2             # and still a few times a second
    assert 2 <= len(plots) <= math.ceil(seconds / training_results.PLOT_EVERY_S) + 1
    assert len(samples) == 2                                                # both sample rounds, as they came
    assert all(len(plot) <= 2 * training_results.PLOTTED_POINTS for plot in plots)

    for plot in plots:                                                      # evenly thinned, first and last kept
        raw = plot[plot["curve"] == "loss"]
        assert raw["step"].iloc[0] == 1 and raw["step"].is_monotonic_increasing
    before_the_end = updates[-2]      # once the past is read, all of it: the last step's status and plot
    assert "Step 600 of 600" in before_the_end[tab.status] and before_the_end[tab.loss]["step"].max() == STEPS

    final = updates[-1]
    assert "Saved `models/lora/cat.safetensors` after 600 steps" in final[tab.status]
    assert [caption for _, caption in final[tab.samples]] == ["weight 0: a cat", "weight 1: a cat"]
    curve: pd.DataFrame = final[tab.loss]
    raw = curve[curve["curve"] == "loss"]
    assert list(raw["step"]) == list(range(1, STEPS + 1))                  # the whole curve, for the API too
    assert raw["loss"].iloc[-1] == pytest.approx(1.0 / STEPS)


def test_a_training_followed_live_shows_its_last_step_before_it_finishes(tab, worker):
    """The finish (saving, the weight 0/1 samples, the judge) sends no events: the last step's plot and status must
    not wait for the result."""
    import threading

    finishing = threading.Event()

    def training(job):
        for step in range(1, 41):
            job.emit(LossPoint(step, 1.0 / step, 1e-4, 0.0))
            job.report(step, 40)
        finishing.wait(timeout=30)
        return _training_result(40)

    job = worker.submit(training, kind="train-lora")
    follower = training_results.follow_training(tab, job)
    update = {}
    while tab.loss not in update or update[tab.loss]["step"].max() < 40:      # (a failure waits the 30 s out)
        update = next(follower)
    assert not job.finished and "Step 40 of 40" in update[tab.status]     # shown while the finish was still due
    finishing.set()
    assert "Saved" in list(follower)[-1][tab.status]


def test_a_short_training_is_plotted_point_for_point():
    points = [LossPoint(step, 1.0 / step, 1e-4, 0.0) for step in range(1, 8)]
    frame = training_results._loss_frame(points)
    assert list(frame[frame["curve"] == "loss"]["step"]) == list(range(1, 8))
    smoothed = frame[frame["curve"] == "smoothed"]["loss"]
    assert smoothed.iloc[0] == 1.0 and smoothed.iloc[-1] > 1.0 / 7       # the moving average lags the raw loss
