"""Inpainting and outpainting: repaint what the mask covers, touch nothing else, at any image size.

`run_inpaint` is the task's denoising loop; how a request becomes an image:

1. The region. "Whole picture": the image, resized to width × height. "Only masked": the mask's
   box plus `only_masked_padding`, grown to width × height's aspect ratio, cropped and resized to
   width × height, so a small model edits a large image one region at a time.
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

Outpainting extends the canvas, pre-fills the new area and inpaints it plus an overlap band, then
puts the original region back unchanged (the new area is feathered into it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from pipelines import denoise   # as a module: pipelines.tasks imports this one while denoise imports tasks
from pipelines.tasks import (MAX_INPUT_PIXELS, InfotextField, SamplingSettings, Task, check_input_image,
                             register)

MASK_MODES = ("Inpaint masked", "Inpaint not masked")
MASKED_CONTENT = ("original", "fill", "latent noise", "latent nothing")
INPAINT_AREAS = ("Whole picture", "Only masked")
PREFILLS = ("edge", "blur")
MAX_MASK_BLUR = 64
MAX_PADDING = 512
MAX_EXTEND = 1024
MAX_XRAY_SIDE_PX = 1024
XRAY_COLOURS = {"masked": (255, 64, 64), "dilated": (255, 200, 0)}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)} but is {value!r}.")


def _check_range(name: str, value, low: int, high: int, unit: str = "px") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"`{name}` must be a whole number of {unit} from {low} to {high} but is {value!r}.")


def _full_cells(mask: np.ndarray, factor: int) -> np.ndarray:
    """Latent cells that `mask` (> 0) covers completely (a min-pool)."""
    binary = torch.from_numpy((mask > 0).astype(np.float32))[None, None]
    return -F.max_pool2d(-binary, factor)[0, 0].numpy()


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked part painted with ever finer blurs of the unmasked colours around it."""
    keep = ImageOps.invert(mask.convert("L"))
    visible = Image.new("RGBa", image.size)
    visible.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    filled = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = visible.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(blurred)
    return Image.composite(image.convert("RGB"), filled.convert("RGB"), keep)


