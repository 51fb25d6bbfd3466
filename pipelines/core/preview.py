"""Live previews of latents.

The cheap preview is one linear map from latent channels to RGB (ComfyUI's latent_preview
idea). Instead of shipping coefficients per VAE family we fit them, once per VAE, by least
squares on a handful of synthetic colour images encoded by that VAE: it works for any model.
`auto` uses the full VAE decode when that costs at most a tenth of the steps between
previews, else the linear map.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from pipelines.core.images import to_pil
from pipelines.core.vae import decode, encode

FULL_DECODE_BUDGET = 0.15  # at most this share of the time between previews goes to decoding


class LatentPreviewer:
    """Turns in-flight latents into small RGB previews for one VAE."""

    def __init__(self, vae, vae_scale_factor: int):
        self.vae = vae
        self.scale = vae_scale_factor
        self._linear: torch.Tensor | None = None   # (channels + 1, 3)
        self._decode_seconds: float | None = None

    def fit_linear_map(self, samples: int = 24, size: int = 64, seed: int = 0) -> torch.Tensor:
        """Least-squares latent->RGB map fitted on smooth random colour images."""
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(samples, 3, 4, 4, generator=generator) * 2 - 1
        images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        latents = encode(self.vae, images).float().cpu()
        targets = torch.nn.functional.avg_pool2d(images, self.scale)
        features = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        features = torch.cat([features, torch.ones(len(features), 1)], dim=1)
        rgb = targets.permute(0, 2, 3, 1).reshape(-1, 3)
        self._linear = torch.linalg.lstsq(features.double(), rgb.double()).solution.float()
        return self._linear

    def linear_map(self) -> torch.Tensor:
        """The latent->RGB map, (channels + 1, 3) with the offset last, fitted on first use."""
        return self._linear if self._linear is not None else self.fit_linear_map()

    def linear(self, latents: torch.Tensor) -> list[Image.Image]:
        self.linear_map()
        latents = latents.float().cpu()
        rgb = torch.einsum("bchw,cr->brhw", latents, self._linear[:-1]) + self._linear[-1].view(1, 3, 1, 1)
        # one colour per latent pixel, enlarged smoothly: blocks (nearest) would hide the picture forming
        return [image.resize((image.width * self.scale, image.height * self.scale), Image.Resampling.BICUBIC)
                for image in to_pil(rgb)]

    def full(self, latents: torch.Tensor) -> list[Image.Image]:
        started = time.perf_counter()
        images, _ = decode(self.vae, latents)
        result = to_pil(images)
        self._decode_seconds = time.perf_counter() - started
        return result

    def __call__(self, latents: torch.Tensor, *, mode: str, seconds_between_previews: float | None) -> list[Image.Image]:
        if mode == "linear":
            return self.linear(latents)
        if mode == "full":
            return self.full(latents)
        # auto: measure one full decode, then keep using it only while it stays within budget
        if self._decode_seconds is None:
            return self.full(latents)
        if seconds_between_previews and self._decode_seconds <= FULL_DECODE_BUDGET * seconds_between_previews:
            return self.full(latents)
        return self.linear(latents)


def is_blank(image: Image.Image, tolerance: float = 2.0) -> bool:
    """True for a (near) single-colour image: what a NaN decode or an empty result looks like."""
    return float(np.asarray(image.convert("RGB"), dtype=np.float32).std()) < tolerance
