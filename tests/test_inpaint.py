"""Inpainting and outpainting (pipelines/tasks/inpaint.py, outpaint.py, masks.py) on the seeded tiny model and
the embedded one."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipelines.io.metadata import infotext_to_settings, parse_infotext
from pipelines.tasks.img2img import Img2ImgRequest
from pipelines.tasks.inpaint import InpaintRequest
from pipelines.tasks.masks import mask_xray
from pipelines.tasks.txt2img import Txt2ImgRequest


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth random colours, like a photo: a test image whose every pixel is known."""
    coarse = np.random.default_rng(seed).integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


def inpaint(studio, **overrides):
    values = dict(prompt="red apple", steps=6, seed=11, strength=1.0) | overrides
    return studio.generate(InpaintRequest(**values))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def beyond_blur(mask: Image.Image, blur: int) -> np.ndarray:
    """Pixels farther than `blur` from the mask: where the result must be the input, bit for bit."""
    return ndimage.distance_transform_edt(np.asarray(mask) == 0) > blur


@pytest.mark.parametrize("size", [(64, 64), (90, 70)])
def test_only_the_masked_part_changes_and_the_size_is_kept(studio, size):
    source = picture(*size)
    mask = box_mask(*size, (20, 16, 44, 40))
    done = inpaint(studio, init_image=source, mask=mask, mask_blur=4)
    result = done.images[0].image
    assert result.size == size
    far = beyond_blur(mask, 4)
    assert np.array_equal(pixels(result)[far], pixels(source)[far])
    inside = np.asarray(mask) > 0
    assert np.abs(pixels(result) - pixels(source))[inside].mean() > 5


def test_masked_content_modes_start_from_different_places(studio):
    source, mask = picture(64, 64, seed=1), box_mask(64, 64, (16, 16, 48, 48))
    results = {content: pixels(inpaint(studio, init_image=source, mask=mask, strength=0.6,
                                       masked_content=content).images[0].image)
               for content in ("original", "fill", "latent noise", "latent nothing")}
    inside = np.asarray(mask) > 0
    for first in results:
        for second in results:
            if first < second:
                assert np.abs(results[first] - results[second])[inside].mean() > 1, (first, second)


def test_a_two_pixel_stroke_still_repaints_its_latent_cell_on_the_embedded_model(embedded_generator):
    source = picture(64, 64, seed=2)
    mask = box_mask(64, 64, (30, 30, 32, 32))
    request = InpaintRequest(prompt="black cat", init_image=source, mask=mask, mask_blur=0, steps=8, seed=3,
                             strength=1.0)
    xray, text = mask_xray(request, 8)
    assert "1 cell(s) are repainted; 1 of them only because the mask touches them" in text
    result = pixels(embedded_generator.generate(request).images[0].image)
    assert np.abs(result - pixels(source))[30:32, 30:32].mean() > 10   # diffusers' nearest resize loses it
    outside = np.ones((64, 64), dtype=bool)
    outside[30:32, 30:32] = False
    assert np.array_equal(result[outside], pixels(source)[outside])


def test_only_masked_edits_a_large_image_at_the_model_s_size(studio):
    source, mask = picture(256, 256, seed=4), box_mask(256, 256, (150, 40, 170, 60))
    request = InpaintRequest(prompt="red apple", init_image=source, mask=mask, inpaint_area="Only masked",
                             only_masked_padding=16, mask_blur=4, width=64, height=64, steps=6, seed=5)
    left, top, right, bottom = request.box()
    assert (right - left) == (bottom - top) and left <= 130 and right >= 190   # square, padded, around the mask
    result = inpaint(studio, **{k: getattr(request, k) for k in ("init_image", "mask", "inpaint_area",
                                                                   "only_masked_padding", "mask_blur")})
    image = pixels(result.images[0].image)
    assert image.shape == (256, 256, 3)
    far = beyond_blur(mask, 4)
    assert np.array_equal(image[far], pixels(source)[far])
    assert np.abs(image - pixels(source))[40:60, 150:170].mean() > 5


