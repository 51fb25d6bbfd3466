"""Masks for inpainting and outpainting: reading a painted or uploaded mask, A1111's "fill", the "only
masked" box, the mask on the latent grid (max-pooled, so no thin stroke is lost), and the mask X-ray that
shows the grid the UNet sees."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageOps

MAX_XRAY_SIDE_PX = 1024


XRAY_COLOURS = {"masked": (255, 64, 64), "dilated": (255, 200, 0)}


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


def mask_xray(request, vae_scale_factor: int) -> tuple[Image.Image, str]:
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
    coarse = request.coarseness_note()
    return shown, f"{text}\n\n{coarse}" if coarse else text
