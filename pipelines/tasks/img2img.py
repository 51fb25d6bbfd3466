"""Image-to-Image (SDEdit): the input image noised to `strength` of the schedule, then denoised towards the prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from PIL import Image

from pipelines.core.checks import NUMBER_RANGES, check_input_image, check_number
from pipelines.core.images import fit_image
from pipelines.core.registry import InfotextField, Task, register
from pipelines.core.requests import SamplingSettings
from pipelines.core.transformers import start_from_image
from pipelines.tasks.guided import run_text_or_image


@dataclass(kw_only=True)
class Img2ImgRequest(SamplingSettings):
    """Image-to-image: start from `init_image` noised to `strength` of the schedule (SDEdit)."""

    task: ClassVar[str] = "img2img"
    init_image: Image.Image = field(repr=False)
    strength: float = 0.75

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.init_image, Image.Image):
            raise ValueError("Image-to-Image needs an input image (`init_image`); upload one or send one from "
                             "Text-to-Image.")
        check_input_image("init_image", self.init_image)
        check_number("strength", self.strength, *NUMBER_RANGES["strength"])

    def fitted_image(self) -> Image.Image:
        return fit_image(self.init_image, self.width, self.height)

    def pipeline_arguments(self) -> dict:
        return {"image": self.fitted_image(), "strength": self.strength}

    def notes(self) -> list[str]:
        notes = ["Strength 0 keeps the input image unchanged."] if self.strength == 0.0 else []
        width, height = self.init_image.size
        if width * self.height != height * self.width:
            notes.append(f"The input image is {width}×{height}, another shape than {self.width}×{self.height}: it "
                         "was cropped around its centre to that shape, not stretched. Set the size to the input's "
                         "shape to keep all of it.")
        return notes

    def unchanged_image(self) -> Image.Image | None:
        return self.fitted_image() if self.strength == 0.0 else None

    def check_steps(self) -> None:
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"`strength` {self.strength} × {self.steps} steps leaves no denoising step; raise the "
                             "steps or the strength (or use strength 0 to keep the image).")


def _image_to_image(base):
    """The base's image-to-image pipeline (shared weights); for Flux 2, PixArt and Sana, which diffusers gives none
    (Flux 2's `image` is a reference to edit from, not a start), their text-to-image call started from the input
    image (pipelines/core/transformers.py)."""
    from diffusers import AutoPipelineForImage2Image
    if type(base).__name__.startswith(("PixArt", "Sana", "Flux2")):
        return start_from_image(base)
    return AutoPipelineForImage2Image.from_pipe(base)

register(Task("img2img", "Image-to-Image", Img2ImgRequest, _image_to_image,
              (InfotextField("Denoising strength", "strength", float),), run=run_text_or_image))
