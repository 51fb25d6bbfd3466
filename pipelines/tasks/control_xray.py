"""The Control X-ray: where and how strongly the ControlNet units' residuals pushed, step by step."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from pipelines.core.call import prepare
from pipelines.core.denoiser import uses_cfg
from pipelines.tasks.controlnet import ControlNetRequest


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