def test_soft_inpainting_lets_a_grey_pixel_join_only_when_the_noise_falls_to_its_value(studio):
    """At the latent level, before any paste-back: with a uniform grey mask m, soft inpainting keeps the
    image's latents (noised to the current level) until the last m of the steps, so the result stays near
    the image, nearer for a darker grey; without it, any grey is a full repaint."""
    from pipelines.core.call import prepare
    from pipelines.core.images import image_to_tensor as _to_tensor
    from pipelines.core.vae import encode

    source = picture(64, 64, seed=6)

    def distance_to_source(grey: int, soft: bool) -> float:
        mask = Image.new("L", (64, 64), grey)
        request = InpaintRequest(prompt="red apple", init_image=source, mask=mask, soft_inpainting=soft, strength=1.0,
                                 mask_blur=0, steps=10, seed=13)

        def run():
            call = prepare(studio.models, request)
            latents = call(0)
            return float((latents - encode(call.pipeline.vae, _to_tensor(source))).abs().mean())
        return studio.models.worker.call(run)

    soft_dark, soft_light = distance_to_source(77, True), distance_to_source(230, True)
    hard_dark = distance_to_source(77, False)
    assert soft_dark < soft_light < hard_dark * 1.05
    assert soft_dark < hard_dark / 2


def test_inpaint_not_masked_keeps_what_was_painted(studio):
    source = picture(64, 64, seed=6)
    inverted = inpaint(studio, init_image=source, mask=box_mask(64, 64, (0, 0, 32, 64)), mask_blur=0,
                       mask_mode="Inpaint not masked")
    kept = pixels(inverted.images[0].image)
    assert np.array_equal(kept[:, :32], pixels(source)[:, :32])   # the painted half is what stays
    assert np.abs(kept[:, 40:] - pixels(source)[:, 40:]).mean() > 5


def test_the_infotext_carries_a1111_s_inpainting_keys_and_reads_back(studio):
    done = inpaint(studio, init_image=picture(64, 64), mask=box_mask(64, 64, (8, 8, 24, 24)), mask_blur=6,
                   masked_content="fill", inpaint_area="Only masked", only_masked_padding=12, strength=0.8,
                   soft_inpainting=True)
    _, _, parameters = parse_infotext(done.images[0].infotext)
    assert {key: parameters[key] for key in ("Mask blur", "Masked content", "Inpaint area", "Masked area padding",
                                            "Denoising strength", "Soft inpainting enabled")} == {
        "Mask blur": "6", "Masked content": "fill", "Inpaint area": "Only masked", "Masked area padding": "12",
        "Denoising strength": "0.8", "Soft inpainting enabled": "True"}
    settings = infotext_to_settings(parameters)
    assert (settings["mask_blur"], settings["masked_content"], settings["inpaint_area"],
            settings["only_masked_padding"], settings["soft_inpainting"]) == (6, "fill", "Only masked", 12, True)


def test_a_nine_channel_inpainting_unet_gets_the_mask_and_masked_image(studio, tiny_model_dir):
    from diffusers import UNet2DConditionModel

    from pipelines.models.sources import ModelSource

    base = studio.models.current.pipeline
    config = dict(base.unet.config) | {"in_channels": 9}
    unet = UNet2DConditionModel.from_config(config)
    seen = []
    unet.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    pipeline = type(base)(**(base.components | {"unet": unet}))
    studio.models.adopt(pipeline, ModelSource("folder", str(tiny_model_dir), "tiny-inpainting"))
    source, mask = picture(64, 64, seed=7), box_mask(64, 64, (16, 16, 40, 40))
    result = pixels(inpaint(studio, init_image=source, mask=mask, mask_blur=0).images[0].image)
    assert {inputs.shape[1] for inputs in seen} == {9}
    # channel 4 is the mask on the latent grid (4 px a cell here): the cells of pixels 16..39, i.e. 4..9
    expected = np.zeros((16, 16))
    expected[4:10, 4:10] = 1
    assert all(np.array_equal(inputs[0, 4].numpy(), expected) for inputs in seen)
    assert np.array_equal(result[np.asarray(mask) == 0], pixels(source)[np.asarray(mask) == 0])
    # the other tabs refuse it, naming it, where diffusers failed on the channels ("expected input[2, 4, 16, 16] to
    # have 9 channels")
    for request in (Txt2ImgRequest(prompt="red apple", steps=2),
                    Img2ImgRequest(prompt="red apple", steps=2, init_image=source)):
        with pytest.raises(ValueError, match="tiny-inpainting is an inpainting model .* Inpainting and outpainting "
                                             "only; for anything else, load a text-to-image model"):
            studio.generate(request)


