"""Sampling schedules (pipelines/core/schedules.py): Default is the sampler's own, Align Your Steps is NVIDIA's
table at 10 steps and its log-linear interpolation elsewhere, a diffusers pipeline given the same arguments runs the
same timesteps, and the explorer draws the schedules side by side."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.schedulers import AysSchedules
from matplotlib.figure import Figure

from pipelines.core.loop import strength_timesteps
from pipelines.core.samplers import STEPWISE_SAMPLER_NAMES, make_scheduler
from pipelines.core.schedules import (ALIGN_YOUR_STEPS, DEFAULT_SCHEDULE, SCHEDULABLE_SAMPLERS, SCHEDULES,
                                      check_schedule, pipeline_schedule_arguments, schedule_error, schedule_table,
                                      set_schedule)
from pipelines.explorer.sampling_schedules import ALPHA_CUMPROD, SIGMA, sampling_schedule_plot
from pipelines.explorer.service import Explorer
from studio.tabs.explorer_schedule import TABLE_LABEL, layout_schedule, wire_schedule

EMBEDDED_SCHEDULER = Path(__file__).resolve().parents[1] / "assets/emoji-ldm/scheduler/scheduler_config.json"
SD_UNET = {"in_channels": 4, "addition_embed_type": None, "class_embed_type": None}
SDXL_UNET = {"in_channels": 4, "addition_embed_type": "text_time", "class_embed_type": None}


@pytest.fixture(scope="module")
def model_config() -> dict:
    return json.loads(EMBEDDED_SCHEDULER.read_text())


def _scheduler(sampler: str, config: dict, steps: int, schedule: str, **options):
    scheduler = make_scheduler(sampler, config)
    set_schedule(scheduler, steps, schedule, **options)
    return scheduler


@pytest.mark.parametrize("sampler", STEPWISE_SAMPLER_NAMES)
def test_default_is_exactly_the_samplers_own_set_timesteps(model_config, sampler):
    for steps in (1, 7, 25):
        own = make_scheduler(sampler, model_config)
        own.set_timesteps(steps, device="cpu")
        ours = _scheduler(sampler, model_config, steps, DEFAULT_SCHEDULE, device="cpu")
        assert torch.equal(ours.timesteps, own.timesteps) and ours.timesteps.dtype == own.timesteps.dtype
        if hasattr(own, "sigmas"):
            assert torch.equal(ours.sigmas, own.sigmas)
        assert pipeline_schedule_arguments(ours, steps, DEFAULT_SCHEDULE) == {}


def test_align_your_steps_at_10_steps_is_nvidias_table_for_sd(model_config):
    for sampler in ("DPM++ 2M", "DDPM", "Heun"):
        timesteps = _scheduler(sampler, model_config, 10, ALIGN_YOUR_STEPS, unet_config=SD_UNET).timesteps
        unique = torch.unique_consecutive(timesteps)                # Heun calls twice at each but the first
        assert unique.tolist() == AysSchedules["StableDiffusionTimesteps"], sampler
    euler = _scheduler("Euler", model_config, 10, ALIGN_YOUR_STEPS)   # takes the sigmas themselves
    assert np.allclose(euler.sigmas.numpy(), AysSchedules["StableDiffusionSigmas"], rtol=0, atol=1e-6)
    # an SDXL UNet gets SDXL's table
    sdxl = _scheduler("DPM++ 2M", model_config, 10, ALIGN_YOUR_STEPS, unet_config=SDXL_UNET)
    assert sdxl.timesteps.tolist() == AysSchedules["StableDiffusionXLTimesteps"]


@pytest.mark.parametrize("sampler", SCHEDULABLE_SAMPLERS)
def test_align_your_steps_at_25_steps_is_interpolated_and_monotone(model_config, sampler):
    scheduler = _scheduler(sampler, model_config, 25, ALIGN_YOUR_STEPS)
    timesteps = torch.unique_consecutive(scheduler.timesteps).double()
    assert len(timesteps) == 25 and timesteps[0] >= 998.5 and torch.all(timesteps.diff() < 0)
    assert timesteps[-1] < 10          # it reaches lower noise than Default's last step (40 for DPM++ 2M)
    # the interpolation passes through the published points: step 0, 10/25 * 24 ... fall on the table's sigmas
    sigma = make_scheduler("Euler", model_config)
    set_schedule(sigma, 25, ALIGN_YOUR_STEPS)
    log_sigmas = np.log(sigma.sigmas[:-1].double().numpy())
    assert np.all(np.diff(log_sigmas) < 0) and abs(sigma.sigmas[0].item() - 14.615) < 1e-4


def test_many_steps_keep_one_whole_timestep_per_step(model_config):
    """Rounding to whole timesteps merges neighbours near t = 0 from about 150 steps on; they are pushed apart."""
    timesteps = _scheduler("DDPM", model_config, 200, ALIGN_YOUR_STEPS).timesteps
    assert len(timesteps) == 200 and torch.all(timesteps.diff() < 0) and timesteps[-1] == 0


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "Heun"])
def test_a_diffusers_pipeline_given_the_arguments_runs_the_same_timesteps(tiny_model_dir, model_config, sampler):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = make_scheduler(sampler, pipeline.scheduler.config)
    ours = make_scheduler(sampler, pipeline.scheduler.config)
    set_schedule(ours, 6, ALIGN_YOUR_STEPS, unet_config=pipeline.unet.config)
    arguments = pipeline_schedule_arguments(pipeline.scheduler, 6, ALIGN_YOUR_STEPS, unet_config=pipeline.unet.config)
    assert set(arguments) == {"sigmas" if sampler == "Euler" else "timesteps"}

    ran = []

    def record(pipe, index, t, tensors):
        ran.append(float(t))
        return tensors
    image = pipeline("red apple", height=32, width=32, guidance_scale=1.0, output_type="np",
                     generator=torch.Generator().manual_seed(0), callback_on_step_end=record, **arguments).images
    assert np.isfinite(image).all()
    assert ran == ours.timesteps.double().tolist()
    assert torch.equal(pipeline.scheduler.timesteps, ours.timesteps)


def test_img2img_strength_cuts_the_align_your_steps_schedule(model_config):
    scheduler = _scheduler("DPM++ 2M", model_config, 10, ALIGN_YOUR_STEPS)
    kept = strength_timesteps(scheduler, 10, 0.5)
    assert kept.tolist() == AysSchedules["StableDiffusionTimesteps"][5:]


def test_a_sampler_that_cannot_take_a_schedule_says_which_can(model_config):
    assert {name for name in STEPWISE_SAMPLER_NAMES if schedule_error(name, ALIGN_YOUR_STEPS) is None} == \
        {"Euler", "Heun", "DDPM", "DPM++ 2M"} == set(SCHEDULABLE_SAMPLERS)
    message = schedule_error("DDIM", ALIGN_YOUR_STEPS)
    assert message.startswith("DDIM takes only the Default schedule") and "Euler, Heun, DDPM, DPM++ 2M" in message
    assert "Karras" in schedule_error("DPM++ 2M Karras", ALIGN_YOUR_STEPS)
    assert all(schedule_error(name, DEFAULT_SCHEDULE) is None for name in STEPWISE_SAMPLER_NAMES)
    with pytest.raises(ValueError, match="DDIMScheduler takes only the Default schedule"):
        set_schedule(make_scheduler("DDIM", model_config), 10, ALIGN_YOUR_STEPS)
    with pytest.raises(ValueError, match="Unknown sampler"):
        schedule_error("Euler b", ALIGN_YOUR_STEPS)


def test_an_unknown_schedule_or_family_is_refused(model_config):
    with pytest.raises(ValueError, match="Unknown schedule 'Karras'. Valid schedules: Default, Align Your Steps"):
        check_schedule("Karras")
    with pytest.raises(ValueError, match="Unknown schedule"):
        set_schedule(make_scheduler("Euler", model_config), 10, "Karras")
    with pytest.raises(ValueError, match="Unknown schedule"):
        schedule_error("Euler", "karras")
    upscaler = {"in_channels": 7, "addition_embed_type": None, "class_embed_type": None, "num_class_embeds": 1000}
    with pytest.raises(ValueError, match=r"tables for SD 1.x/2.x and SDXL only.*in_channels=7.*Its schedules: Default"):
        set_schedule(make_scheduler("Euler", model_config), 10, ALIGN_YOUR_STEPS, unet_config=upscaler)


def test_the_schedule_table_matches_the_models_alphas_cumprod(model_config):
    table = schedule_table(model_config, "DPM++ 2M", list(SCHEDULES), 12)
    alphas_cumprod = make_scheduler("DPM++ 2M", model_config).alphas_cumprod.double().numpy()
    for schedule, numbers in table.items():
        timesteps = np.asarray(numbers["timesteps"], dtype=int)
        assert len(timesteps) == 12, schedule
        assert np.allclose(numbers["alphas_cumprod"], alphas_cumprod[timesteps], rtol=1e-5, atol=1e-7), schedule
        abar = np.asarray(numbers["alphas_cumprod"])
        assert np.allclose(numbers["sigmas"], np.sqrt((1 - abar) / abar), rtol=1e-6)
    # DDIM keeps no sigmas: its table reads the model's abar_t at its timesteps
    ddim = schedule_table(model_config, "DDIM", [DEFAULT_SCHEDULE], 5)[DEFAULT_SCHEDULE]
    assert ddim["alphas_cumprod"] == alphas_cumprod[np.asarray(ddim["timesteps"], dtype=int)].tolist()
    with pytest.raises(ValueError, match="LMS takes only the Default schedule"):
        schedule_table(model_config, "LMS", list(SCHEDULES), 12)


def _explorer(model_config, unet_config=SD_UNET):
    model = SimpleNamespace(scheduler_config=model_config, pipeline=SimpleNamespace(unet=SimpleNamespace(
        config=unet_config)))
    return Explorer(SimpleNamespace(current=model))


def test_the_explorer_draws_two_schedules_and_says_what_it_left_out(model_config):
    figure = sampling_schedule_plot(schedule_table(model_config, "Euler", list(SCHEDULES), 10), quantity=SIGMA,
                                    sampler="Euler", steps=10)
    assert isinstance(figure, Figure)
    axes = figure.axes[0]
    assert axes.get_yscale() == "log" and len(axes.get_lines()) == 2
    assert [text.get_text() for text in axes.get_legend().get_texts()] == \
        ["Default (10 calls)", "Align Your Steps (10 calls)"]

    explorer = _explorer(model_config)
    view = explorer.sampling_schedules(sampler="DPM++ 2M", steps=10, schedules=list(SCHEDULES), quantity=ALPHA_CUMPROD)
    assert set(view.table) == set(SCHEDULES) and len(view.figure.axes[0].get_lines()) == 2
    assert "DDPM's ᾱ_t" in view.caption and "SD 1.x/2.x table as published" in view.caption
    # DDIM runs only Default: drawn alone, the caption says why Align Your Steps is not there
    view = explorer.sampling_schedules(sampler="DDIM", steps=10, schedules=list(SCHEDULES), quantity=SIGMA)
    assert list(view.table) == [DEFAULT_SCHEDULE] and "**Align Your Steps** left out: DDIM takes only" in view.caption
    assert "variance-exploding" in view.caption
    with pytest.raises(ValueError, match="DDIM takes only the Default schedule"):
        explorer.sampling_schedules(sampler="DDIM", steps=10, schedules=[ALIGN_YOUR_STEPS], quantity=SIGMA)
    with pytest.raises(ValueError, match="`steps` has to be between 1 and 200 but is 0"):
        explorer.sampling_schedules(sampler="DDIM", steps=0, schedules=list(SCHEDULES), quantity=SIGMA)
    with pytest.raises(ValueError, match="load one"):
        Explorer(SimpleNamespace(current=None)).sampling_schedules(
            sampler="Euler", steps=10, schedules=list(SCHEDULES), quantity=SIGMA)


def test_the_schedule_plot_endpoint_has_readable_parameters(model_config):
    with gr.Blocks() as blocks:
        with gr.Tab("Sampling schedules") as shown:
            panel = layout_schedule()
        wire_schedule(_explorer(model_config), panel, shown=shown)
    endpoint = blocks.get_api_info()["named_endpoints"]["/schedule_plot"]
    assert [parameter["parameter_name"] for parameter in endpoint["parameters"]] == \
        ["sampler", "steps", "schedules", "quantity"]
    assert all(parameter["parameter_has_default"] for parameter in endpoint["parameters"])
    assert TABLE_LABEL in [output["label"] for output in endpoint["returns"]]
    (handler,) = [fn.fn for fn in blocks.fns.values() if fn.api_name == "schedule_plot"]
    figure, caption, table = handler("Heun", 10, [ALIGN_YOUR_STEPS], SIGMA)
    assert isinstance(figure, Figure) and list(table) == [ALIGN_YOUR_STEPS] and "**Heun**, 10 steps" in caption
    with pytest.raises(gr.Error, match="Unknown sampler"):
        handler("Euler b", 10, list(SCHEDULES), SIGMA)
