"""Comparing images, for the Diffusion Explorer tab: one seed run over several samplers, step counts and
CFG scales, each measured against a many-step reference and laid out in a labelled grid; and the difference
map and RMS distance between two images (a branch against its original, a cell against its reference).

Every family runs it: a UNet model through the studio's loop, a diffusion transformer (SD 3.x, Flux, Flux 2,
PixArt, Sana) through its own pipeline's call, each cell the image Text-to-Image draws with its settings, and the
model calls counted on the denoiser, whichever it is. A transformer runs the samplers its family's menu holds (the
flow-matching ones for a flow model), an EDM UNet (Playground v2.5) its EDM samplers, and the default reference,
DDIM, becomes the model's own sampler where the model does not run DDIM.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.core.call import prepare
from pipelines.core.checks import MAX_STEPS
from pipelines.core.families import family_of_pipeline
from pipelines.core.samplers import DEFAULT_SAMPLER, EDM_SAMPLERS, STEPWISE_SAMPLER_NAMES, is_edm, model_default_sampler
from pipelines.core.transformers import default_transformer_sampler, denoiser_of, is_transformer, transformer_samplers
from pipelines.explorer.reverse import check_one_image, initial_noise
from pipelines.explorer.trace import colour_map
from pipelines.models.manager import ModelManager
from pipelines.tasks.txt2img import Txt2ImgRequest

MAX_COMPARE_CELLS = 24
DEFAULT_REFERENCE_SAMPLER = "DDIM"
DIFFERENCE_COLORMAP = "inferno"
MIN_GRID_CELL_PX = 128          # small images are upscaled (nearest) to at least this in the comparison grid


# ----------------------------------------------------------------------------- two images


def difference_map(image_a: Image.Image, image_b: Image.Image, *, gain: float = 4.0) -> Image.Image:
    """|a - b| per pixel (mean over RGB), amplified `gain` times and colour-mapped (black: identical)."""
    if image_a.size != image_b.size:
        raise ValueError(f"The images have to have the same size but are {image_a.size} and {image_b.size}.")
    if gain <= 0:
        raise ValueError(f"`gain` has to be positive but is {gain}.")
    a = np.asarray(image_a.convert("RGB"), dtype=np.float32)
    b = np.asarray(image_b.convert("RGB"), dtype=np.float32)
    return colour_map(np.abs(a - b).mean(axis=2) * gain / 255.0, DIFFERENCE_COLORMAP)


def rms_distance(image_a: Image.Image, image_b: Image.Image) -> float:
    """Root-mean-square difference in pixel values 0..255."""
    if image_a.size != image_b.size:
        raise ValueError(f"The images have to have the same size but are {image_a.size} and {image_b.size}.")
    a = np.asarray(image_a.convert("RGB"), dtype=np.float64)
    b = np.asarray(image_b.convert("RGB"), dtype=np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)))


# ----------------------------------------------------------------------------- samplers side by side


COMPARE_COLUMNS: tuple[str, ...] = ("sampler", "steps", "CFG", "RMS to reference (0–255)", "seconds",
                                    "UNet calls", "model evaluations")


@dataclass
class CompareRow:
    sampler: str
    steps: int
    guidance_scale: float
    rms_to_reference: float         # pixel values 0..255
    seconds: float
    unet_calls: int                 # the denoiser's (UNet's or transformer's) forward calls; one may carry both CFG
    model_evaluations: int          # halves; evaluations: calls × batch, 2 per call with CFG
    reference_sampler: str = ""     # what the cell was measured against (at the reference's steps)

    def values(self) -> list:
        return [self.sampler, self.steps, self.guidance_scale, round(self.rms_to_reference, 2),
                round(self.seconds, 3), self.unet_calls, self.model_evaluations]


def compare(models: ModelManager, request: Txt2ImgRequest, *, samplers: list[str] | None = None,
            steps: list[int] | None = None, cfgs: list[float] | None = None, reference_steps: int = 100,
            reference_sampler: str | None = DEFAULT_REFERENCE_SAMPLER, stop: threading.Event | None = None,
            on_step: Callable[[int, int], None] | None = None) -> tuple[Image.Image, list[CompareRow]]:
    """Run one seed over every combination of `samplers` × `steps` × `cfgs` (None: the request's value).

    Each cell is measured against a reference: `reference_sampler` (None: the cell's own sampler) at
    `reference_steps` steps and the cell's CFG, same seed. Deterministic samplers converge towards it as
    steps grow; stochastic ones (Euler a, DDPM, ...) sample a different image and stay far from it.
    Returns the labelled grid (one row per sampler) and one CompareRow per cell, in grid order.
    """
    # 1. Check inputs
    request = request.resolved()
    samplers, steps, cfgs = (list(samplers or [request.sampler]), list(steps or [request.steps]),
                             list(cfgs or [request.guidance_scale]))
    samplers, reference_sampler = _checked_for_the_model(models, samplers, reference_sampler)
    cells = [replace(request, sampler=s, steps=n, guidance_scale=w) for s in samplers for n in steps for w in cfgs]
    if len(cells) > MAX_COMPARE_CELLS:
        raise ValueError(f"{len(samplers)} sampler(s) × {len(steps)} step count(s) × {len(cfgs)} CFG value(s) "
                         f"make {len(cells)} images; at most {MAX_COMPARE_CELLS} fit one comparison.")
    if isinstance(reference_steps, bool) or not isinstance(reference_steps, int) \
            or not 1 <= reference_steps <= MAX_STEPS:
        raise ValueError(f"`reference_steps` has to be a whole number from 1 to {MAX_STEPS} "
                         f"but is {reference_steps!r}.")
    if reference_sampler is not None and reference_sampler not in STEPWISE_SAMPLER_NAMES:
        raise ValueError(f"Unknown reference sampler {reference_sampler!r}. "
                         f"Valid samplers: {', '.join(STEPWISE_SAMPLER_NAMES)}.")

    # 2. Generate every cell, and each reference once
    references: dict[tuple[str, float], Image.Image] = {}
    images, rows = [], []
    for number, cell in enumerate(cells):
        if stop is not None and stop.is_set():
            break
        image, seconds, calls, evaluations = _measured_generation(models, cell)
        key = (reference_sampler or cell.sampler, cell.guidance_scale)
        if key not in references:
            references[key] = _measured_generation(models, replace(cell, sampler=key[0], steps=reference_steps))[0]
        images.append(image)
        rows.append(CompareRow(cell.sampler, cell.steps, cell.guidance_scale, rms_distance(image, references[key]),
                               seconds, calls, evaluations, key[0]))
        if on_step is not None:
            on_step(number + 1, len(cells))

    # 3. Lay out the grid: a row per sampler, a column per (steps, CFG)
    return _grid(images, rows, columns=len(steps) * len(cfgs)), rows


def _checked_for_the_model(models: ModelManager, samplers: list[str],
                           reference: str | None) -> tuple[list[str], str | None]:
    """Refuse a sampler the loaded transformer's family (or EDM model) does not run, naming those it does; the
    studio's default sampler and the default reference (DDIM) become the model's own sampler where the model does not
    run them, as Text-to-Image's do. The samplers and the reference sampler that run are returned."""
    model = models.current
    if model is not None and is_transformer(model.pipeline):
        runs = transformer_samplers(model.pipeline, model.scheduler_config)
        own = default_transformer_sampler(model.scheduler_config)
        own = own if own in runs else runs[0]
    elif model is not None and is_edm(model.scheduler_config):     # an EDM UNet (Playground v2.5)
        runs, own = tuple(EDM_SAMPLERS), model_default_sampler(model.scheduler_config)
    else:
        return samplers, reference
    samplers = list(dict.fromkeys(own if name == DEFAULT_SAMPLER and name not in runs else name for name in samplers))
    foreign = [name for name in samplers if name not in runs]
    if reference in (DEFAULT_REFERENCE_SAMPLER, DEFAULT_SAMPLER) and reference not in runs:
        reference = own
    if reference is not None and reference not in runs:
        foreign.append(f"{reference} (the reference)")
    if foreign:
        raise ValueError(f"{model.name} ({family_of_pipeline(model.pipeline)}) does not run {', '.join(foreign)}; "
                         f"it runs {', '.join(runs)}.")
    return samplers, reference


def _measured_generation(models: ModelManager, request: Txt2ImgRequest) -> tuple[Image.Image, float, int, int]:
    """The Generator-identical image, its wall time and how often the denoiser (UNet or transformer) ran."""
    check_one_image(request)
    run = prepare(models, request)
    counts = {"calls": 0, "evaluations": 0}

    def count(module, args, output):
        counts["calls"] += 1
        counts["evaluations"] += (output[0] if isinstance(output, tuple) else output.sample).shape[0]

    handle = denoiser_of(run.pipeline).register_forward_hook(count)
    started = time.perf_counter()
    try:
        if is_transformer(run.pipeline):       # its pipeline draws the noise from the generators, as Generator's
            image = run.decode(run(0))[0]
        else:
            noise, generators = initial_noise(run)
            image = run.decode(run(0, generators=generators, latents=noise))[0]
    finally:
        handle.remove()
    return image, time.perf_counter() - started, counts["calls"], counts["evaluations"]


def _grid(images: list[Image.Image], rows: list[CompareRow], *, columns: int) -> Image.Image:
    if not images:
        raise ValueError("The comparison was stopped before its first image.")
    font = ImageFont.load_default()
    width, height = images[0].size
    factor = max(1, math.ceil(MIN_GRID_CELL_PX / min(width, height)))
    labels = [[row.sampler, f"{row.steps} steps, CFG {row.guidance_scale:g}",
               f"RMS {row.rms_to_reference:.1f} px, {row.seconds:.2f} s",
               f"NFE {row.unet_calls} calls ({row.model_evaluations} evals)"] for row in rows]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(measure.textbbox((0, 0), line, font=font)[2] for lines in labels for line in lines)
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + 3
    cell_width = max(width * factor, text_width) + 8
    cell_height = height * factor + 4 * line_height + 10
    row_count = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell_width, row_count * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, lines) in enumerate(zip(images, labels)):
        left, top = (index % columns) * cell_width, (index // columns) * cell_height
        shown = image.resize((width * factor, height * factor), Image.Resampling.NEAREST)
        grid.paste(shown, (left + (cell_width - shown.width) // 2, top + 4))
        for number, line in enumerate(lines):
            draw.text((left + 4, top + shown.height + 6 + number * line_height), line, fill="black", font=font)
    return grid


def parse_compare_lists(samplers: str, steps: str, cfgs: str) -> dict:
    """Comma- or newline-separated text from the UI -> keyword arguments for `compare` (None where empty)."""
    def items(text: str) -> list[str]:
        return [item.strip() for item in re.split(r"[,;\n]", text or "") if item.strip()]

    by_lower = {name.lower(): name for name in STEPWISE_SAMPLER_NAMES}   # speculative: its own panel
    sampler_list = []
    for item in items(samplers):
        if item.lower() not in by_lower:
            raise ValueError(f"Unknown sampler {item!r} in the comparison. Valid samplers: "
                             f"{', '.join(STEPWISE_SAMPLER_NAMES)}.")
        sampler_list.append(by_lower[item.lower()])
    try:
        step_list = [int(item) for item in items(steps)]
    except ValueError:
        raise ValueError(f"Steps have to be whole numbers separated by commas, like `10, 20, 50`, "
                         f"but are {steps!r}.") from None
    try:
        cfg_list = [float(item) for item in items(cfgs)]
    except ValueError:
        raise ValueError(f"CFG values have to be numbers separated by commas, like `1, 4, 7.5`, "
                         f"but are {cfgs!r}.") from None
    return {"samplers": sampler_list or None, "steps": step_list or None, "cfgs": cfg_list or None}
