"""Inpainting and outpainting: repaint what the mask covers, touch nothing else, at any image size.

`run_inpaint` is the task's denoising loop; how a request becomes an image:

1. The region. "Whole picture": the image, resized to width × height. "Only masked": the mask's
   box plus `only_masked_padding`, grown to width × height's aspect ratio, cropped and resized to
   width × height, so a small model edits a large image one region at a time. The result keeps the image's
   size; the infotext's `Size` is width × height, the processing size, as A1111 records it (what restoring it
   needs to give the same result back). A region generated smaller than it is in the picture comes back
   coarser, and the request's notes say so (`coarseness_note`).
2. The latent mask. The mask is max-pooled onto the latent grid (one cell = `vae_scale_factor`
   pixels), so a stroke narrower than a cell still repaints that cell; diffusers resizes it with
   nearest-neighbour instead, and an 8-px-cell model can lose a thin stroke entirely.
3. Masked content (A1111's names). original: start from the image; fill: from the image with the
   masked part filled by its blurred surroundings; latent noise: the masked latents replaced by
   noise; latent nothing: by zeros. Then noised to `strength` of the schedule, as img2img does.
4. The loop (diffusers' inpainting loop, one explicit `Denoiser` step at a time). A 4-channel UNet:
   after each step the latents outside the mask are replaced by the image's, noised to the next
   step's level. A 9-channel inpainting UNet also sees the mask and the masked image's latents as
   extra input channels. Soft inpainting (differential diffusion, Levin & Fried 2023): a grey mask
   value m is a per-pixel strength; after step i of n a latent pixel keeps what was generated only
   if m > 1 - (i+1)/n, i.e. it joins the denoising when the noise level has fallen to m.
5. Paste-back (`composite`). The decoded region is resized back into its box and laid over the
   original through the mask blurred by `mask_blur` px and cut to zero beyond that radius: every
   pixel farther than the blur from the mask is the original's, bit for bit, and the edge has no
   seam.

Outpainting (pipelines/tasks/outpaint.py) is an inpainting of an extended canvas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageFilter, ImageOps
from scipy import ndimage

from pipelines.core.checks import NUMBER_RANGES, check_choice, check_flag, check_input_image, check_number, check_whole
from pipelines.core.denoiser import Denoiser
from pipelines.core.schedules import set_schedule
from pipelines.core.images import image_to_tensor
from pipelines.core.loop import run_steps, strength_timesteps
from pipelines.core.registry import InfotextField, Task, register
from pipelines.core.requests import SamplingSettings
from pipelines.core.vae import encode
from pipelines.tasks.masks import _full_cells, _latent_pool, _mask_values, crop_box, fill_masked

MASK_MODES = ("Inpaint masked", "Inpaint not masked")


MASKED_CONTENT = ("original", "fill", "latent noise", "latent nothing")


INPAINT_AREAS = ("Whole picture", "Only masked")


MAX_MASK_BLUR = 64


MAX_PADDING = 512


@dataclass(frozen=True)
class Region:
    """The part of the image that is generated, at the processing size (width × height)."""
    box: tuple[int, int, int, int]     # (left, top, right, bottom) in the input image
    image: Image.Image                  # the box's pixels at width × height (masked content already filled)
    mask: np.ndarray                    # (height, width) repaint map in [0, 1]: binary, or soft (blurred)
    latent_mask: np.ndarray             # (height/f, width/f): `mask` max-pooled onto the latent grid
    cells_dilated: int                  # latent cells the pooling added beyond the cells the mask fills


@dataclass(kw_only=True)
class InpaintRequest(SamplingSettings):
    """Repaint what `mask` covers (white = repaint) in `init_image`, of any size; the rest stays as it was."""

    task: ClassVar[str] = "inpaint"
    prompt: str = ""                        # the image and the mask are what inpainting cannot do without
    init_image: Image.Image = field(repr=False)
    mask: Image.Image = field(repr=False)
    mask_blur: int = 4
    mask_mode: str = "Inpaint masked"
    masked_content: str = "original"
    inpaint_area: str = "Whole picture"
    only_masked_padding: int = 32
    strength: float = 0.75
    soft_inpainting: bool = False
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # mask and region, once

    def __post_init__(self):
        super().__post_init__()
        for name in ("init_image", "mask"):
            if not isinstance(getattr(self, name), Image.Image):
                what = "an input image" if name == "init_image" else "a mask (white = repaint; paint one or upload one)"
                raise ValueError(f"Inpainting needs {what} as `{name}`.")
        check_input_image("init_image", self.init_image)
        check_input_image("mask", self.mask)
        check_whole("mask_blur", self.mask_blur, 0, MAX_MASK_BLUR, unit="px")
        check_whole("only_masked_padding", self.only_masked_padding, 0, MAX_PADDING, unit="px")
        check_choice("mask_mode", self.mask_mode, MASK_MODES)
        check_choice("masked_content", self.masked_content, MASKED_CONTENT)
        check_choice("inpaint_area", self.inpaint_area, INPAINT_AREAS)
        check_number("strength", self.strength, *NUMBER_RANGES["strength"])
        check_flag("soft_inpainting", self.soft_inpainting)
        if not (np.asarray(self.repaint_mask()) > 0).any():
            raise ValueError("The mask is empty: nothing would be repainted. Paint over what should change "
                             "(white = repaint), or switch the mask mode.")

    def _once(self, key, compute):
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    # -- the mask -------------------------------------------------------------------------------
    def repaint_mask(self) -> Image.Image:
        """The mask as 8-bit grey at the image's size (white = repaint), after the mask mode."""
        def compute():
            mask = _mask_values(self.mask)
            if mask.size != self.init_image.size:
                mask = mask.resize(self.init_image.size, Image.Resampling.BILINEAR)
            return ImageOps.invert(mask) if self.mask_mode == "Inpaint not masked" else mask
        return self._once("mask", compute)

    def paste_alpha(self) -> np.ndarray:
        """How much of the generated image each pixel takes, (H, W) in [0, 1]: all of it under the mask, and
        outside it a feather, the mask blurred (a Gaussian of sigma `mask_blur` / 3) and cut to zero farther
        than `mask_blur` px from the mask, where the Gaussian's tail has fallen under 0.2%. (Blurring inwards
        too would fade a small mask's edit away.)"""
        def compute():
            mask = np.asarray(self.repaint_mask(), dtype=np.float32) / 255.0
            if self.mask_blur == 0:
                return mask
            # only around the mask: elsewhere the alpha is 0, and a big image with a small mask stays cheap
            rows, columns = np.nonzero(mask)
            margin = self.mask_blur + 1
            top, left = max(int(rows.min()) - margin, 0), max(int(columns.min()) - margin, 0)
            bottom, right = int(rows.max()) + 1 + margin, int(columns.max()) + 1 + margin
            near = mask[top:bottom, left:right]
            grey = Image.fromarray((near * 255).astype(np.uint8))
            blurred = np.asarray(grey.filter(ImageFilter.GaussianBlur(self.mask_blur / 3)), dtype=np.float32) / 255.0
            reach = ndimage.distance_transform_edt(near == 0) <= self.mask_blur
            alpha = np.zeros_like(mask)
            alpha[top:bottom, left:right] = np.where(reach, np.maximum(blurred, near), 0.0)
            return alpha
        return self._once("alpha", compute)

    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the part that is generated: all of it, or the mask's box plus padding."""
        def compute():
            if self.inpaint_area == "Whole picture":
                return (0, 0, *self.init_image.size)
            return crop_box(np.asarray(self.repaint_mask()) > 0, padding=self.only_masked_padding + self.mask_blur,
                            aspect=self.width / self.height, image_size=self.init_image.size)
        return self._once("box", compute)

    # -- the region -----------------------------------------------------------------------------
    def region(self, vae_scale_factor: int) -> Region:
        return self._once(("region", vae_scale_factor), lambda: self._region(vae_scale_factor))

    def _region(self, vae_scale_factor: int) -> Region:
        image, mask, box = self.init_image.convert("RGB"), self.repaint_mask(), self.box()
        size = (self.width, self.height)
        crop_image = image.crop(box).resize(size, Image.Resampling.LANCZOS)
        crop_mask = mask.crop(box).resize(size, Image.Resampling.BILINEAR)
        binary = (np.asarray(crop_mask) > 0).astype(np.float32)   # bilinear spreads a thin stroke: none is lost
        if self.masked_content == "fill":
            crop_image = fill_masked(crop_image, Image.fromarray((binary * 255).astype(np.uint8)))
        repaint = binary
        if self.soft_inpainting:
            soft = crop_mask.filter(ImageFilter.GaussianBlur(self.mask_blur / 2)) if self.mask_blur else crop_mask
            repaint = np.asarray(soft, dtype=np.float32) / 255.0
        latent_mask = _latent_pool(repaint, vae_scale_factor)
        cells_dilated = int((latent_mask > 0).sum() - (_full_cells(binary, vae_scale_factor) > 0).sum())
        return Region(box=box, image=crop_image, mask=repaint, latent_mask=latent_mask, cells_dilated=cells_dilated)

    # -- the task's answers -----------------------------------------------------------------------
    def notes(self) -> list[str]:
        notes = []
        if _mask_values(self.mask).size != self.init_image.size:
            notes.append(f"The mask is {self.mask.width}×{self.mask.height} but the image is "
                         f"{self.init_image.width}×{self.init_image.height}: the mask was resized to the image.")
        if self.strength == 0.0:
            notes.append("Strength 0 keeps the input image unchanged.")
        left, top, right, bottom = self.box()
        box_aspect, wanted = (right - left) / (bottom - top), self.width / self.height
        if self.inpaint_area == "Only masked" and abs(box_aspect / wanted - 1) > 0.02:
            notes.append(f"The box around the mask ({right - left}×{bottom - top}) cannot grow to the shape of "
                         f"{self.width}×{self.height} inside the image, so it is stretched to it and back.")
        coarse = self.coarseness_note()
        return notes + ([coarse] if coarse else [])

    def coarseness_note(self) -> str | None:
        """What the user is told when the region is generated smaller than it is in the picture (Width × Height
        below the region's size): it is scaled back up, so the repaint is coarser than the picture around it."""
        left, top, right, bottom = self.box()
        factor = max((right - left) / self.width, (bottom - top) / self.height)
        if factor <= 1.05:
            return None
        size = f"{self.width}×{self.height}"
        if self.inpaint_area == "Whole picture":
            return (f"The {right - left}×{bottom - top} picture was repainted as one {size} region (Width × Height) "
                    f"and scaled back up, so the repaint is {factor:.3g}× coarser than the picture. For a sharper "
                    f"repaint pick Inpaint area \"Only masked\" (the mask's box at {size}), or raise Width and "
                    "Height (slower, and past twice the model's size it repeats).")
        return (f"The {right - left}×{bottom - top} box around what is repainted was generated at {size} (Width × "
                f"Height) and scaled back up, so the repaint is {factor:.3g}× coarser than the picture. Repaint a "
                "smaller area (outpainting: extend less at a time), or raise Width and Height.")

    def unchanged_image(self) -> Image.Image | None:
        return self.init_image.convert("RGB") if self.strength == 0.0 else None

    def check_steps(self) -> None:
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"`strength` {self.strength} × {self.steps} steps leaves no denoising step; raise the "
                             "steps or the strength.")

    def as_inpainting(self) -> "InpaintRequest":
        return self

    def generated_canvas(self, image: Image.Image) -> np.ndarray:
        """The input image with the generated region (`image`, at the processing size) resized into its box."""
        canvas = np.asarray(self.init_image.convert("RGB")).copy()
        left, top, right, bottom = self.box()
        canvas[top:bottom, left:right] = np.asarray(
            image.convert("RGB").resize((right - left, bottom - top), Image.Resampling.LANCZOS))
        return canvas

    def composite(self, image: Image.Image) -> Image.Image:
        """The generated region pasted back into the original through `paste_alpha`."""
        original = np.asarray(self.init_image.convert("RGB"))
        generated = self.generated_canvas(image)
        alpha = self.paste_alpha()[..., None]
        blended = np.round(original * (1.0 - alpha) + generated * alpha).astype(np.uint8)
        return Image.fromarray(np.where(alpha > 0, blended, original))


