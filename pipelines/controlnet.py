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
Text-to-Image image bit for bit, and the residuals can be recorded for the Control X-ray.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from pipelines import denoise
from pipelines.preprocessors import PREPROCESSORS, preprocess
from pipelines.tasks import SamplingSettings, Task, check_input_image, fit_image, register

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONTROLNETS = {path.name: path for path in sorted((ROOT / "assets").glob("emoji-controlnet-*"))
                       if (path / "config.json").exists()}
DEFAULT_CONTROLNET = "emoji-controlnet-canny"
BALANCED, PROMPT_FIRST, CONTROL_FIRST = "balanced", "my prompt is more important", "controlnet is more important"
CONTROL_MODES = (BALANCED, PROMPT_FIRST, CONTROL_FIRST)
JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = "just resize", "crop and resize", "resize and fill"
RESIZE_MODES = (JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL)
MAX_UNITS = 3
SOFT_INJECTION = 0.825
MAX_WEIGHT = 2.0
MAX_CONTROL_PIXELS = 4096 * 4096
# sd-webui-controlnet's names for our preprocessors, and for its resize and control modes
A1111_MODULES = {"none": "none", "invert": "invert", "canny": "canny", "colour grid": "color",
                 "lineart standard": "lineart_standard", "content shuffle": "shuffle", "hed": "softedge_hed",
                 "pidinet": "softedge_pidinet", "midas depth": "depth_midas", "openpose": "openpose",
                 "lineart": "lineart_realistic", "mlsd": "mlsd", "normal bae": "normal_bae"}
A1111_RESIZE = {JUST_RESIZE: "Just Resize", CROP_AND_RESIZE: "Crop and Resize", RESIZE_AND_FILL: "Resize and Fill"}
A1111_CONTROL = {BALANCED: "Balanced", PROMPT_FIRST: "My prompt is more important",
                 CONTROL_FIRST: "ControlNet is more important"}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(choices)} but is {value!r}.")


