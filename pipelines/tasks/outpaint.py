"""Outpainting: extend the canvas, inpaint the new area, put the original region back bit for bit.

How a request becomes an image; each step is there for what recipe/outpaint_eval.py measures (issue 25, item 9:
"a visible seam and a blurry half-object in the new strip"):

1. The canvas: the image with the new area pre-filled (`prefill`: its edge pixels stretched out, or its blurred
   surroundings).
2. A soft mask (differential diffusion, pipelines/tasks/inpaint.py step 4): 1 farther than `mask_blur` px from the
   original, falling to 0 at its edge (or `overlap` px inside it). The new pixels next to the original join the
   denoising late, from the pre-fill, so they continue the original; the rest start from noise at `strength` (1,
   the default: fresh noise). With a hard mask a 4-channel UNet, which sees the original only through its
   re-imposed latents, now and then starts something new right at the seam.
3. The box ("Only masked") is generated in its own shape, at the scale Width × Height gives it, not stretched to
   Width × Height's shape (`box_processing_size`): a 64×64 picture extended by 64 px has a 96×64 box, and
   stretched to 64×64 and back the new strip came back coarser across than along.
4. The composite: the generated pixels as they came (no blend with the blurred pre-fill, which left a blurred band
   along the seam), the original pasted back, and over `mask_blur` px of the new area a smooth correction that
   meets the original's edge (`seam_correction`). Without it the generated strip does not meet the original that is
   pasted back: what was decoded at the original's edge is not the original (the VAE's round trip shifts colours,
   and the decoder mixes in the new area next to it); on the embedded model they differ there by 18 levels on
   average, and the step across the seam is 4.7 times the steps beside it instead of 1.1 to 1.7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np
from PIL import Image
from scipy import ndimage, sparse
from scipy.sparse.linalg import splu

from pipelines.core.checks import MAX_INPUT_PIXELS, MAX_SIDE, NUMBER_RANGES, check_choice, check_number, check_whole
from pipelines.core.registry import InfotextField, Task, register
from pipelines.core.requests import SamplingSettings
from pipelines.tasks.inpaint import (INPAINT_AREAS, MAX_MASK_BLUR, MAX_PADDING, InpaintRequest, _inpainting_pipeline,
                                     run_inpaint)
from pipelines.tasks.masks import fill_masked

PREFILLS = ("edge", "blur")


MAX_EXTEND = 1024


@dataclass(kw_only=True)
class OutpaintRequest(SamplingSettings):
    """Extend `init_image` by `left`, `right`, `top` and `bottom` px: the new area is inpainted, joining the
    denoising gradually over `mask_blur` px next to the original, whose region comes back unchanged."""

    task: ClassVar[str] = "outpaint"
    prompt: str = ""
    init_image: Image.Image = field(repr=False)
    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    prefill: str = "blur"                 # what the new area starts from next to the original: edge: the border pixels
                                          # stretched out; blur: blurred surroundings
    overlap: int = 0                      # px of the original, along each extended side, where the soft mask starts
                                          # (they are repainted a little, then put back)
    mask_blur: int = 16                   # the feather: px of the new area over which it joins the denoising and its
                                          # colours are corrected to meet the original
    inpaint_area: str = "Only masked"     # the new area's box, in its own shape: a small model extends a large image
    only_masked_padding: int = 32         # at its own scale
    strength: float = 1.0                 # 1: the new area starts from fresh noise
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # what the generated box's sides are multiples of: the VAE's cell, or a transformer's patch of cells (set by
    # the transformer families' preparation, pipelines/core/transformer_call.py)
    size_multiple: int = field(default=8, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.init_image, Image.Image):
            raise ValueError("Outpainting needs an input image as `init_image`.")
        for side in ("left", "right", "top", "bottom"):
            check_whole(side, getattr(self, side), 0, MAX_EXTEND, unit="px")
        if not (self.left or self.right or self.top or self.bottom):
            raise ValueError("Outpainting needs at least one side to extend: `left`, `right`, `top` and `bottom` "
                             "are all 0.")
        check_whole("overlap", self.overlap, 0, min(self.init_image.size), unit="px")
        check_choice("prefill", self.prefill, PREFILLS)
        check_whole("mask_blur", self.mask_blur, 0, MAX_MASK_BLUR, unit="px")
        check_whole("only_masked_padding", self.only_masked_padding, 0, MAX_PADDING, unit="px")
        check_choice("inpaint_area", self.inpaint_area, INPAINT_AREAS)
        check_number("strength", self.strength, *NUMBER_RANGES["strength"])
        width, height = self.init_image.size
        canvas_width, canvas_height = width + self.left + self.right, height + self.top + self.bottom
        if canvas_width * canvas_height > MAX_INPUT_PIXELS:
            raise ValueError(f"The extended canvas would be {canvas_width}×{canvas_height}; at most "
                             f"{MAX_INPUT_PIXELS / 1e6:g} megapixels are taken. Extend less, or scale the image down.")

    def original_area(self) -> np.ndarray:
        """(H, W) over the canvas: True where the original image lies."""
        width, height = self.init_image.size
        area = np.zeros((height + self.top + self.bottom, width + self.left + self.right), dtype=bool)
        area[self.top:self.top + height, self.left:self.left + width] = True
        return area

    def canvas(self) -> tuple[Image.Image, Image.Image]:
        """The extended canvas with its new area pre-filled, and the soft mask (white = repaint): 0 in the original
        up to `overlap` px from its edge, rising to 1 at `mask_blur` px into the new area, every new pixel above 0."""
        image = np.asarray(self.init_image.convert("RGB"))
        pad = ((self.top, self.bottom), (self.left, self.right), (0, 0))
        canvas = Image.fromarray(np.pad(image, pad, mode="edge"))
        original = self.original_area()
        if self.prefill == "blur":
            canvas = fill_masked(canvas, Image.fromarray(np.where(original, 0, 255).astype(np.uint8)))
        # px from the original's edge, pixel centre to edge: > 0 in the new area, < 0 in the original
        signed = np.where(original, 0.5 - ndimage.distance_transform_edt(original),
                          ndimage.distance_transform_edt(~original) - 0.5)
        ramp = self.overlap + self.mask_blur
        mask = np.clip((signed + self.overlap) / ramp, 0.0, 1.0) if ramp else (signed > 0).astype(np.float64)
        mask = np.where(original, mask, np.maximum(mask, 1 / 255))
        return canvas, Image.fromarray(np.round(mask * 255).astype(np.uint8))

    def as_inpainting(self) -> InpaintRequest:
        """The inpainting request that does the work: the canvas and its soft mask, the box in its own shape."""
        def compute():
            canvas, mask = self.canvas()
            shared = {item.name: getattr(self, item.name) for item in fields(SamplingSettings)}

            def inpainting(width: int, height: int) -> InpaintRequest:
                return InpaintRequest(**(shared | {"width": width, "height": height}), init_image=canvas, mask=mask,
                                      mask_blur=0, masked_content="original", inpaint_area=self.inpaint_area,
                                      only_masked_padding=self.only_masked_padding, strength=self.strength,
                                      soft_inpainting=bool(self.overlap + self.mask_blur))
            asked = inpainting(self.width, self.height)
            size = box_processing_size(asked.box(), self.width, self.height, self.size_multiple)
            return asked if size == (self.width, self.height) else inpainting(*size)
        if "inpainting" not in self._derived:    # built when first needed: `replace` makes fresh requests
            self._derived["inpainting"] = compute()
        return self._derived["inpainting"]

    def notes(self) -> list[str]:
        width, height = self.init_image.size
        inpainting = self.as_inpainting()
        notes = [(f"Extended {width}×{height} to {width + self.left + self.right}×{height + self.top + self.bottom}; "
                  "the original region is kept as it was.")]
        if (inpainting.width, inpainting.height) != (self.width, self.height):
            left, top, right, bottom = inpainting.box()
            notes.append(f"The {right - left}×{bottom - top} box that is generated cannot take the shape of Width × "
                         f"Height ({self.width}×{self.height}) inside the canvas, so it was generated in its own "
                         f"shape, at {inpainting.width}×{inpainting.height}, rather than stretched to it and back.")
        coarse = inpainting.coarseness_note()
        return notes + ([coarse] if coarse else [])

    def check_steps(self) -> None:
        self.as_inpainting().check_steps()

    def composite(self, image: Image.Image) -> Image.Image:
        """The generated box as it came, the original pasted back over its region bit for bit, and the new area
        corrected over `mask_blur` px to meet the original's edge (`seam_correction`)."""
        generated = self.as_inpainting().generated_canvas(image).astype(np.float64)
        original_area = self.original_area()
        original = np.asarray(self.init_image.convert("RGB"))
        if self.mask_blur:
            mismatch = np.zeros_like(generated)
            mismatch[original_area] = original.reshape(-1, 3) - generated[original_area]
            generated += seam_correction(mismatch, original_area, self.mask_blur)
        result = np.clip(np.round(generated), 0, 255).astype(np.uint8)
        result[original_area] = original.reshape(-1, 3)
        return Image.fromarray(result)


