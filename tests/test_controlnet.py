"""ControlNet (pipelines/tasks/controlnet.py and its neighbours): units, their loop, loading, infotext,
the X-ray; on the seeded tiny model with a seeded tiny ControlNet, and the shipped ones on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.io.metadata import infotext_to_settings, parse_infotext
from pipelines.tasks.control_units import CONTROL_FIRST, PROMPT_FIRST, ControlUnit, resize_for
from pipelines.tasks.control_xray import control_xray
from pipelines.tasks.controlnet import ControlNetRequest, read_units
from pipelines.tasks.preprocessors import OFFLINE_PREPROCESSORS, PREPROCESSORS, preprocess
from pipelines.tasks.txt2img import Txt2ImgRequest
from recipe.tiny import build_tiny_controlnet

BASE = dict(prompt="red apple", negative_prompt="blurry", steps=5, seed=11, width=64, height=64, sampler="DDIM",
            guidance_scale=6.0)


def circle(size: int = 64, *, lines: str = "white", background: str = "black") -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).ellipse((size // 6, size // 6, size * 5 // 6, size * 5 // 6), outline=lines, width=3)
    return image


@pytest.fixture
def tiny_controlnets(studio):
    """Two seeded tiny ControlNets under the studio's models/controlnet/: a folder and a single file."""
    from safetensors.torch import save_file

    folder = studio.models.models_dir / "controlnet"
    unet = studio.models.current.pipeline.unet
    build_tiny_controlnet(unet, seed=1).save_pretrained(folder / "tiny-a")
    save_file(build_tiny_controlnet(unet, seed=2).state_dict(), str(folder / "tiny-b.safetensors"))
    return folder


def image_of(studio, request) -> np.ndarray:
    return np.asarray(studio.generate(request).images[0].image, dtype=np.int16)


def test_a_unit_that_never_acts_gives_the_text_to_image_image_bit_for_bit(studio, tiny_controlnets):
    plain = image_of(studio, Txt2ImgRequest(**BASE))
    for idle in ({"weight": 0.0}, {"end": 0.0}):
        request = ControlNetRequest(**BASE, control_image=circle(), preprocessor="none", model="tiny-a", **idle)
        assert np.array_equal(image_of(studio, request), plain), idle
        assert "it never acts" in " ".join(request.notes())
    steered = image_of(studio, ControlNetRequest(**BASE, control_image=circle(), preprocessor="none", model="tiny-a"))
    assert np.abs(steered - plain).mean() > 5


def test_our_loop_is_diffusers_controlnet_pipeline(studio, tiny_controlnets):
    """One balanced unit: the same latents as StableDiffusionControlNetPipeline on the same noise."""
    from diffusers import StableDiffusionControlNetPipeline

    from pipelines.core.call import prepare

    request = ControlNetRequest(**BASE, control_image=circle(), preprocessor="none", model="tiny-a", weight=0.8)

    def both():
        call = prepare(studio.models, request)
        ours = call(0)
        reference = StableDiffusionControlNetPipeline.from_pipe(call.pipeline, controlnet=call.controlnets["tiny-a"])
        theirs = reference(prompt=request.prompt, negative_prompt=request.negative_prompt, image=circle(),
                           num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                           controlnet_conditioning_scale=0.8, generator=call.generators(0), output_type="latent",
                           width=64, height=64).images
        return ours, theirs

    ours, theirs = studio.models.worker.call(both)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_two_units_add_their_residuals(studio, tiny_controlnets):
    one = dict(control_image=circle(), preprocessor="none", model="tiny-a")
    whole = image_of(studio, ControlNetRequest(**BASE, **one, weight=1.0))
    halves = image_of(studio, ControlNetRequest(**BASE, **one, weight=0.5, more_units=[
        {"image": circle(), "preprocessor": "none", "model": "tiny-a", "weight": 0.5}]))
    assert np.array_equal(whole, halves)        # 0.5 r + 0.5 r = r, exactly
    other = image_of(studio, ControlNetRequest(**BASE, **one, more_units=[
        {"image": circle(), "preprocessor": "invert", "model": "tiny-b.safetensors"}]))
    assert np.abs(other - whole).mean() > 2     # a second, different unit changes the image


def test_a_unit_sent_disabled_is_left_out():
    request = ControlNetRequest(**BASE, control_image=circle(), more_units=[
        {"image": "not even looked at", "enabled": False}, {"image": ControlUnit(image=circle()).image}])
    assert len(request.units) == 2