def decode_image(value, name: str = "image") -> Image.Image:
    """An image given as a PIL image or as base64 text (optionally a data URL, as A1111's API sends). Never a
    path: a request does not get to read files on the server."""
    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{name}` must be an image (a file, or base64 text) but is {type(value).__name__}.")
    try:
        data = value.split(",", 1)[1] if value.startswith("data:") else value
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
        return image
    except Exception as error:
        raise ValueError(f"`{name}` could not be read as an image ({type(error).__name__}): send a PNG or JPEG "
                         "as base64 text.") from None


@dataclass(kw_only=True)
class ControlUnit:
    """One ControlNet and its control image, with sd-webui-controlnet's settings."""
    image: Image.Image = field(repr=False)
    preprocessor: str = "canny"
    model: str = DEFAULT_CONTROLNET
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control_mode: str = BALANCED
    resize_mode: str = CROP_AND_RESIZE
    pixel_perfect: bool = True
    processor_resolution: int = 512
    _control: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.image = decode_image(self.image, "control image")
        width, height = self.image.size
        if width < 8 or height < 8 or width * height > MAX_CONTROL_PIXELS:
            raise ValueError(f"The control image is {width}×{height}; it must be at least 8×8 and at most "
                             f"{MAX_CONTROL_PIXELS:,} pixels.")
        _check_choice("preprocessor", self.preprocessor, tuple(PREPROCESSORS))
        _check_choice("control_mode", self.control_mode, CONTROL_MODES)
        _check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("`model` must name a ControlNet (see the ControlNet tab's model list).")
        if not (isinstance(self.weight, (int, float)) and 0.0 <= self.weight <= MAX_WEIGHT):
            raise ValueError(f"`weight` must be between 0 and {MAX_WEIGHT:g} but is {self.weight!r}.")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"`{name}` (a fraction of the steps) must be between 0 and 1 but is {value!r}.")
        if self.start > self.end:
            raise ValueError(f"`start` ({self.start}) must not be after `end` ({self.end}).")
        if not (isinstance(self.processor_resolution, int) and 64 <= self.processor_resolution <= 2048):
            raise ValueError(f"`processor_resolution` must be a whole number from 64 to 2048 but is "
                             f"{self.processor_resolution!r}.")

    def acts_at(self, index: int, total: int) -> bool:
        """Whether the unit adds its residuals at step `index` of `total` (diffusers' control_guidance rule)."""
        return self.weight > 0 and not (index / total < self.start or (index + 1) / total > self.end)

    def block_scales(self, blocks: int) -> list[float]:
        """The weight per residual (down blocks, then the middle): soft injection outside balanced mode."""
        if self.control_mode == BALANCED:
            return [float(self.weight)] * blocks
        return [float(self.weight) * SOFT_INJECTION ** (blocks - 1 - k) for k in range(blocks)]

    def control_image(self, width: int, height: int, *, seed: int = 0) -> Image.Image:
        """The preprocessed control image at width×height (cached per size)."""
        key = (width, height, seed)
        if key not in self._control:
            if self.pixel_perfect:
                image = preprocess(self.preprocessor, resize_for(self.image, width, height, self.resize_mode),
                                   seed=seed)
            else:
                scale = self.processor_resolution / min(self.image.size)
                detect = self.image.convert("RGB").resize((max(8, round(self.image.width * scale)),
                                                           max(8, round(self.image.height * scale))))
                image = resize_for(preprocess(self.preprocessor, detect, seed=seed), width, height, self.resize_mode)
            self._control[key] = image.convert("RGB")
        return self._control[key]

    def to_json(self) -> dict:
        return {"image_size": list(self.image.size), "preprocessor": self.preprocessor, "model": self.model,
                "weight": self.weight, "start": self.start, "end": self.end, "control_mode": self.control_mode,
                "resize_mode": self.resize_mode, "pixel_perfect": self.pixel_perfect,
                "processor_resolution": self.processor_resolution}


def resize_for(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """`image` at width×height by A1111's resize modes: stretched, cropped to the shape then resized, or resized
    to fit inside and padded with black (nothing, for edge and scribble maps)."""
    image = image.convert("RGB")
    if mode == JUST_RESIZE:
        return image.resize((width, height), Image.Resampling.LANCZOS)
    if mode == CROP_AND_RESIZE:
        return fit_image(image, width, height)
    fitted = ImageOps.contain(image, (width, height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    return canvas


UNIT_FIELDS = ("preprocessor", "model", "weight", "start", "end", "control_mode", "resize_mode", "pixel_perfect",
               "processor_resolution")


def unit_from_json(values: dict, position: int) -> ControlUnit:
    """A further unit from the API's JSON list: the same names as the first unit's, the image as `image`
    (base64, a data URL or a path the server can read)."""
    if not isinstance(values, dict):
        raise ValueError(f"`more_units[{position}]` must be an object like {{\"image\": …, \"model\": …}} but is "
                         f"{type(values).__name__}.")
    unknown = set(values) - {"image", "enabled", *UNIT_FIELDS}
    if unknown:
        raise ValueError(f"`more_units[{position}]` has unknown keys {sorted(unknown)}; allowed: image, "
                         f"{', '.join(UNIT_FIELDS)}.")
    if "image" not in values:
        raise ValueError(f"`more_units[{position}]` needs its control `image`.")
    return ControlUnit(**{key: value for key, value in values.items() if key != "enabled"})


def _enabled(values) -> bool:
    return not (isinstance(values, dict) and values.get("enabled") is False)


@dataclass(kw_only=True)
class ControlNetRequest(SamplingSettings):
    """Text-to-Image (or, with `init_image`, Image-to-Image) steered by one to three ControlNet units: the first
    unit's settings are fields of their own, the others a list (`more_units`)."""

    task = "controlnet"
    control_image: Image.Image = field(repr=False)
    preprocessor: str = "canny"
    model: str = DEFAULT_CONTROLNET
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control_mode: str = BALANCED
    resize_mode: str = CROP_AND_RESIZE
    pixel_perfect: bool = True
    processor_resolution: int = 512
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
            import json
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
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"`strength` must be above 0 and at most 1 but is {self.strength}.")

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


# ----------------------------------------------------------------------------- the loop


@dataclass
class ActiveUnit:
    unit: ControlUnit
    controlnet: Any
    condition: torch.Tensor      # the control image, [0, 1], one row per CFG branch and image


def _condition(unit: ControlUnit, controlnet, request: ControlNetRequest, rows: int, device) -> torch.Tensor:
    image = unit.control_image(request.width, request.height, seed=request.seed)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255.0
    return pixels.repeat(rows, 1, 1, 1).to(device, controlnet.dtype)


def control_residuals(active: list[ActiveUnit], index: int, total: int, scaled: torch.Tensor, t, embeddings, *,
                      cfg: bool) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """The units' residuals at step `index`, summed (None when no unit acts)."""
    down_sum, mid_sum = None, None
    for item in active:
        unit = item.unit
        if not unit.acts_at(index, total):
            continue
        prompt_only = cfg and unit.control_mode == CONTROL_FIRST
        half = scaled.shape[0] // 2
        model_input = scaled[half:] if prompt_only else scaled
        text = embeddings[half:] if prompt_only else embeddings
        condition = item.condition[half:] if prompt_only else item.condition
        dtype = condition.dtype     # the ControlNet's (`_condition`); asking the model walks its parameters
        with torch.no_grad():
            down, mid = item.controlnet(model_input.to(dtype), t, encoder_hidden_states=text.to(dtype),
                                        controlnet_cond=condition, conditioning_scale=1.0, return_dict=False)
        scales = unit.block_scales(len(down) + 1)
        if any(scale != 1.0 for scale in scales):
            down = [residual * scale for residual, scale in zip(down, scales)]
            mid = mid * scales[-1]
        if prompt_only:   # nothing on the negative prompt's branch
            down = [torch.cat([torch.zeros_like(residual), residual]) for residual in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        down_sum = down if down_sum is None else [a + b for a, b in zip(down_sum, down)]
        mid_sum = mid if mid_sum is None else mid_sum + mid
    return down_sum, mid_sum


def run_controlnet(call, batch_index: int, *, generators=None, latents=None, callback=None, expose=()) -> torch.Tensor:
    """The ControlNet task's loop for one batch (the `Task.run` of pipelines/tasks.py); latents out.

    The callback also sees `control_residuals` (the summed down-block residuals, then the middle one; None
    when no unit acts) when `expose` names it: the Control X-ray records them."""
    request, pipeline = call.request, call.pipeline
    unet, scheduler = pipeline.unet, pipeline.scheduler
    device, dtype, batch = call.device, unet.dtype, request.batch_size
    generators = generators or call.generators(batch_index)
    if hasattr(scheduler, "noise_sampler_seed"):
        scheduler.noise_sampler_seed = [request.seed_for(batch_index, i) for i in range(batch)]
    denoiser = denoise.Denoiser(call, generators=generators)
    rows = 2 * batch if denoiser.cfg else batch

    # 1. The units' control images and models
    active = [ActiveUnit(unit, controlnet, _condition(unit, controlnet, request, rows, denoise.execution_device(
        controlnet))) for unit, controlnet in ((unit, call.controlnets[unit.model]) for unit in request.units)]
    # 2. Timesteps, and the start: noise (Text-to-Image), or the init image noised to the strength
    scheduler.set_timesteps(request.steps, device=device)
    timesteps = scheduler.timesteps
    if request.init_image is not None:
        timesteps = _strength_timesteps(scheduler, request.steps, request.strength)
        if latents is None:
            image = fit_image(request.init_image, request.width, request.height)
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1
            image_latents = denoise.encode(pipeline.vae, pixels).to(dtype).repeat(batch, 1, 1, 1)
            from diffusers.utils.torch_utils import randn_tensor
            noise = randn_tensor(image_latents.shape, generator=generators, device=device, dtype=dtype)
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1])
    elif latents is None:
        latents = pipeline.prepare_latents(batch, unet.config.in_channels, request.height, request.width, dtype,
                                           device, generators)
    else:
        latents = latents * scheduler.init_noise_sigma
    # 3. The loop: the units' residuals join the UNet's skip connections
    pipeline._num_timesteps, pipeline._interrupt = len(timesteps), False
    for index, t in enumerate(timesteps):
        scaled = scheduler.scale_model_input(torch.cat([latents] * 2) if denoiser.cfg else latents, t)
        down, mid = control_residuals(active, index, len(timesteps), scaled, t, denoiser.embeddings,
                                      cfg=denoiser.cfg)
        latents = denoiser.step(latents, t, down_block_additional_residuals=down,
                                mid_block_additional_residual=mid).latents
        if callback is not None:
            tensors = {"latents": latents}
            if "control_residuals" in expose:
                tensors["control_residuals"] = None if down is None else [*down, mid]
            latents = callback(pipeline, index, t, tensors).get("latents", latents)
        if pipeline._interrupt:
            break
    return latents


def _strength_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    from pipelines.inpaint import _strength_timesteps as strength_timesteps
    return strength_timesteps(scheduler, steps, strength)


# ----------------------------------------------------------------------------- infotext (sd-webui-controlnet's form)


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


# ----------------------------------------------------------------------------- Control X-ray


@dataclass
class ControlXRay:
    """Where and how strongly the units' residuals pushed, per step."""
    image: Image.Image                  # the generated image
    maps: list[np.ndarray]              # per step: H×W, the residuals' mean magnitude summed over blocks, upsampled
    blocks: np.ndarray                  # steps × blocks: mean |residual| per block (down blocks, then the middle)
    block_names: list[str]
    timesteps: list[int]

    def overlay(self, step: int, scale: float | None = None) -> Image.Image:
        """Step `step`'s map as a heat overlay on the image (one scale across steps, so fading shows)."""
        peak = scale if scale is not None else max(float(m.max()) for m in self.maps) or 1.0
        heat = np.clip(self.maps[step] / peak, 0, 1)
        red = (heat * 255).astype(np.uint8)
        colour = np.stack([red, (heat ** 2 * 180).astype(np.uint8), np.zeros_like(red)], axis=2)
        base = np.asarray(self.image.convert("RGB")).astype(np.float32) * 0.45
        return Image.fromarray(np.clip(base + colour * 0.8, 0, 255).astype(np.uint8))


def residual_maps(residuals: list[torch.Tensor] | None, size: tuple[int, int], blocks: int, *,
                  prompt_branch: bool) -> tuple[np.ndarray, np.ndarray]:
    """(H×W map, per-block magnitudes) of one step's summed residuals for the first image."""
    height, width = size
    if residuals is None:
        return np.zeros((height, width), np.float32), np.zeros(blocks, np.float32)
    total = torch.zeros(1, 1, height, width)
    per_block = []
    for residual in residuals:
        row = residual[residual.shape[0] // 2] if prompt_branch else residual[0]
        magnitude = row.float().abs().mean(dim=0, keepdim=True)[None].cpu()
        per_block.append(float(magnitude.mean()))
        total += torch.nn.functional.interpolate(magnitude, size=(height, width), mode="bilinear",
                                                 align_corners=False)
    return total[0, 0].numpy(), np.array(per_block, np.float32)


def block_names(count: int) -> list[str]:
    return [f"down {k}" for k in range(count - 1)] + ["middle"]


def control_xray(generator, request: ControlNetRequest, job=None) -> ControlXRay:
    """Generate the request's first image (batch 1) and record the units' residuals at every step."""
    request = replace(request, batch_size=1, batch_count=1).resolved()
    models = generator.models
    recorded: list = []

    def run():
        call = denoise.prepare(models, request)

        def on_step(pipeline, index, t, tensors):
            residuals = tensors["control_residuals"]   # summarised now: a step's residuals can be large
            recorded.append((int(t), None if residuals is None else residual_maps(
                residuals, (request.height, request.width), len(residuals), prompt_branch=cfg)))
            if job is not None and job.stop.is_set():
                pipeline._interrupt = True
            return tensors
        cfg = denoise.uses_cfg(call.pipeline, request.guidance_scale)
        latents = call(0, callback=on_step, expose=("control_residuals",))
        return call.decode(latents)[0]

    image = models.worker.call(run) if job is None else run()
    count = next((len(summary[1]) for _, summary in recorded if summary is not None), 0)
    empty = (np.zeros((request.height, request.width), np.float32), np.zeros(count, np.float32))
    maps, blocks = zip(*[summary or empty for _, summary in recorded]) if recorded else ((), ())
    return ControlXRay(image=image, maps=list(maps), blocks=np.array(blocks).reshape(len(recorded), count),
                       block_names=block_names(count), timesteps=[t for t, _ in recorded])


def available_controlnets(models_dir: Path) -> list[str]:
    """The shipped ControlNets, then the user's under models/controlnet/ (folders and .safetensors files)."""
    names = list(SHIPPED_CONTROLNETS)
    folder = Path(models_dir) / "controlnet"
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if (path / "config.json").is_file() or path.suffix == ".safetensors":
                names.append(path.name)
    return names
