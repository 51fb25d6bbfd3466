import io
import json
import os
import threading
import time
from datetime import datetime

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipelines.core.samplers import SAMPLER_NAMES
from pipelines.io import metadata
from pipelines.io.metadata import (build_infotext, infotext_to_settings, infotext_to_settings_and_dropped,
                                   library_versions, parse_infotext, png_bytes_with_metadata, read_png_metadata,
                                   save_image)
from pipelines.tasks.txt2img import Txt2ImgRequest

PARAMS = {"Steps": 25, "Sampler": "DPM++ 2M", "CFG scale": 7.5, "Seed": 1234, "Size": "64x64",
          "Model hash": "0123456789", "Model": "emoji-ldm"}
A1111_INFOTEXT = (
    "masterpiece, a cozy cabin in the woods, (snow:1.2)\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3456, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)
NOON = datetime(2024, 5, 17, 12, 0, 0)

# Infotexts as A1111 1.9/1.10 writes them (the first three as found in the wild; the others in the order
# A1111's create_infotext writes its keys): Schedule type, Clip skip, Hires fix, ADetailer, ControlNet, RNG.
A1111_DPM_ADAPTIVE = (
    "Anna Yamada, dancing with her hands above her head, happy, full shot, full body <lora:AnnaYamada:1>.\n"
    "Negative prompt: low quality, blurry, text\n"
    "Steps: 40, Sampler: DPM adaptive, Schedule type: Automatic, CFG scale: 7, Seed: 524982011, Size: 704x832, "
    "Clip skip: 2, Model: darkSushiMixMix_225D, Version: v1.10.1")
A1111_IMG2IMG = (
    "product shoot in sand with beach elements, warm weather, studio lighting\n"
    "Negative prompt: incomplete elements\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 3001968073, Size: 985x1266, "
    "Model hash: b513c6287d, Model: realism_engine, Denoising strength: 0.75, Mask blur: 2, Version: v1.9.4")
A1111_CONTROLNET = (
    "a wooden pallet, photo\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
    "Model hash: 6d82a674e1, Model: helloobjects_V15evae, ControlNet 0: \"Module: canny, Model: "
    "control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 512, Threshold "
    "A: 192.0, Threshold B: 255.0, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: "
    "ControlNet is more important\", Version: v1.10.1")
A1111_HIRES = (
    "photo of a cozy cabin in snowy woods, golden hour, (snow:1.3)\n"
    "Negative prompt: (worst quality:1.4), cartoon\n"
    "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, Seed: 5000000000, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
    "ADetailer model: face_yolov8n.pt, ADetailer prompt: \"detailed face, smile\", ADetailer version: 24.1.2, "
    "Hires upscale: 2, Hires steps: 10, Hires upscaler: R-ESRGAN 4x+, Lora hashes: \"detail: aabbccddeeff\", "
    "Version: v1.10.1")
A1111_SCHEDULES = (
    "a lighthouse\n"
    "Steps: 30, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 5, Seed: 42, Size: 512x512, Batch size: 4, "
    "Batch pos: 1, RNG: CPU, Emphasis: No norm, Version: v1.10.1")


def make_image(seed=0, size=(16, 12)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


# ---------------------------------------------------------------------------------------
# Infotext


def test_build_matches_a1111_layout():
    text = build_infotext("a cat", "blurry", PARAMS)
    assert text == (
        "a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1234, Size: 64x64, "
        "Model hash: 0123456789, Model: emoji-ldm"
    )


def test_build_skips_empty_negative_and_none_values_and_trims_floats():
    text = build_infotext("a cat", "", {"Steps": 20, "CFG scale": 7.0, "Seed": 1, "Denoising strength": None,
                                        "Guidance rescale": 0.1})
    assert text == "a cat\nSteps: 20, CFG scale: 7, Seed: 1, Guidance rescale: 0.1"


def test_build_quotes_values_like_a1111():
    text = build_infotext("p", "", {"Steps": 1, "Seed": 2, "Lora": 'a, b: "c"', "Plain": "x"})
    assert text.splitlines()[-1] == r'Steps: 1, Seed: 2, Lora: "a, b: \"c\"", Plain: x'


def test_build_rejects_keys_that_cannot_be_read_back():
    with pytest.raises(ValueError, match="Bad: key"):
        build_infotext("p", "", {"Bad: key": 1})


@pytest.mark.parametrize("prompt, negative", [
    ("a cat, a dog, (red:1.2)", "blurry, low quality"),
    ('a sign that says "hello", then: more', 'no "text"'),
    ("line one, with comma\nline two\n\nline four", "neg one\nneg two, more"),
    ("a cat", ""),
    ("猫とたぬき, café, émoji 🐱", "ぼやけた"),
])
def test_build_parse_round_trip(prompt, negative):
    params = dict(PARAMS, Lora='cat, "v2": 0.8', Note="multi\nline")
    text = build_infotext(prompt, negative, params)
    parsed_prompt, parsed_negative, parsed_params = parse_infotext(text)
    assert parsed_prompt == prompt
    assert parsed_negative == negative
    assert parsed_params == {"Steps": "25", "Sampler": "DPM++ 2M", "CFG scale": "7.5", "Seed": "1234",
                             "Size": "64x64", "Model hash": "0123456789", "Model": "emoji-ldm",
                             "Lora": 'cat, "v2": 0.8', "Note": "multi\nline"}


def test_parse_a1111_infotext_to_settings():
    prompt, negative, params = parse_infotext(A1111_INFOTEXT)
    assert prompt == "masterpiece, a cozy cabin in the woods, (snow:1.2)"
    assert negative == "lowres, bad anatomy"
    assert params["Version"] == "v1.10.1"
    assert params["Schedule type"] == "Karras"
    assert infotext_to_settings(params) == {
        "steps": 20, "sampler": "DPM++ 2M Karras", "guidance_scale": 7.0, "seed": 3456,
        "width": 512, "height": 768, "model": "v1-5-pruned-emaonly", "model_hash": "6ce0161689",
    }


def test_parse_without_params_line_is_all_prompt():
    prompt, negative, params = parse_infotext("a cat, sitting\nNegative prompt: dog\nSteps: 20, Seed: 1")
    assert prompt == "a cat, sitting"
    assert negative == "dog\nSteps: 20, Seed: 1"
    assert params == {}


def test_settings_from_img2img_params():
    settings = infotext_to_settings({"Sampler": "DPM++ 2M Karras", "Schedule type": "Karras",
                                     "Denoising strength": "0.55", "Guidance rescale": "0.7",
                                     "Batch size": "4", "Unknown thing": "x"})
    assert settings == {"sampler": "DPM++ 2M Karras", "strength": 0.55, "guidance_rescale": 0.7,
                        "batch_size": 4}


def test_settings_reject_malformed_values():
    with pytest.raises(ValueError, match="`Steps` should be a whole number but is 'many'"):
        infotext_to_settings({"Steps": "many"})
    with pytest.raises(ValueError, match="`Size` should look like 512x768 but is '512'"):
        infotext_to_settings({"Size": "512"})


# ---------------------------------------------------------------------------------------
# A1111 interoperability: samplers and schedule types, what is restored and what is dropped, seeds


# A1111 1.10's reading of `Sampler` + `Schedule type` (modules/sd_samplers.py `get_sampler_and_scheduler`, after
# infotext_utils fills a missing schedule type in as "Automatic"), for the samplers it shares with us, each with
# the schedule its "Automatic" runs (None: the model's own sigmas, "Uniform").
A1111_SAMPLER_DEFAULTS = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "Euler a": None, "Euler": None, "LMS": None,
                          "Heun": None, "DDIM": None, "PLMS": None, "UniPC": None, "LCM": None}
A1111_FIRST_SAMPLER = "DPM++ 2M"    # what A1111 falls back to for a sampler name it doesn't know


def a1111_reads(params: dict[str, str]) -> tuple[str, str]:
    """(sampler, the schedule it runs) as A1111 1.10 restores an infotext's params."""
    name, schedule = params["Sampler"], params.get("Schedule type", "Automatic")
    for label in ("Automatic", "Uniform", "Karras", "Exponential"):
        if name.endswith(" " + label):
            name, schedule = name[:-len(label) - 1], label
    sampler = name if name in A1111_SAMPLER_DEFAULTS else A1111_FIRST_SAMPLER
    if schedule == "Automatic":
        schedule = A1111_SAMPLER_DEFAULTS[sampler] or "Uniform"
    return sampler, schedule


# What A1111 should run for each of our samplers: the same method and the same schedule.
A1111_RUNS = {"Euler": ("Euler", "Uniform"), "Euler a": ("Euler a", "Uniform"), "Heun": ("Heun", "Uniform"),
              "LMS": ("LMS", "Uniform"), "DDIM": ("DDIM", "Uniform"), "PNDM": ("PLMS", "Uniform"),
              "DPM++ 2M": ("DPM++ 2M", "Uniform"), "DPM++ 2M Karras": ("DPM++ 2M", "Karras"),
              "DPM++ SDE Karras": ("DPM++ SDE", "Karras"), "UniPC": ("UniPC", "Uniform"), "LCM": ("LCM", "Uniform")}


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_is_written_in_a1111s_form_and_read_back_by_both(sampler):
    from pipelines.generation.generator import infotext_parameters

    class Model:
        model_hash, name = "0123456789", "emoji-ldm"

    request = Txt2ImgRequest(prompt="red apple", sampler=sampler, seed=5)
    text = build_infotext("red apple", "", infotext_parameters(request, Model(), 5, 0))
    _, _, params = parse_infotext(text)
    assert params["Schedule type"] in ("Automatic", "Uniform", "Karras") and params["RNG"] == "CPU"
    assert "Emphasis" not in params                                      # no weights in the prompt
    settings, dropped = infotext_to_settings_and_dropped(params)
    assert settings["sampler"] == sampler and dropped == {}              # ours back
    if sampler in A1111_RUNS:
        assert a1111_reads(params) == A1111_RUNS[sampler]                # A1111 runs the same thing
    else:                                                                # DDPM: A1111 has none
        assert sampler.startswith("DDPM") and a1111_reads(params)[0] == A1111_FIRST_SAMPLER


def test_plain_dpm_2m_is_no_longer_opened_as_karras_by_a1111():
    assert a1111_reads({"Sampler": "DPM++ 2M"}) == ("DPM++ 2M", "Karras")            # what we used to write
    assert a1111_reads({"Sampler": "DPM++ 2M", "Schedule type": "Uniform"}) == ("DPM++ 2M", "Uniform")  # now
    assert a1111_reads({"Sampler": "PLMS", "Schedule type": "Automatic"}) == ("PLMS", "Uniform")


@pytest.mark.parametrize("params, sampler", [
    ({"Sampler": "DPM++ 2M"}, "DPM++ 2M"),                     # our PNGs before schedule types, A1111 < 1.9
    ({"Sampler": "DPM++ 2M Karras"}, "DPM++ 2M Karras"),
    ({"Sampler": "DPM++ SDE Karras"}, "DPM++ SDE Karras"),
    ({"Sampler": "PNDM"}, "PNDM"),
    ({"Sampler": "DDPM speculative"}, "DDPM speculative"),
    ({"Sampler": "DPM++ 2M", "Schedule type": "Automatic"}, "DPM++ 2M Karras"),   # A1111 >= 1.9
    ({"Sampler": "DPM++ 2M", "Schedule type": "Karras"}, "DPM++ 2M Karras"),
    ({"Sampler": "DPM++ 2M", "Schedule type": "Uniform"}, "DPM++ 2M"),
    ({"Sampler": "DPM++ SDE", "Schedule type": "Automatic"}, "DPM++ SDE Karras"),
    ({"Sampler": "PLMS", "Schedule type": "Automatic"}, "PNDM"),
    ({"Sampler": "Euler", "Schedule type": "Uniform"}, "Euler"),
    ({"Sampler": "DDIM", "Schedule type": "Automatic"}, "DDIM"),
])
def test_both_sampler_forms_restore_our_sampler(params, sampler):
    assert infotext_to_settings_and_dropped(params) == ({"sampler": sampler}, {})


@pytest.mark.parametrize("params, sampler, dropped", [
    ({"Sampler": "Euler", "Schedule type": "Karras"}, "Euler", {"Schedule type": "Karras"}),
    ({"Sampler": "DPM++ 2M", "Schedule type": "Exponential"}, "DPM++ 2M Karras", {"Schedule type": "Exponential"}),
    # Align Your Steps is restored where the sampler runs it (tests/test_guidance.py), dropped where it does not
    ({"Sampler": "DPM++ SDE", "Schedule type": "Align Your Steps"}, "DPM++ SDE Karras",
     {"Schedule type": "Align Your Steps"}),
    ({"Sampler": "DPM++ SDE", "Schedule type": "Uniform"}, "DPM++ SDE Karras", {"Schedule type": "Uniform"}),
    # a sampler we don't have comes back by its name: the tab says it is not available
    ({"Sampler": "DPM++ 2M SDE", "Schedule type": "Exponential"}, "DPM++ 2M SDE", {}),
])
def test_a_schedule_type_we_cannot_run_is_dropped_by_name(params, sampler, dropped):
    assert infotext_to_settings_and_dropped(params) == ({"sampler": sampler}, dropped)


@pytest.mark.parametrize("text, settings, dropped", [
    (A1111_DPM_ADAPTIVE, {"sampler": "DPM adaptive", "steps": 40, "seed": 524982011, "width": 704, "height": 832},
     {"Clip skip": "2"}),
    (A1111_IMG2IMG, {"sampler": "Euler a", "strength": 0.75, "mask_blur": 2, "seed": 3001968073}, {}),
    (A1111_CONTROLNET, {"sampler": "DPM++ 2M Karras"}, {}),
    (A1111_HIRES, {"sampler": "DPM++ 2M Karras", "strength": 0.45, "seed": 5000000000},
     {"Clip skip": "2", "ADetailer model": "face_yolov8n.pt", "ADetailer prompt": "detailed face, smile",
      "ADetailer version": "24.1.2", "Hires upscale": "2", "Hires steps": "10", "Hires upscaler": "R-ESRGAN 4x+"}),
    (A1111_SCHEDULES, {"sampler": "DPM++ SDE Karras", "batch_size": 4}, {"Emphasis": "No norm"}),
])
def test_a1111_infotexts_restore_what_we_support_and_name_the_rest(text, settings, dropped):
    _, _, params = parse_infotext(text)
    restored, not_restored = infotext_to_settings_and_dropped(params)
    assert {key: restored[key] for key in settings} == settings
    assert not_restored == dropped        # Version, Lora hashes, Batch pos, ControlNet 0, RNG: CPU are not dropped
    if "ControlNet 0" in params:
        assert restored["controlnet_units"][0]["preprocessor"] == "canny"


@pytest.mark.parametrize("key, ours, other", [("Clip skip", "1", "2"), ("RNG", "CPU", "GPU"),
                                              ("Emphasis", "Original", "Ignore")])
def test_a_value_that_is_ours_anyway_is_not_dropped_and_another_is(key, ours, other):
    assert infotext_to_settings_and_dropped({key: ours})[1] == {}
    assert infotext_to_settings_and_dropped({key: other})[1] == {key: other}


def test_a_seed_past_2_to_the_32_is_restored_and_accepted():
    _, _, params = parse_infotext(A1111_HIRES)
    seed = infotext_to_settings(params)["seed"]
    assert seed == 5_000_000_000
    request = Txt2ImgRequest(prompt="x", seed=seed, batch_size=3)
    assert [request.seed_for(0, index) for index in range(3)] == [5_000_000_000, 5_000_000_001, 5_000_000_002]


def test_library_versions_has_installed_packages():
    versions = library_versions()
    assert versions["python"].count(".") == 2
    import diffusers
    assert versions["diffusers"] == diffusers.__version__


# ---------------------------------------------------------------------------------------
# PNG


def test_png_round_trip_through_file(tmp_path):
    image = make_image()
    infotext = build_infotext("猫, a cat", "blurry", PARAMS)
    extra = {"request": {"prompt": "猫, a cat", "steps": 25}, "versions": {"python": "3.11.7"}}
    path = tmp_path / "out.png"
    path.write_bytes(png_bytes_with_metadata(image, infotext, extra))

    assert read_png_metadata(path) == (infotext, extra)
    with Image.open(path) as reloaded:
        assert reloaded.format == "PNG"
        assert np.array_equal(np.asarray(reloaded), np.asarray(image))


def test_read_a1111_png_with_only_parameters(tmp_path):
    png_info = PngImagePlugin.PngInfo()
    png_info.add_text("parameters", A1111_INFOTEXT)
    path = tmp_path / "a1111.png"
    make_image().save(path, pnginfo=png_info)
    assert read_png_metadata(path) == (A1111_INFOTEXT, None)


def test_read_png_without_metadata(tmp_path):
    path = tmp_path / "plain.png"
    make_image().save(path)
    assert read_png_metadata(path) == (None, None)
    assert read_png_metadata(io.BytesIO(path.read_bytes())) == (None, None)


def test_read_jpeg_raises(tmp_path):
    path = tmp_path / "photo.jpg"
    make_image().save(path, format="JPEG")
    with pytest.raises(ValueError, match="photo.jpg is not a PNG image"):
        read_png_metadata(path)


def test_read_non_image_raises(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png is not a PNG image"):
        read_png_metadata(path)


# ---------------------------------------------------------------------------------------
# Saving


def test_save_image_counts_up_per_day(tmp_path):
    first = save_image(make_image(), "a", {"n": 1}, tmp_path, seed=42, now=NOON)
    second = save_image(make_image(), "b", {"n": 2}, tmp_path, seed=7, now=NOON)
    next_day = save_image(make_image(), "c", {"n": 3}, tmp_path, seed=7, now=datetime(2024, 5, 18, 9))

    assert first == tmp_path / "2024-05-17" / "00000-42.png"
    assert second == tmp_path / "2024-05-17" / "00001-7.png"
    assert next_day == tmp_path / "2024-05-18" / "00000-7.png"
    assert read_png_metadata(second) == ("b", {"n": 2})
    assert sorted(os.listdir(tmp_path / "2024-05-17")) == ["00000-42.png", "00001-7.png"]


def test_save_image_continues_after_highest_existing_counter(tmp_path):
    day_dir = tmp_path / "2024-05-17"
    day_dir.mkdir()
    (day_dir / "00041-5.png").write_bytes(b"")
    (day_dir / "00003-5.png").write_bytes(b"")
    assert save_image(make_image(), "a", {}, tmp_path, seed=9, now=NOON).name == "00042-9.png"


def test_concurrent_saves_get_distinct_counters(tmp_path, monkeypatch):
    # Pause after each folder scan, so threads see the same highest counter and race to
    # claim the next one: the reservation has to settle it, not the timing.
    scan = metadata._used_counters

    def slow_scan(day_dir):
        used = scan(day_dir)
        time.sleep(0.005)
        return used

    monkeypatch.setattr(metadata, "_used_counters", slow_scan)
    start = threading.Barrier(8)
    paths, errors = [], []

    def save(seed):
        start.wait()
        try:
            paths.append(save_image(make_image(seed), f"image {seed}", {"seed": seed}, tmp_path,
                                    seed=seed, now=NOON))
        except Exception as error:  # surfaced by the assert below
            errors.append(error)

    threads = [threading.Thread(target=save, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    counters = sorted(int(path.name.split("-")[0]) for path in paths)
    assert counters == list(range(8))
    assert sorted(os.listdir(tmp_path / "2024-05-17")) == sorted(path.name for path in paths)
    for path in paths:
        seed = int(path.stem.split("-")[1])
        assert read_png_metadata(path) == (f"image {seed}", {"seed": seed})


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(metadata.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_image(make_image(), "a", {}, tmp_path, seed=1, now=NOON)
    assert os.listdir(tmp_path / "2024-05-17") == []


def test_unserialisable_extra_fails_before_touching_disk(tmp_path):
    with pytest.raises(TypeError):
        save_image(make_image(), "a", {"path": tmp_path}, tmp_path, seed=1, now=NOON)
    assert os.listdir(tmp_path) == []


def test_studio_chunk_is_json(tmp_path):
    data = png_bytes_with_metadata(make_image(), "a", {"x": [1, 2]})
    with Image.open(io.BytesIO(data)) as image:
        assert json.loads(image.text["studio"]) == {"x": [1, 2]}
        assert image.text["parameters"] == "a"