def _latent_pool(mask: np.ndarray, factor: int) -> np.ndarray:
    """Max over each factor × factor cell: the latent grid's mask, from a (H, W) map in [0, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.max_pool2d(tensor, factor)[0, 0].numpy()


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
        _check_range("mask_blur", self.mask_blur, 0, MAX_MASK_BLUR)
        _check_range("only_masked_padding", self.only_masked_padding, 0, MAX_PADDING)
        _check_choice("mask_mode", self.mask_mode, MASK_MODES)
        _check_choice("masked_content", self.masked_content, MASKED_CONTENT)
        _check_choice("inpaint_area", self.inpaint_area, INPAINT_AREAS)
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"`strength` must be between 0 and 1 but is {self.strength}.")
        if not isinstance(self.soft_inpainting, bool):
            raise ValueError(f"`soft_inpainting` must be True or False but is {self.soft_inpainting!r}.")
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
        return notes

    def unchanged_image(self) -> Image.Image | None:
        return self.init_image.convert("RGB") if self.strength == 0.0 else None

    def check_steps(self) -> None:
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"`strength` {self.strength} × {self.steps} steps leaves no denoising step; raise the "
                             "steps or the strength.")

    def as_inpainting(self) -> "InpaintRequest":
        return self

    def composite(self, image: Image.Image) -> Image.Image:
        """The generated region pasted back into the original through `paste_alpha`."""
        original = np.asarray(self.init_image.convert("RGB"))
        left, top, right, bottom = self.box()
        generated = original.copy()
        generated[top:bottom, left:right] = np.asarray(
            image.convert("RGB").resize((right - left, bottom - top), Image.Resampling.LANCZOS))
        alpha = self.paste_alpha()[..., None]
        blended = np.round(original * (1.0 - alpha) + generated * alpha).astype(np.uint8)
        return Image.fromarray(np.where(alpha > 0, blended, original))


@dataclass(kw_only=True)
class OutpaintRequest(SamplingSettings):
    """Extend `init_image` by `left`, `right`, `top` and `bottom` px: the new area is pre-filled, then
    inpainted together with an `overlap` band of the original, whose region comes back unchanged."""

    task: ClassVar[str] = "outpaint"
    prompt: str = ""
    init_image: Image.Image = field(repr=False)
    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    prefill: str = "blur"                 # edge: the border pixels stretched out; blur: blurred surroundings
    overlap: int = 8                      # px of the original, along each extended side, that are repainted too
    mask_blur: int = 8
    inpaint_area: str = "Only masked"     # the new area's box at the processing size: a small model extends
    only_masked_padding: int = 32         # a large image one side at a time
    strength: float = 0.9
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.init_image, Image.Image):
            raise ValueError("Outpainting needs an input image as `init_image`.")
        for side in ("left", "right", "top", "bottom"):
            _check_range(side, getattr(self, side), 0, MAX_EXTEND)
        if not (self.left or self.right or self.top or self.bottom):
            raise ValueError("Outpainting needs at least one side to extend: `left`, `right`, `top` and `bottom` "
                             "are all 0.")
        _check_range("overlap", self.overlap, 0, min(self.init_image.size))
        _check_choice("prefill", self.prefill, PREFILLS)
        _check_range("mask_blur", self.mask_blur, 0, MAX_MASK_BLUR)
        _check_range("only_masked_padding", self.only_masked_padding, 0, MAX_PADDING)
        _check_choice("inpaint_area", self.inpaint_area, INPAINT_AREAS)
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"`strength` must be between 0 and 1 but is {self.strength}.")
        width, height = self.init_image.size
        canvas_width, canvas_height = width + self.left + self.right, height + self.top + self.bottom
        if canvas_width * canvas_height > MAX_INPUT_PIXELS:
            raise ValueError(f"The extended canvas would be {canvas_width}×{canvas_height}; at most "
                             f"{MAX_INPUT_PIXELS / 1e6:g} megapixels are taken. Extend less, or scale the image down.")

    def canvas(self) -> tuple[Image.Image, Image.Image]:
        """The extended canvas with its new area pre-filled, and the mask (new area + overlap band)."""
        image = np.asarray(self.init_image.convert("RGB"))
        height, width = image.shape[:2]
        pad = ((self.top, self.bottom), (self.left, self.right), (0, 0))
        stretched = np.pad(image, pad, mode="edge")
        mask = np.full(stretched.shape[:2], 255, dtype=np.uint8)
        inner = (slice(self.top + (self.overlap if self.top else 0), self.top + height - (self.overlap if self.bottom else 0)),
                 slice(self.left + (self.overlap if self.left else 0), self.left + width - (self.overlap if self.right else 0)))
        mask[inner] = 0
        new_area = np.full(stretched.shape[:2], 255, dtype=np.uint8)
        new_area[self.top:self.top + height, self.left:self.left + width] = 0
        canvas = Image.fromarray(stretched)
        if self.prefill == "blur":
            canvas = fill_masked(canvas, Image.fromarray(new_area))
        return canvas, Image.fromarray(mask)

    def as_inpainting(self) -> InpaintRequest:
        """The inpainting request that does the work."""
        def compute():
            canvas, mask = self.canvas()
            shared = {item.name: getattr(self, item.name) for item in fields(SamplingSettings)}
            return InpaintRequest(**shared, init_image=canvas, mask=mask, mask_blur=self.mask_blur,
                                  masked_content="original", inpaint_area=self.inpaint_area,
                                  only_masked_padding=self.only_masked_padding, strength=self.strength)
        if "inpainting" not in self._derived:    # built when first needed: `replace` makes fresh requests
            self._derived["inpainting"] = compute()
        return self._derived["inpainting"]

    def notes(self) -> list[str]:
        width, height = self.init_image.size
        return [f"Extended {width}×{height} to {width + self.left + self.right}×{height + self.top + self.bottom}; "
                "the original region is kept as it was."]

    def check_steps(self) -> None:
        self.as_inpainting().check_steps()

    def composite(self, image: Image.Image) -> Image.Image:
        """The inpainted canvas with the original pasted back over its region, bit for bit. The overlap band
        was repainted so that the new area continues the picture; the seam at the original's edge is then
        feathered on the new side: over `mask_blur` px the new area fades from the pre-fill (which continues
        the original's edge) to what was generated."""
        inpainting = self.as_inpainting()
        generated = np.asarray(inpainting.composite(image), dtype=np.float32)
        prefilled = np.asarray(inpainting.init_image, dtype=np.float32)
        original_area = np.zeros(generated.shape[:2], dtype=bool)
        width, height = self.init_image.size
        original_area[self.top:self.top + height, self.left:self.left + width] = True
        distance = ndimage.distance_transform_edt(~original_area)       # px from the original region
        weight = np.clip(distance / max(self.mask_blur, 1), 0.0, 1.0)[..., None]
        result = np.round(prefilled * (1 - weight) + generated * weight).astype(np.uint8)
        result[self.top:self.top + height, self.left:self.left + width] = np.asarray(self.init_image.convert("RGB"))
        return Image.fromarray(result)


def _mask_values(mask: Image.Image) -> Image.Image:
    """An uploaded mask as grey: its alpha where it has one that is used (painted strokes), else its luminance."""
    if mask.mode in ("RGBA", "LA") and mask.getchannel("A").getextrema()[0] < 255:
        return mask.getchannel("A")
    return mask.convert("L")


def crop_box(mask: np.ndarray, *, padding: int, aspect: float, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A1111's "only masked" box: the mask's bounding box plus `padding`, grown to `aspect` (width / height)
    around its centre and kept inside the image."""
    rows, columns = np.nonzero(mask)
    width, height = image_size
    left, right = max(int(columns.min()) - padding, 0), min(int(columns.max()) + 1 + padding, width)
    top, bottom = max(int(rows.min()) - padding, 0), min(int(rows.max()) + 1 + padding, height)
    box_width, box_height = right - left, bottom - top
    if box_width / box_height < aspect:
        box_width = min(width, math.ceil(box_height * aspect))
    else:
        box_height = min(height, math.ceil(box_width / aspect))
    centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(round(centre_x - box_width / 2), 0), width - box_width))
    top = int(min(max(round(centre_y - box_height / 2), 0), height - box_height))
    return left, top, left + box_width, top + box_height


def mask_xray(request: InpaintRequest, vae_scale_factor: int) -> tuple[Image.Image, str]:
    """The mask the UNet sees: the region at the processing size, enlarged, with each latent cell that
    is repainted tinted (red: the mask fills it; amber: only touched, dilated by the pooling) and the grid."""
    region = request.region(vae_scale_factor)
    width, height = region.image.size
    scale = max(1, min(4, MAX_XRAY_SIDE_PX // max(width, height)))
    picture = region.image.resize((width * scale, height * scale), Image.Resampling.NEAREST).convert("RGBA")
    overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    cell = vae_scale_factor * scale
    full = _full_cells(region.mask, vae_scale_factor)
    for row, column in zip(*np.nonzero(region.latent_mask > 0)):
        colour = XRAY_COLOURS["masked" if full[row, column] > 0 else "dilated"]
        strength = int(80 + 100 * float(region.latent_mask[row, column]))
        draw.rectangle([column * cell, row * cell, (column + 1) * cell - 1, (row + 1) * cell - 1],
                       fill=(*colour, strength))
    for x in range(0, picture.width, cell):
        draw.line([(x, 0), (x, picture.height)], fill=(255, 255, 255, 60))
    for y in range(0, picture.height, cell):
        draw.line([(0, y), (picture.width, y)], fill=(255, 255, 255, 60))
    shown = Image.alpha_composite(picture, overlay).convert("RGB")
    latent_height, latent_width = region.latent_mask.shape
    cells = int((region.latent_mask > 0).sum())
    left, top, right, bottom = region.box
    text = (f"The UNet works on a {latent_width}×{latent_height} latent grid (one cell = {vae_scale_factor}×"
            f"{vae_scale_factor} px of the {width}×{height} region taken from ({left}, {top})–({right}, {bottom})). "
            f"{cells} cell(s) are repainted; {region.cells_dilated} of them only because the mask touches them "
            f"(dilated, amber), so that no stroke is lost. Outside the repainted cells the latents are the "
            f"image's at every step; the pixels are pasted back through the mask blurred by "
            f"{request.mask_blur} px.")
    return shown, text


# ----------------------------------------------------------------------------- the loop


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def _strength_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The schedule's last `strength` share, as diffusers' img2img and inpainting pipelines take it."""
    start = steps - min(int(steps * strength), steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order:]


def run_inpaint(call, batch_index: int, *, generators=None, latents=None, callback=None, expose=()) -> torch.Tensor:
    """The inpainting task's loop for one batch (the `Task.run` of pipelines/tasks.py); latents out."""
    request, pipeline = call.request.as_inpainting(), call.pipeline
    unet, vae, scheduler = pipeline.unet, pipeline.vae, pipeline.scheduler
    if unet.config.addition_embed_type is not None:
        raise ValueError(f"Inpainting here takes SD 1.x/2.x-style models; {call.model.name} adds "
                         f"`{unet.config.addition_embed_type}` embeddings to its UNet (SDXL and kin), which this loop "
                         "does not give it yet.")
    device, dtype, batch = call.device, unet.dtype, request.batch_size
    generators = generators or call.generators(batch_index)

    # 1. The region and its latents
    region = request.region(pipeline.vae_scale_factor)
    image = _to_tensor(region.image).to(device, dtype)
    image_latents = denoise.encode(vae, image).to(dtype).repeat(batch, 1, 1, 1)
    # 2. The latent mask (max-pooled: a thin stroke keeps its cell)
    latent_mask = torch.from_numpy(region.latent_mask)[None, None].to(device, dtype)

    # 3. Timesteps for the strength, and the starting latents from the masked content
    scheduler.set_timesteps(request.steps, device=device)
    timesteps = _strength_timesteps(scheduler, request.steps, request.strength)
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
        masked_image_latents = denoise.encode(vae, image * (pixel_mask < 0.5)).to(dtype)
        extra = torch.cat([(latent_mask > 0).to(dtype), masked_image_latents], dim=1).repeat(batch, 1, 1, 1)
    denoiser = denoise.Denoiser(call, generators=generators)
    pipeline._num_timesteps, pipeline._interrupt = len(timesteps), False
    for index, t in enumerate(timesteps):
        latents = denoiser.step(latents, t, extra_channels=extra).latents
        if extra is None or request.soft_inpainting:   # a 9-channel UNet needs no re-anchoring, but soft does
            last = index == len(timesteps) - 1
            known = image_latents if last else scheduler.add_noise(image_latents, noise, timesteps[index + 1:index + 2])
            keep = latent_mask
            if request.soft_inpainting:  # differential diffusion: a pixel joins once the noise falls to its value
                keep = (latent_mask > 1.0 - (index + 1) / len(timesteps)).to(dtype)
            latents = (1 - keep) * known + keep * latents
        if callback is not None:
            latents = callback(pipeline, index, t, {"latents": latents}).get("latents", latents)
        if pipeline._interrupt:
            break
    return latents


def _inpainting_pipeline(base):
    """The base's inpainting pipeline (shared weights): its components, for the task's own loop."""
    from diffusers import AutoPipelineForInpainting
    return AutoPipelineForInpainting.from_pipe(base)


INPAINT_INFOTEXT = (InfotextField("Denoising strength", "strength", float), InfotextField("Mask blur", "mask_blur", int),
                    InfotextField("Mask mode", "mask_mode", str), InfotextField("Masked content", "masked_content", str),
                    InfotextField("Inpaint area", "inpaint_area", str),
                    InfotextField("Masked area padding", "only_masked_padding", int),
                    InfotextField("Soft inpainting enabled", "soft_inpainting", bool))

register(Task("inpaint", "Inpainting", InpaintRequest, _inpainting_pipeline, INPAINT_INFOTEXT, run=run_inpaint))
register(Task("outpaint", "Outpainting", OutpaintRequest, _inpainting_pipeline,
              (InfotextField("Denoising strength", "strength", float), InfotextField("Mask blur", "mask_blur", int),
               *(InfotextField(f"Outpaint {side}", side, int) for side in ("left", "right", "top", "bottom")),
               InfotextField("Outpaint prefill", "prefill", str), InfotextField("Outpaint overlap", "overlap", int)),
              run=run_inpaint))