def test_control_modes_scale_blocks_and_branches():
    unit = ControlUnit(image=circle(), weight=0.8)
    assert unit.block_scales(3) == [0.8] * 3
    soft = ControlUnit(image=circle(), weight=0.8, control_mode=PROMPT_FIRST).block_scales(13)
    assert soft[-1] == pytest.approx(0.8) and soft[0] == pytest.approx(0.8 * 0.825 ** 12)
    assert ControlUnit(image=circle(), control_mode=CONTROL_FIRST).block_scales(2)[0] == pytest.approx(0.825)
    window = ControlUnit(image=circle(), start=0.25, end=0.75)
    assert [window.acts_at(i, 8) for i in range(8)] == [False, False, True, True, True, True, False, False]


def test_the_xray_shows_control_only_between_start_and_end(studio, tiny_controlnets):
    xray = control_xray(studio, ControlNetRequest(**BASE | {"steps": 8}, control_image=circle(), preprocessor="none",
                                                  model="tiny-a", start=0.25, end=0.75))
    acting = xray.blocks.sum(axis=1) > 0
    assert acting.tolist() == [False, False, True, True, True, True, False, False]
    assert xray.maps[3].shape == (64, 64) and xray.maps[3].max() > 0 and xray.maps[0].max() == 0
    assert xray.block_names[-1] == "middle" and xray.overlay(3).size == (64, 64)
    weaker = control_xray(studio, ControlNetRequest(**BASE | {"steps": 8}, control_image=circle(),
                                                    preprocessor="none", model="tiny-a", weight=0.5))
    stronger = control_xray(studio, ControlNetRequest(**BASE | {"steps": 8}, control_image=circle(),
                                                      preprocessor="none", model="tiny-a", weight=1.0))
    assert weaker.blocks[0] == pytest.approx(stronger.blocks[0] / 2, rel=1e-4)


def test_a_controlnet_for_another_model_is_refused_naming_the_mismatch(studio, tiny_controlnets):
    from diffusers import ControlNetModel

    wide = ControlNetModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           cross_attention_dim=64, layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                           conditioning_embedding_out_channels=(8, 16, 32))
    wide.save_pretrained(tiny_controlnets / "wide")
    with pytest.raises(ValueError, match="cross_attention_dim is 64, the model's is 32"):
        studio.generate(ControlNetRequest(**BASE, control_image=circle(), model="wide"))
    coarse = ControlNetModel.from_unet(studio.models.current.pipeline.unet)   # reads at 1/8, the tiny VAE is 1/4
    coarse.save_pretrained(tiny_controlnets / "coarse")
    with pytest.raises(ValueError, match="1/8 scale"):
        studio.generate(ControlNetRequest(**BASE, control_image=circle(), model="coarse"))
    assert image_of(studio, Txt2ImgRequest(**BASE)).shape == (64, 64, 3)   # and the studio goes on


OUTSIDE_CONTROLNETS = r"is .*, outside the app's model folders \(.*models/controlnet\).* into models/controlnet/"


@pytest.mark.parametrize("name,message", [
    ("../outside", OUTSIDE_CONTROLNETS), ("/etc/passwd", OUTSIDE_CONTROLNETS),
    ("missing", "No ControlNet 'missing'"), ("someone/not-cached", "not in the local Hugging Face cache"),
    ("weights.bin", "pickled checkpoint")])
def test_controlnet_names_that_cannot_load_get_clear_errors(studio, tiny_controlnets, name, message):
    (tiny_controlnets / "weights.bin").write_bytes(b"not really")
    with pytest.raises(ValueError, match=message):
        studio.models.worker.call(studio.models.controlnet, name)


def test_a_controlnet_linked_from_outside_models_controlnet_is_neither_listed_nor_loaded(studio, tiny_controlnets,
                                                                                         tmp_path):
    """The one path policy on ControlNets: a link in models/controlnet/ that leads out of it is resolved, not listed
    and refused; a ControlNet there under its own name loads."""
    from pipelines.models.controlnets import available_controlnets

    outside = tmp_path / "elsewhere"
    build_tiny_controlnet(studio.models.current.pipeline.unet, seed=3).save_pretrained(outside / "stolen")
    (tiny_controlnets / "linked").symlink_to(outside / "stolen", target_is_directory=True)
    listed = available_controlnets(studio.models.models_dir)
    assert "linked" not in listed and {"tiny-a", "tiny-b.safetensors"} <= set(listed)
    with pytest.raises(ValueError, match=rf"controlnet/linked' is {outside}/stolen, outside the app's model folders"):
        studio.models.worker.call(studio.models.controlnet, "linked")
    assert "controlnet:linked" not in studio.models.slots
    assert studio.models.worker.call(studio.models.controlnet, "tiny-a") is \
        studio.models.slots["controlnet:tiny-a"].pipeline


