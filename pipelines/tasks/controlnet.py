"""ControlNet: steer the layout with control images (edges, a scribble, a colour layout), up to three at once.

A ControlNet is a trainable copy of the UNet's encoder that reads the control image and adds residuals to
the frozen UNet's skip connections and middle block, through zero-initialised convolutions (Zhang et al.
2023). Each *unit* is one ControlNet with its control image and settings, as in sd-webui-controlnet:

    weight          the residuals' scale
    start, end      the share of the steps during which the unit acts (diffusers' rule: step i of n acts when
                    start <= i/n and (i+1)/n <= end)
    control mode    balanced: residuals on both CFG branches;
                    my prompt is more important: residuals scaled down towards the shallow blocks,
                        weight · 0.825^(K-1-k) for block k of K (sd-webui-controlnet's soft injection);
                    ControlNet is more important: that scaling, and residuals on the prompt's branch only, so
                        CFG amplifies the control (diffusers' guess mode)
    resize mode     how the control image takes the generation's shape (just resize / crop and resize /
                    resize and fill)
    pixel perfect   run the preprocessor at the generation's size (else at `processor_resolution`)

Several units add their residuals (diffusers' MultiControlNetModel does the same). The loop is the task's own
(`run_controlnet`), built on the shared Denoiser step, so a request whose units never act gives the
Text-to-Image image bit for bit, and the residuals can be recorded for the Control X-ray
(pipelines/tasks/control_xray.py). The units themselves are pipelines/tasks/control_units.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.core.checks import NUMBER_RANGES, check_input_image, check_number
from pipelines.core.denoiser import Denoiser
from pipelines.core.guidance import ModelRows
from pipelines.core.images import decode_image, fit_image, image_to_tensor
from pipelines.core.loop import noised_start, run_steps, strength_timesteps
from pipelines.core.registry import Task, register
from pipelines.core.requests import SamplingSettings
from pipelines.core.schedules import set_schedule
from pipelines.core.vae import encode, execution_device
from pipelines.tasks.control_units import (A1111_CONTROL, A1111_MODULES, A1111_RESIZE, CONTROL_FIRST, MAX_UNITS,
                                           UNIT_FIELDS, ControlUnit, UnitSettings, _enabled, unit_from_json)
from pipelines.tasks.preprocessors import PREPROCESSORS


@dataclass(kw_only=True)
class ControlNetRequest(SamplingSettings, UnitSettings):
    """Text-to-Image (or, with `init_image`, Image-to-Image) steered by one to three ControlNet units: the first
    unit's settings are fields of their own (`UnitSettings`), the others a list (`more_units`)."""

    task = "controlnet"
    control_image: Image.Image = field(repr=False)
    more_units: list = field(default_factory=list)
    init_image: Image.Image | None = field(default=None, repr=False)
    strength: float = 0.75
    units: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.control_image is None:
            raise ValueError("ControlNet needs a control image (`control_image`): upload one, or draw on the sketch "
                             "pad.")
        if isinstance(self.more_units, str):
            try:
                self.more_units = json.loads(self.more_units) if self.more_units.strip() else []
            except json.JSONDecodeError as error:
                raise ValueError(f"`more_units` must be a JSON list of units but is not JSON: {error}.") from None
        if not isinstance(self.more_units, list) or len(self.more_units) > MAX_UNITS - 1:
            raise ValueError(f"`more_units` must be a list of at most {MAX_UNITS - 1} units.")
        first = ControlUnit(image=self.control_image, **{name: getattr(self, name) for name in UNIT_FIELDS})
        self.control_image = first.image
        more = [unit if isinstance(unit, ControlUnit) else unit_from_json(unit, i)
                for i, unit in enumerate(self.more_units) if _enabled(unit)]
        self.units = (first, *more)
        if self.init_image is not None:
            self.init_image = decode_image(self.init_image, "init_image")
            check_input_image("init_image", self.init_image)
        check_number("strength", self.strength, *NUMBER_RANGES["strength"])
        if self.strength == 0.0:
            raise ValueError("`strength` must be above 0 (0 would keep the init image and ignore the control) but "
                             "is 0.")

    def controlnet_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(unit.model for unit in self.units))

    def slots(self) -> tuple[str, ...]:
        return ("base", *(f"controlnet:{name}" for name in self.controlnet_names()))

    def check_steps(self) -> None:
        if self.init_image is not None and int(self.steps * self.strength) < 1:
            raise ValueError(f"`strength` {self.strength} × {self.steps} steps leaves no denoising step; raise the "
                             "steps or the strength.")

    def notes(self) -> list[str]:
        notes = []
        for number, unit in enumerate(self.units):
            if unit.weight == 0 or unit.end == 0 or unit.start >= unit.end:
                notes.append(f"ControlNet unit {number}: weight {unit.weight:g}, steps {unit.start:g}–{unit.end:g}: "
                             "it never acts, so it changes nothing.")
        return notes

    def to_json(self) -> dict:
        values = super().to_json()
        values["more_units"] = [unit.to_json() for unit in self.units[1:]]
        return values


