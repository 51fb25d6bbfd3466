"""The task registry (pipelines/core/registry.py, pipelines/tasks/): requests validate themselves, and a new
task is one request class and one registry entry, with nothing else to change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from pipelines.core.images import fit_image
from pipelines.core.registry import InfotextField, Task, register
from pipelines.io.metadata import infotext_to_settings, parse_infotext, read_png_metadata
from pipelines.tasks import TASKS, task_of
from pipelines.tasks.img2img import Img2ImgRequest
from pipelines.tasks.txt2img import Txt2ImgRequest


def test_each_request_names_its_task_and_records_itself_as_json():
    image = Image.new("RGB", (80, 40))
    request = Img2ImgRequest(prompt="red apple", init_image=image, strength=0.4, seed=3)
    assert task_of(request) is TASKS["img2img"] and task_of(Txt2ImgRequest(prompt="x")) is TASKS["txt2img"]
    recorded = request.to_json()
    assert recorded["task"] == "img2img" and recorded["init_image_size"] == [80, 40]
    assert recorded["strength"] == 0.4 and "init_image" not in recorded
    assert request.resolved() is request and Txt2ImgRequest(prompt="x").resolved().seed >= 0


@pytest.mark.parametrize("values,message", [
    ({"prompt": None}, "`prompt` must be text but is NoneType"),
    ({"steps": 2.5}, "`steps` must be a whole number from 1 to 200 but is 2.5"),
    ({"width": True}, "`width` must be a whole number"),
    ({"seed": 2 ** 63}, "`seed` must be -1 \\(random\\) or a whole number from 0 to 2\\*\\*63-1 "
                        "\\(9223372036854775807\\) but is 9223372036854775808"),
    ({"seed": -2}, "`seed` must be -1 \\(random\\) or a whole number from 0 to 2\\*\\*63-1 .* but is -2"),
    ({"seed": 2 ** 63 - 2, "batch_size": 4}, "`seed` 9223372036854775806 leaves no room for 4 images"),
    ({"preview_mode": "fast"}, "`preview_mode` must be one of 'auto', 'linear', 'full' but is 'fast'"),
])
def test_bad_values_name_the_field_the_value_and_what_is_allowed(values, message):
    with pytest.raises(ValueError, match=message):
        Txt2ImgRequest(**({"prompt": "x"} | values))


def test_seeds_past_2_to_the_32_are_accepted_and_a_batch_counts_on_from_them():
    request = Txt2ImgRequest(prompt="x", seed=2 ** 32 - 1, batch_size=2, batch_count=2)
    assert [request.seed_for(b, i) for b in range(2) for i in range(2)] == [2 ** 32 - 1, 2 ** 32, 2 ** 32 + 1,
                                                                            2 ** 32 + 2]
    largest = Txt2ImgRequest(prompt="x", seed=2 ** 63 - 1)
    assert largest.seed_for(0, 0) == 2 ** 63 - 1
    assert 0 <= Txt2ImgRequest(prompt="x").resolved().seed < 2 ** 32   # drawn seeds stay where A1111 draws them


def test_fit_image_crops_to_the_requested_shape_around_the_centre():
    tall = np.zeros((120, 40, 3), dtype=np.uint8)
    tall[40:80] = 255                                   # the middle third is white
    fitted = np.asarray(fit_image(Image.fromarray(tall), 32, 32))
    assert fitted.shape == (32, 32, 3) and fitted.min() >= 250
    same_shape = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(fit_image(same_shape, 32, 64)), np.asarray(same_shape))


@dataclass(kw_only=True)
class GreyscaleRequest(Img2ImgRequest):
    """A made-up task for this test: image-to-image from a greyscale copy of the input."""
    task: ClassVar[str] = "greyscale"
    keep_colour: float = 0.0

    def pipeline_arguments(self) -> dict:
        grey = self.fitted_image().convert("L").convert("RGB")
        return {"image": Image.blend(grey, self.fitted_image(), self.keep_colour), "strength": self.strength}


def test_a_new_task_is_a_request_class_and_a_registry_entry(studio):
    img2img = TASKS["img2img"]
    register(Task("greyscale", "Greyscale to colour", GreyscaleRequest, img2img.derive,
                  img2img.infotext_fields + (InfotextField("Keep colour", "keep_colour", float),)))
    try:
        source = Image.fromarray(np.tile(np.array([200, 30, 30], dtype=np.uint8), (64, 64, 1)))
        request = GreyscaleRequest(prompt="red apple", init_image=source, strength=0.5, keep_colour=0.25,
                                   steps=4, seed=9)
        done = studio.generate(request)
        assert studio.models.pipeline("greyscale").unet is studio.models.current.pipeline.unet  # shared weights
        _, _, parameters = parse_infotext(done.images[0].infotext)
        assert infotext_to_settings(parameters)["keep_colour"] == 0.25
        _, extra = read_png_metadata(done.images[0].path)
        assert extra["request"]["task"] == "greyscale" and extra["request"]["keep_colour"] == 0.25
        plain = studio.generate(Img2ImgRequest(prompt="red apple", init_image=source, strength=0.5, steps=4, seed=9))
        assert not np.array_equal(np.asarray(done.images[0].image), np.asarray(plain.images[0].image))
    finally:
        del TASKS["greyscale"]


def test_a_registry_entry_must_match_its_request_class():
    with pytest.raises(ValueError, match="names request class Txt2ImgRequest, whose task is 'txt2img'"):
        register(Task("other", "Other", Txt2ImgRequest, lambda base: base))


def _strength_like_requests():
    """Every request field that takes a share or a scale, with the other fields a valid request needs."""
    from pipelines.tasks.controlnet import ControlNetRequest
    from pipelines.tasks.inpaint import InpaintRequest
    from pipelines.tasks.outpaint import OutpaintRequest

    image, mask = Image.new("RGB", (32, 32), "red"), Image.new("L", (32, 32), 255)
    yield "img2img strength", lambda value: Img2ImgRequest(prompt="x", init_image=image, strength=value), "strength"
    yield "inpaint strength", lambda value: InpaintRequest(init_image=image, mask=mask, strength=value), "strength"
    yield "outpaint strength", lambda value: OutpaintRequest(init_image=image, left=8, strength=value), "strength"
    yield "controlnet strength", lambda value: ControlNetRequest(prompt="x", control_image=image, init_image=image,
                                                                 strength=value), "strength"
    for name in ("weight", "start", "end"):
        yield f"controlnet unit {name}", lambda value, name=name: ControlNetRequest(
            prompt="x", control_image=image, **{name: value}), name
        yield f"controlnet more_units {name}", lambda value, name=name: ControlNetRequest(
            prompt="x", control_image=image, more_units=[{"image": image, name: value}]), name


@pytest.mark.parametrize("value", ["0.5", True, float("nan"), None])
@pytest.mark.parametrize("case", list(_strength_like_requests()), ids=lambda case: case[0])
def test_strength_like_numbers_are_checked_against_the_one_table_of_ranges(case, value):
    """Bug 12: a string for a strength gave a TypeError (a 500 in the APIs) and `weight=True` passed as 1. Each is
    refused with the field's name and the range from NUMBER_RANGES, as every other number is."""
    from pipelines.core.checks import NUMBER_RANGES

    _, build, field_name = case
    low, high = NUMBER_RANGES[field_name]
    with pytest.raises(ValueError, match=rf"`{field_name}` must be a number from {low:g} to {high:g} but is "):
        build(value)


@pytest.mark.parametrize("tag", ["<lora:style:5>", "<lora:style:-4.5>"])
def test_a_lora_tag_s_weight_is_checked_against_the_one_table_of_ranges(tag):
    """Bug 12 (the prompt's strength-like number): a LoRA tag's weight has its range in NUMBER_RANGES too."""
    from pipelines.core.checks import NUMBER_RANGES
    from pipelines.core.prompts import split_lora_tags

    low, high = NUMBER_RANGES["lora_weight"]
    with pytest.raises(ValueError, match=rf"`<lora:style:…>`'s weight must be a number from {low:g} to {high:g}"):
        split_lora_tags(f"red apple {tag}")
    assert split_lora_tags(f"red apple <lora:style:{high:g}>")[1][0].weight == high