def test_every_offline_preprocessor_runs_and_weight_needing_ones_say_which_file(tmp_path):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    for name in OFFLINE_PREPROCESSORS:
        assert preprocess(name, photo).size == (80, 48), name
    edges = np.asarray(preprocess("canny", circle(lines="black", background="white")))
    assert edges.max() == 255 and edges.mean() < 60           # white edges on black
    assert np.array_equal(np.asarray(preprocess("invert", circle(lines="black", background="white"))),
                          np.asarray(circle()))
    grid = np.asarray(preprocess("colour grid", photo.resize((64, 64))))
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) <= 64
    with pytest.raises(ValueError, match=r"`ControlNetHED.pth` in `.*annotators/`"):
        PREPROCESSORS["hed"](photo, annotators=tmp_path / "annotators")
    assert "hed" in PREPROCESSORS and "openpose" in PREPROCESSORS


def test_resize_modes_and_pixel_perfect():
    wide = Image.new("RGB", (128, 64), "white")
    assert resize_for(wide, 64, 64, "just resize").size == (64, 64)
    filled = np.asarray(resize_for(wide, 64, 64, "resize and fill"))
    assert (filled[:10] == 0).all() and (filled[30] == 255).all()          # black bands above and below
    assert (np.asarray(resize_for(wide, 64, 64, "crop and resize")) == 255).all()
    unit = ControlUnit(image=circle(256), preprocessor="canny", pixel_perfect=False, processor_resolution=128)
    assert unit.control_image(64, 64).size == (64, 64)


def test_infotext_round_trips_the_units_in_sd_webui_controlnet_form(studio, tiny_controlnets):
    request = ControlNetRequest(**BASE, control_image=circle(), preprocessor="colour grid", model="tiny-a",
                                weight=0.7, start=0.1, end=0.9, control_mode=PROMPT_FIRST, resize_mode="just resize",
                                more_units=[{"image": circle(), "model": "tiny-b.safetensors", "preprocessor": "invert",
                                             "control_mode": CONTROL_FIRST}])
    infotext = studio.generate(request).images[0].infotext
    assert 'ControlNet 0: "Module: color, Model: tiny-a, Weight: 0.7' in infotext
    units = infotext_to_settings(parse_infotext(infotext)[2])["controlnet_units"]
    assert units[0] == {"preprocessor": "colour grid", "model": "tiny-a", "weight": 0.7, "start": 0.1, "end": 0.9,
                        "resize_mode": "just resize", "control_mode": PROMPT_FIRST, "pixel_perfect": True,
                        "processor_resolution": 512}
    assert units[1]["model"] == "tiny-b.safetensors" and units[1]["control_mode"] == CONTROL_FIRST
    # as sd-webui-controlnet writes it
    theirs = read_units({"ControlNet 0": "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, "
                                         "Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 512, Threshold "
                                         "A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, Pixel "
                                         "Perfect: False, Control Mode: Balanced"})
    assert theirs == [{"preprocessor": "canny", "model": "control_v11p_sd15_canny", "weight": 1.0, "start": 0.0,
                       "end": 1.0, "resize_mode": "crop and resize", "control_mode": "balanced",
                       "pixel_perfect": False, "processor_resolution": 512}]


@pytest.mark.parametrize("change,message", [
    ({"weight": -1}, "`weight` must be a number from 0 to 2 but is -1"), ({"start": 0.8, "end": 0.2}, "must not be after"),
    ({"preprocessor": "magic"}, "`preprocessor` must be one of"), ({"control_mode": "loud"}, "`control_mode`"),
    ({"control_image": None}, "needs a control image"), ({"more_units": [{"model": "x"}]}, "needs its control `image`"),
    ({"more_units": [{"image": "bm90IGFuIGltYWdl", "model": "x"}]}, "could not be read as an image"),
    ({"more_units": "[{"}, "not JSON"),
    ({"more_units": [{"image": "/etc/hostname", "model": "x"}]}, "could not be read as an image"),   # never a path ({"more_units": [{"image": "x", "colour": 1}]}, "unknown keys"),
    ({"control_image": Image.new("RGB", (2, 2))}, "at least 8×8"), ({"strength": 0.0}, "`strength`")])