@dataclass
class ActiveUnit:
    unit: ControlUnit
    controlnet: Any
    condition: torch.Tensor      # the control image, [0, 1], one row per image


def _condition(unit: ControlUnit, controlnet, request: ControlNetRequest, rows: int, device) -> torch.Tensor:
    image = unit.control_image(request.width, request.height, seed=request.seed)
    # in [0, 1], divided as diffusers' control image processor divides (x / 255), so the same floats reach the model
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255.0
    return pixels.repeat(rows, 1, 1, 1).to(device, controlnet.dtype)


def control_residuals(active: list[ActiveUnit], index: int, total: int, scaled: torch.Tensor, t, embeddings, *,
                      rows: ModelRows, added: dict | None = None) -> tuple[list[torch.Tensor] | None,
                                                                       torch.Tensor | None]:
    """The units' residuals at step `index` for the UNet call's `rows` (pipelines/core/guidance.py), summed
    (None when no unit acts). `added`: SDXL's added conditioning for those rows (`Denoiser.added_conditions`)."""
    down_sum, mid_sum = None, None
    for item in active:
        unit = item.unit
        if not unit.acts_at(index, total):
            continue
        prompt_only = rows.uncond and unit.control_mode == CONTROL_FIRST
        skip = scaled.shape[0] // rows.chunks if prompt_only else 0    # the negative prompt's rows come first
        model_input, text = scaled[skip:], embeddings[skip:]
        condition = item.condition.repeat(len(model_input) // len(item.condition), 1, 1, 1)
        dtype = condition.dtype     # the ControlNet's (`_condition`); asking the model walks its parameters
        extra = {} if added is None else \
            {"added_cond_kwargs": {key: value[skip:].to(dtype) for key, value in added.items()}}
        with torch.no_grad():
            down, mid = item.controlnet(model_input.to(dtype), t, encoder_hidden_states=text.to(dtype),
                                        controlnet_cond=condition, conditioning_scale=1.0, return_dict=False, **extra)
        scales = unit.block_scales(len(down) + 1)
        if any(scale != 1.0 for scale in scales):
            down = [residual * scale for residual, scale in zip(down, scales)]
            mid = mid * scales[-1]
        if prompt_only:   # nothing on the negative prompt's branch
            down = [torch.cat([torch.zeros_like(residual[:skip]), residual]) for residual in down]
            mid = torch.cat([torch.zeros_like(mid[:skip]), mid])
        down_sum = down if down_sum is None else [a + b for a, b in zip(down_sum, down)]
        mid_sum = mid if mid_sum is None else mid_sum + mid
    return down_sum, mid_sum


def run_controlnet(call, batch_index: int, *, generators=None, latents=None, callback=None, expose=()) -> torch.Tensor:
    """The ControlNet task's loop for one batch (its registry entry's `run`); latents out.

    The callback also sees `control_residuals` (the summed down-block residuals, then the middle one; None
    when no unit acts) when `expose` names it: the Control X-ray records them."""
    request, pipeline = call.request, call.pipeline
    unet, scheduler = pipeline.unet, pipeline.scheduler
    device, dtype, batch = call.device, unet.dtype, request.batch_size
    generators = generators or call.generators(batch_index)
    call.seed_brownian_noise(batch_index)
    denoiser = Denoiser(call, generators=generators)

    # 1. The units' control images and models
    active = [ActiveUnit(unit, controlnet, _condition(unit, controlnet, request, batch, execution_device(
        controlnet))) for unit, controlnet in ((unit, call.controlnets[unit.model]) for unit in request.units)]
    # 2. Timesteps, and the start: noise (Text-to-Image), or the init image noised to the strength
    set_schedule(scheduler, request.steps, request.schedule, unet_config=unet.config, device=device)
    timesteps = scheduler.timesteps
    if request.init_image is not None:
        timesteps = strength_timesteps(scheduler, request.steps, request.strength)
        if latents is None:
            image = image_to_tensor(fit_image(request.init_image, request.width, request.height))
            image_latents = encode(pipeline.vae, image).to(device, dtype).repeat(batch, 1, 1, 1)
            latents, _ = noised_start(scheduler, image_latents, timesteps, generators)
    elif latents is None:
        latents = pipeline.prepare_latents(batch, unet.config.in_channels, request.height, request.width, dtype,
                                           device, generators)
    else:
        latents = latents * scheduler.init_noise_sigma

    # 3. The loop: the units' residuals join the UNet's skip connections
    def step(index, t, latents):
        rows = denoiser.rows(index, len(timesteps))
        scaled, embeddings = denoiser.model_input(latents, t, rows)
        down, mid = control_residuals(active, index, len(timesteps), scaled, t, embeddings, rows=rows,
                                      added=denoiser.added_conditions(rows))
        latents = denoiser.step(latents, t, index=index, count=len(timesteps), down_block_additional_residuals=down,
                                mid_block_additional_residual=mid).latents
        shown = {"control_residuals": None if down is None else [*down, mid]} if "control_residuals" in expose else {}
        return latents, shown

    return run_steps(call, timesteps, latents, step, callback=callback)


def _infotext_values(request: ControlNetRequest, hashes: dict[str, str | None] | None = None) -> dict:
    values = {}
    for number, unit in enumerate(request.units):
        model = unit.model + (f" [{hashes[unit.model]}]" if hashes and hashes.get(unit.model) else "")
        values[f"ControlNet {number}"] = ", ".join([
            f"Module: {A1111_MODULES.get(unit.preprocessor, unit.preprocessor)}", f"Model: {model}",
            f"Weight: {unit.weight:g}", f"Resize Mode: {A1111_RESIZE[unit.resize_mode]}",
            f"Processor Res: {unit.processor_resolution}", f"Guidance Start: {unit.start:g}",
            f"Guidance End: {unit.end:g}", f"Pixel Perfect: {unit.pixel_perfect}",
            f"Control Mode: {A1111_CONTROL[unit.control_mode]}"])
    if request.init_image is not None:
        values["Denoising strength"] = request.strength
    return values


def read_units(params: dict[str, str]) -> list[dict]:
    """The units' settings from an infotext's `ControlNet N: "Module: …, Model: …"` entries (ours or
    sd-webui-controlnet's), as ControlUnit fields; what we don't know is left out."""
    modules = {a1111: ours for ours, a1111 in A1111_MODULES.items()}
    resize = {a1111.lower(): ours for ours, a1111 in A1111_RESIZE.items()}
    control = {a1111.lower(): ours for ours, a1111 in A1111_CONTROL.items()}
    units = []
    for number in range(MAX_UNITS):
        text = params.get(f"ControlNet {number}")
        if text is None:
            continue
        entries = dict(part.split(":", 1) for part in text.split(", ") if ":" in part)
        entries = {key.strip(): value.strip() for key, value in entries.items()}
        unit: dict = {}
        if entries.get("Module") in modules or entries.get("Module") in PREPROCESSORS:
            unit["preprocessor"] = modules.get(entries["Module"], entries["Module"])
        if "Model" in entries:
            unit["model"] = entries["Model"].split(" [")[0]
        for key, name in (("Weight", "weight"), ("Guidance Start", "start"), ("Guidance End", "end")):
            try:
                unit[name] = float(entries[key])
            except (KeyError, ValueError):
                pass
        if entries.get("Resize Mode", "").lower() in resize:
            unit["resize_mode"] = resize[entries["Resize Mode"].lower()]
        if entries.get("Control Mode", "").lower() in control:
            unit["control_mode"] = control[entries["Control Mode"].lower()]
        if entries.get("Pixel Perfect") in ("True", "False"):
            unit["pixel_perfect"] = entries["Pixel Perfect"] == "True"
        if entries.get("Processor Res", "").isdigit():
            unit["processor_resolution"] = int(entries["Processor Res"])
        units.append(unit)
    return units


def _controlnet_pipeline(base):
    """Our loop uses the base's own components (shared weights)."""
    return base

# "Denoising strength" is written only with an init image (by _infotext_values), and read back as img2img's
register(Task("controlnet", "ControlNet", ControlNetRequest, _controlnet_pipeline, run=run_controlnet,
              extra_infotext=_infotext_values))
