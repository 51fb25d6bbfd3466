import io
import json
import os
import threading
import time
from datetime import datetime

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipelines import metadata
from pipelines.metadata import (
    build_infotext,
    infotext_to_settings,
    library_versions,
    parse_infotext,
    png_bytes_with_metadata,
    read_png_metadata,
    save_image,
)

PARAMS = {"Steps": 25, "Sampler": "DPM++ 2M", "CFG scale": 7.5, "Seed": 1234, "Size": "64x64",
          "Model hash": "0123456789", "Model": "emoji-ldm"}
A1111_INFOTEXT = (
    "masterpiece, a cozy cabin in the woods, (snow:1.2)\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3456, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)
NOON = datetime(2024, 5, 17, 12, 0, 0)


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