def box_processing_size(box: tuple[int, int, int, int], width: int, height: int,
                        multiple: int = 8) -> tuple[int, int]:
    """The size to generate `box` at: Width × Height where the box has its shape; otherwise the box's own shape
    (the canvas kept it from growing to Width × Height's) at the scale Width × Height gives the side that could not
    grow, with at most 4× Width × Height's pixels and no side over MAX_SIDE (the largest Width or Height a request
    takes), in multiples of `multiple` px (the VAE's cell; a transformer's patch of cells: size_multiple)."""
    box_width, box_height = box[2] - box[0], box[3] - box[1]
    if abs(box_width / box_height / (width / height) - 1) <= 0.02:
        return width, height
    scale = min(max(width / box_width, height / box_height), math.sqrt(4 * width * height / (box_width * box_height)),
                MAX_SIDE / box_width, MAX_SIDE / box_height)
    return (max(multiple, round(box_width * scale / multiple) * multiple),
            max(multiple, round(box_height * scale / multiple) * multiple))


def seam_correction(mismatch: np.ndarray, original_area: np.ndarray, band_px: int) -> np.ndarray:
    """What to add to the new area so that it meets the original: a membrane c (Poisson image editing, Pérez et al.
    2003, with the generated pixels' own gradients as the guidance) over the new pixels within `band_px` px of the
    original: Laplace(c) = 0 there, c = `mismatch` (original − generated, (H, W, 3)) on the original's pixels next to
    them, c = 0 on the new pixels beyond, no flux across the canvas border. A harmonic c adds no Laplacian, so the
    generated detail stays as sharp as it came; the 5-point system is solved once for the three channels."""
    height, width = original_area.shape
    band = ~original_area & (ndimage.distance_transform_edt(~original_area) <= band_px)
    count = int(band.sum())
    index = np.full(band.shape, -1)
    index[band] = np.arange(count)
    rows, columns = np.nonzero(band)
    diagonal, right_hand, pairs = np.zeros(count), np.zeros((count, 3)), []
    for step_y, step_x in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        y, x = rows + step_y, columns + step_x
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)        # no flux across the canvas border
        me, y, x = index[rows[inside], columns[inside]], y[inside], x[inside]
        diagonal[me] += 1
        unknown, known = band[y, x], original_area[y, x]                   # new pixels beyond the band: c = 0
        pairs.append((me[unknown], index[y[unknown], x[unknown]]))
        np.add.at(right_hand, me[known], mismatch[y[known], x[known]])
    me, other = (np.concatenate(part) for part in zip(*pairs))
    laplacian = sparse.diags(diagonal) - sparse.csc_matrix((np.ones(len(me)), (me, other)), shape=(count, count))
    correction = np.zeros_like(mismatch)
    correction[band] = splu(sparse.csc_matrix(laplacian)).solve(right_hand)
    return correction


register(Task("outpaint", "Outpainting", OutpaintRequest, _inpainting_pipeline,
              (InfotextField("Denoising strength", "strength", float), InfotextField("Mask blur", "mask_blur", int),
               *(InfotextField(f"Outpaint {side}", side, int) for side in ("left", "right", "top", "bottom")),
               InfotextField("Outpaint prefill", "prefill", str), InfotextField("Outpaint overlap", "overlap", int),
               InfotextField("Inpaint area", "inpaint_area", str),
               InfotextField("Masked area padding", "only_masked_padding", int)),
              run=run_inpaint))