def test_bad_controlnet_requests_are_refused_clearly(change, message):
    with pytest.raises(ValueError, match=message):
        ControlNetRequest(**(BASE | {"control_image": circle()} | change))


def test_an_init_image_turns_it_into_image_to_image_with_control(studio, tiny_controlnets):
    source = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    common = dict(control_image=circle(), preprocessor="none", model="tiny-a", init_image=source)
    light = image_of(studio, ControlNetRequest(**BASE | {"steps": 10}, **common, strength=0.2))
    heavy = image_of(studio, ControlNetRequest(**BASE | {"steps": 10}, **common, strength=1.0))
    closeness = [np.abs(image - np.asarray(source, dtype=np.int16)).mean() for image in (light, heavy)]
    assert closeness[0] < closeness[1]
    assert "Denoising strength: 0.2" in studio.generate(ControlNetRequest(**BASE | {"steps": 10}, **common,
                                                                          strength=0.2)).images[0].infotext


@pytest.fixture(scope="module")
def controlnet_tab(tmp_path_factory):
    """The ControlNet tab, built without a model."""
    import gradio as gr

    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from studio.context import StudioContext
    from studio.tabs.controlnet import build_controlnet_tab

    folder = tmp_path_factory.mktemp("ui")
    models = ModelManager(MemoryManager(device="cpu"), models_dir=folder / "models")
    context = StudioContext(models=models, generator=Generator(models, None), outputs_dir=folder)
    with gr.Blocks():
        return build_controlnet_tab(context, {})


def test_png_info_restores_the_units_into_the_unit_panels(controlnet_tab):
    from studio.tabs.generate import settings_from_infotext

    text = ('red apple\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, ControlNet 0: "Module: '
            'canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.6, Resize Mode: Just Resize, Processor Res: '
            '512, Guidance Start: 0.1, Guidance End: 0.8, Pixel Perfect: False, Control Mode: ControlNet is more '
            'important", ControlNet 1: "Module: color, Model: emoji-controlnet-colour, Weight: 1"')
    restored = settings_from_infotext(text, controlnet_tab)
    page = controlnet_tab.own.page
    values = {name: restored[component] for name, component in page.items() if component in restored}
    assert values["unit0_enabled"] and values["unit1_enabled"] and not values["unit2_enabled"]
    assert (values["unit0_model"], values["unit0_weight"], values["unit0_start"], values["unit0_end"]) == \
        ("control_v11p_sd15_canny", 0.6, 0.1, 0.8)
    assert values["unit0_control_mode"] == CONTROL_FIRST and values["unit0_resize_mode"] == "just resize"
    assert values["unit1_preprocessor"] == "colour grid" and values["unit1_model"] == "emoji-controlnet-colour"
    assert restored[controlnet_tab.controls["steps"]] == 20


def test_the_page_builds_the_api_fields_from_enabled_units(controlnet_tab):
    from studio.tabs.controlnet import sketch_image

    page = {name: None for name in controlnet_tab.own.page}
    unit = dict(preprocessor="canny", model="m", weight=1.0, start=0.0, end=1.0, control_mode="balanced",
                resize_mode="crop and resize", pixel_perfect=True, processor_resolution=512.0)
    drawing = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(drawing).line((5, 5, 50, 50), fill=(0, 0, 0, 255), width=3)
    for number in range(3):
        page |= {f"unit{number}_{key}": value for key, value in unit.items()}
    page |= {"unit0_enabled": True, "unit0_upload": circle(), "unit1_enabled": False, "unit2_enabled": True,
             "unit2_sketch": {"background": None, "layers": [drawing], "composite": drawing}, "unit2_model": "n"}
    fields = controlnet_tab.own.to_fields(dict(page))
    assert fields["model"] == "m" and fields["control_image"] is page["unit0_upload"]
    assert [unit["model"] for unit in fields["more_units"]] == ["n"]
    assert np.asarray(fields["more_units"][0]["image"])[30, 30].tolist() == [0, 0, 0]      # drawn on white
    assert sketch_image({"background": None, "layers": [], "composite": None}) is None
    with pytest.raises(ValueError, match="unit 1 is enabled but has no control image"):
        controlnet_tab.own.to_fields(dict(page, unit1_enabled=True))