def run_inpaint(call, batch_index: int, *, generators=None, latents=None, callback=None, expose=()) -> torch.Tensor:
    """The inpainting task's loop for one batch (its registry entry's `run`); latents out."""
    request, pipeline = call.request.as_inpainting(), call.pipeline
    unet, vae, scheduler = pipeline.unet, pipeline.vae, pipeline.scheduler
    device, dtype, batch = call.device, unet.dtype, request.batch_size
    generators = generators or call.generators(batch_index)

    # 1. The region and its latents
    region = request.region(pipeline.vae_scale_factor)
    image = image_to_tensor(region.image).to(device, dtype)
    image_latents = encode(vae, image).to(dtype).repeat(batch, 1, 1, 1)
    # 2. The latent mask (max-pooled: a thin stroke keeps its cell)
    latent_mask = torch.from_numpy(region.latent_mask)[None, None].to(device, dtype)

    # 3. Timesteps for the strength, and the starting latents from the masked content
    set_schedule(scheduler, request.steps, request.schedule, unet_config=unet.config, device=device)
    timesteps = strength_timesteps(scheduler, request.steps, request.strength)
    noise = randn_tensor(image_latents.shape, generator=generators, device=device, dtype=dtype)
    start = image_latents
    if request.masked_content == "latent noise":
        fresh = randn_tensor(image_latents.shape, generator=generators, device=device, dtype=dtype)
        start = image_latents * (1 - latent_mask) + fresh * latent_mask
    elif request.masked_content == "latent nothing":
        start = image_latents * (1 - latent_mask)
    if latents is None:
        # at full strength "original" starts from pure noise, as diffusers does; the other contents are noised
        # like any start, so what they put under the mask still shows through at the first step
        full_noise = request.strength >= 1.0 and request.masked_content == "original"
        latents = noise * scheduler.init_noise_sigma if full_noise else scheduler.add_noise(start, noise, timesteps[:1])

    # 4. The loop: a 9-channel UNet sees the mask and the masked image; a 4-channel one is re-anchored
    extra = None
    if unet.config.in_channels == 9:
        pixel_mask = torch.from_numpy((region.mask > 0).astype(np.float32))[None, None].to(device, dtype)
        masked_image_latents = encode(vae, image * (pixel_mask < 0.5)).to(dtype)
        extra = torch.cat([(latent_mask > 0).to(dtype), masked_image_latents], dim=1).repeat(batch, 1, 1, 1)
    denoiser = Denoiser(call, generators=generators, size=region.image.size)     # SDXL: the box's own size ids

    def step(index, t, latents):
        latents = denoiser.step(latents, t, index=index, count=len(timesteps), extra_channels=extra).latents
        if extra is None or request.soft_inpainting:   # a 9-channel UNet needs no re-anchoring, but soft does
            last = index == len(timesteps) - 1
            known = image_latents if last else scheduler.add_noise(image_latents, noise, timesteps[index + 1:index + 2])
            keep = latent_mask
            if request.soft_inpainting:  # differential diffusion: a pixel joins once the noise falls to its value
                keep = (latent_mask > 1.0 - (index + 1) / len(timesteps)).to(dtype)
            latents = (1 - keep) * known + keep * latents
        return latents, {}

    return run_steps(call, timesteps, latents, step, callback=callback)


