"""Outpainting: extend the canvas, pre-fill the new area, inpaint it together with an overlap band of the
original, then put the original region back unchanged (the new area is feathered into it)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np
from PIL import Image
from scipy import ndimage

from pipelines.core.checks import MAX_INPUT_PIXELS, NUMBER_RANGES, check_choice, check_number, check_whole
from pipelines.core.registry import InfotextField, Task, register
from pipelines.core.requests import SamplingSettings
from pipelines.tasks.inpaint import (INPAINT_AREAS, MAX_MASK_BLUR, MAX_PADDING, InpaintRequest, _inpainting_pipeline,
                                     run_inpaint)
from pipelines.tasks.masks import fill_masked

PREFILLS = ("edge", "blur")


MAX_EXTEND = 1024


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
        coarse = self.as_inpainting().coarseness_note()
        return [f"Extended {width}×{height} to {width + self.left + self.right}×{height + self.top + self.bottom}; "
                "the original region is kept as it was.", *([coarse] if coarse else [])]

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

register(Task("outpaint", "Outpainting", OutpaintRequest, _inpainting_pipeline,
              (InfotextField("Denoising strength", "strength", float), InfotextField("Mask blur", "mask_blur", int),
               *(InfotextField(f"Outpaint {side}", side, int) for side in ("left", "right", "top", "bottom")),
               InfotextField("Outpaint prefill", "prefill", str), InfotextField("Outpaint overlap", "overlap", int)),
              run=run_inpaint))