@pytest.mark.parametrize("overrides,message", [
    ({"mask": Image.new("L", (64, 64))}, "The mask is empty"),
    ({"mask": None}, "needs a mask"),
    ({"mask_blur": 65}, "`mask_blur` must be a whole number of px from 0 to 64 but is 65"),
    ({"only_masked_padding": -1}, "`only_masked_padding` must be a whole number of px from 0 to 512"),
    ({"masked_content": "noise"}, "`masked_content` must be one of 'original', 'fill'"),
])
def test_bad_inpainting_input_is_refused_with_what_was_received(overrides, message):
    values = dict(prompt="x", init_image=picture(64, 64), mask=box_mask(64, 64, (0, 0, 8, 8))) | overrides
    with pytest.raises(ValueError, match=message):
        InpaintRequest(**values)


def test_a_mask_of_another_size_is_resized_and_the_user_is_told(studio):
    done = inpaint(studio, init_image=picture(64, 64), mask=box_mask(32, 32, (8, 8, 16, 16)))
    assert any("mask is 32×32 but the image is 64×64" in message for message in done.messages)


@pytest.fixture(scope="module")
def embedded_generator(worker):
    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager

    models = ModelManager(MemoryManager(device="cpu"), worker=worker)
    models.load("embedded")
    return Generator(models, outputs_dir=None)


@pytest.mark.parametrize("prefill", ["edge", "blur"])
def test_outpainting_extends_the_canvas_and_keeps_the_original_region(studio, prefill):
    from pipelines.tasks.outpaint import OutpaintRequest

    source = picture(64, 48, seed=8)
    done = studio.generate(OutpaintRequest(prompt="blue sky", init_image=source, right=32, top=16, prefill=prefill,
                                           steps=6, seed=12))
    result = pixels(done.images[0].image)
    assert result.shape == (48 + 16, 64 + 32, 3)
    assert np.array_equal(result[16:, :64], pixels(source))                 # the original, bit for bit
    canvas = pixels(OutpaintRequest(prompt="blue sky", init_image=source, right=32, top=16,
                                    prefill=prefill).as_inpainting().init_image)
    far_out = np.zeros(result.shape[:2], dtype=bool)
    far_out[:, 64 + 8:] = True                                              # beyond the 8-px feather
    assert np.abs(result - canvas)[far_out].mean() > 5                      # generated, not the pre-fill
    next_to_original = result[16:, 64]                                      # 1 px out: mostly the pre-fill
    assert np.abs(next_to_original - canvas[16:, 64]).mean() < np.abs(result - canvas)[far_out].mean()
    _, _, parameters = parse_infotext(done.images[0].infotext)
    assert (parameters["Outpaint right"], parameters["Outpaint top"], parameters["Outpaint prefill"]) == (
        "32", "16", prefill)


def test_outpainting_needs_a_side_to_extend():
    from pipelines.tasks.outpaint import OutpaintRequest

    with pytest.raises(ValueError, match="at least one side"):
        OutpaintRequest(prompt="x", init_image=picture(64, 64))
