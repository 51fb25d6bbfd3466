"""The Control X-ray: where and how strongly the ControlNet units' residuals pushed, step by step."""

from __future__ import annotations

from dataclasses import dataclass, replace

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipelines.core.call import prepare
from pipelines.core.guidance import uses_cfg
from pipelines.tasks.controlnet import ControlNetRequest

# How a step's map is coloured: on its own scale (where this step pushes, however weakly), on one scale for all
# steps (how control fades in and out), or as its change since the previous step
STEP_SCALE, ALL_STEPS_SCALE, CHANGE = "step", "all steps", "change"
SCALES = (STEP_SCALE, ALL_STEPS_SCALE, CHANGE)
MAGNITUDE_COLOURS, CHANGE_COLOURS = "inferno", "RdBu_r"    # perceptual; diverging around "no change"
MIN_SHOWN_PX = 256            # small images are enlarged (nearest) so their places can be told apart


@dataclass
class XRayView:
    """One step of the X-ray as shown: the map coloured over the image beside its colour bar, and the legend."""
    image: Image.Image
    low: float                # the values at the colour bar's bottom and top
    high: float
    legend: str


@dataclass
class ControlXRay:
    """Where and how strongly the units' residuals pushed, per step."""
    image: Image.Image                  # the generated image
    maps: list[np.ndarray]              # per step: H×W, the residuals' mean magnitude summed over blocks, upsampled
    blocks: np.ndarray                  # steps × blocks: mean |residual| per block (down blocks, then the middle)
    block_names: list[str]
    timesteps: list[int]

    def overlay(self, step: int, scale: float | None = None) -> Image.Image:
        """Step `step`'s map over the image, on a scale from 0 to `scale` (default: the strongest step's peak)."""
        peak = scale if scale is not None else self.peak() or 1.0
        return self._coloured(self.maps[step] / peak, MAGNITUDE_COLOURS)

    def peak(self, step: int | None = None) -> float:
        maps = self.maps if step is None else [self.maps[step]]
        return max((float(m.max()) for m in maps), default=0.0)

    def view(self, step: int, scale: str = STEP_SCALE) -> XRayView:
        """Step `step` coloured as `scale` (one of SCALES) says, with its colour bar and a legend naming its range."""
        if scale not in SCALES:
            raise ValueError(f"Unknown X-ray scale {scale!r}; expected one of {', '.join(SCALES)}.")
        last, strongest = len(self.maps) - 1, self.peak()
        title = f"Step {step} of {last} (t = {self.timesteps[step]})"
        if scale == CHANGE:
            before = self.maps[step - 1] if step > 0 else np.zeros_like(self.maps[step])
            change = self.maps[step] - before
            reach = float(np.abs(change).max()) or 1.0
            since = f"step {step - 1}" if step > 0 else "the start (no control before step 0)"
            legend = (f"{title}: change since {since} of the units' mean |residual| per place, from {-reach:.3g} "
                      f"(blue: weaker) through 0 (the image shows through) to +{reach:.3g} (red: stronger).")
            return XRayView(self._with_bar(self._coloured(change / (2 * reach) + 0.5, CHANGE_COLOURS, centred=True),
                                           -reach, reach, CHANGE_COLOURS), -reach, reach, legend)
        if scale == STEP_SCALE:       # from this step's weakest place to its strongest: where it pushes most
            low, high = float(self.maps[step].min()), self.peak(step)
        else:
            low, high = 0.0, strongest
        if high == 0:
            legend = f"{title}: no unit acted at this step (weight 0, or outside its start–end range)."
        elif scale == STEP_SCALE:
            legend = (f"{title}: colour = the units' mean |residual| per place, {low:.3g} to {high:.3g} (this "
                      f"step's weakest to strongest place; its peak is {high / strongest:.0%} of the strongest step's).")
        else:
            legend = (f"{title}: colour = the units' mean |residual| per place, 0 to {high:.3g} (the strongest "
                      f"step's peak: one scale for all steps, so fading shows).")
        spread = (high - low) or 1.0
        shown = self._coloured((self.maps[step] - low) / spread, MAGNITUDE_COLOURS)
        return XRayView(self._with_bar(shown, low, high, MAGNITUDE_COLOURS), low, high, legend)

    def _coloured(self, values: np.ndarray, colours: str, *, centred: bool = False) -> Image.Image:
        """`values` in [0, 1] through a colour map over the image in grey; the stronger (or, `centred`, the
        further from 0.5) a place, the less of the image shows through."""
        values = np.clip(values, 0.0, 1.0)
        colour = matplotlib.colormaps[colours](values)[..., :3] * 255
        strength = np.abs(values - 0.5) * 2 if centred else values
        alpha = (0.35 + 0.65 * strength)[..., None]
        grey = np.asarray(self.image.convert("L"), np.float32)[..., None] * 0.6
        return Image.fromarray(np.clip(grey * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8))

    @staticmethod
    def _with_bar(shown: Image.Image, low: float, high: float, colours: str) -> Image.Image:
        """`shown` enlarged to at least MIN_SHOWN_PX, with a labelled colour bar on its right."""
        factor = max(1, -(-MIN_SHOWN_PX // min(shown.size)))
        shown = shown.resize((shown.width * factor, shown.height * factor), Image.Resampling.NEAREST)
        font = ImageFont.load_default(size=13)
        labels = [f"{high:+.3g}" if low < 0 else f"{high:.3g}", f"{(low + high) / 2:.3g}", f"{low:.3g}"]
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        text_width = measure.textbbox((0, 0), "+8.88e-08", font=font)[2]    # the same width at every step
        bar_width, margin = 16, 8
        panel = Image.new("RGB", (shown.width + 2 * margin + bar_width + 6 + text_width + margin, shown.height),
                          "white")
        panel.paste(shown, (0, 0))
        ramp = np.linspace(1.0, 0.0, shown.height)[:, None].repeat(bar_width, axis=1)
        bar = (matplotlib.colormaps[colours](ramp)[..., :3] * 255).astype(np.uint8)
        left = shown.width + margin
        panel.paste(Image.fromarray(bar), (left, 0))
        draw = ImageDraw.Draw(panel)
        text_height = measure.textbbox((0, 0), "0.9", font=font)[3]
        for label, top in zip(labels, (0, (shown.height - text_height) // 2, shown.height - text_height - 2)):
            draw.text((left + bar_width + 6, top), label, fill="black", font=font)
        return panel


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
        call = prepare(models, request)

        def on_step(pipeline, index, t, tensors):
            residuals = tensors["control_residuals"]   # summarised now: a step's residuals can be large
            recorded.append((int(t), None if residuals is None else residual_maps(
                residuals, (request.height, request.width), len(residuals), prompt_branch=cfg)))
            if job is not None and job.stop.is_set():
                pipeline._interrupt = True
            return tensors
        cfg = uses_cfg(call.pipeline, request.guidance_scale)
        latents = call(0, callback=on_step, expose=("control_residuals",))
        return call.decode(latents)[0]

    image = models.worker.call(run) if job is None else run()
    count = next((len(summary[1]) for _, summary in recorded if summary is not None), 0)
    empty = (np.zeros((request.height, request.width), np.float32), np.zeros(count, np.float32))
    maps, blocks = zip(*[summary or empty for _, summary in recorded]) if recorded else ((), ())
    return ControlXRay(image=image, maps=list(maps), blocks=np.array(blocks).reshape(len(recorded), count),
                       block_names=block_names(count), timesteps=[t for t, _ in recorded])
