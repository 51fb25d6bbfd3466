"""Pictures in and out: the one image -> tensor and tensor -> image conversion, the one fit to a size,
and the one decoding of an image sent as base64 text (capped before its pixels are allocated)."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from pipelines.core.checks import MAX_INPUT_PIXELS


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` as RGB at width×height: cropped to that aspect ratio around its centre, then resized
    (A1111's "crop and resize"), so a different aspect ratio is never stretched."""
    image = image.convert("RGB")
    source_width, source_height = image.size
    if source_width * height != source_height * width:
        if source_width * height > source_height * width:   # wider than wanted: trim the sides
            crop_width = round(source_height * width / height)
            left = (source_width - crop_width) // 2
            image = image.crop((left, 0, left + crop_width, source_height))
        else:                                                 # taller than wanted: trim top and bottom
            crop_height = round(source_width * height / width)
            top = (source_height - crop_height) // 2
            image = image.crop((0, top, source_width, top + crop_height))
    return image.resize((width, height), Image.Resampling.LANCZOS)

def to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]

def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An image as a (1, 3, H, W) tensor in [-1, 1], the range the VAE encodes."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def open_capped(data: bytes, name: str, *, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """The image in `data`, decoded only once its header says it has at most `max_pixels` pixels (a small
    file can declare a huge image: a decompression bomb)."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:    # PIL refuses past 2 × MAX_IMAGE_PIXELS before it tells the size
        raise ValueError(f"`{name}` declares more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; at most "
                         f"{max_pixels / 1e6:g} megapixels are taken. Scale it down first.") from None
    except Exception as error:
        raise ValueError(f"`{name}` could not be read as an image ({type(error).__name__}): send a PNG, JPEG or "
                         "WebP file.") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"`{name}` is {width}×{height} ({width * height / 1e6:.1f} megapixels); at most "
                         f"{max_pixels / 1e6:g} megapixels are taken. Scale it down first.")
    try:
        image.load()
    except Exception as error:
        raise ValueError(f"`{name}` could not be read as an image ({type(error).__name__}): it may be truncated or "
                         "damaged; send the PNG or JPEG again.") from None
    return image


def decode_image(value, name: str = "image", *, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """An image given as a PIL image or as base64 text (optionally a data URL, as A1111's API sends), decoded
    only when its header declares at most `max_pixels` pixels. Never a path: a request does not get to read
    files on the server."""
    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{name}` must be an image (a file, or base64 text) but is {type(value).__name__}.")
    try:
        data = base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
    except Exception as error:
        raise ValueError(f"`{name}` could not be read as an image ({type(error).__name__}): it is not base64 text; "
                         "send a PNG or JPEG as base64 text.") from None
    return open_capped(data, name, max_pixels=max_pixels)