def _inpainting_pipeline(base):
    """The base's inpainting pipeline (shared weights): its components, for the task's own loop (Flux 2 [klein]'s,
    which diffusers' auto pipelines do not list, for its own; for Flux 2 [dev], PixArt and Sana, their text-to-image
    call started from the image, the cells outside the mask kept: pipelines/core/transformers.py)."""
    from diffusers import AutoPipelineForInpainting, Flux2KleinInpaintPipeline

    from pipelines.core.transformers import rebuilt, start_from_image
    if type(base).__name__ == "Flux2KleinPipeline":
        return rebuilt(Flux2KleinInpaintPipeline, base)
    if type(base).__name__.startswith(("PixArt", "Sana", "Flux2")):   # none in diffusers: the start kept
        return start_from_image(base)
    return AutoPipelineForInpainting.from_pipe(base)


INPAINT_INFOTEXT = (InfotextField("Denoising strength", "strength", float), InfotextField("Mask blur", "mask_blur", int),
                    InfotextField("Mask mode", "mask_mode", str), InfotextField("Masked content", "masked_content", str),
                    InfotextField("Inpaint area", "inpaint_area", str),
                    InfotextField("Masked area padding", "only_masked_padding", int),
                    InfotextField("Soft inpainting enabled", "soft_inpainting", bool))

register(Task("inpaint", "Inpainting", InpaintRequest, _inpainting_pipeline, INPAINT_INFOTEXT, run=run_inpaint))
