"""Bad input and faults: every endpoint refuses what it cannot take, naming the value and what is allowed (or clamps
it as documented), keeps serving, and leaves no partial file in outputs/.

One server for all three layers: test_rest_api's (`launch.py --api` on the tiny model), so that (a) the handlers and
services called in process (the txt2img and img2img handlers as Gradio calls them, the `Generator`, the
`ModelManager`), (b) the Gradio API through gradio_client and (c) AUTOMATIC1111's REST API through requests all reach
the same device worker and the same outputs/ folder. After each case the same layer asks for a normal tiny image,
which must come, and outputs/ must then hold exactly that one more file, whole, and no `.tmp` or `.reserved` file.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import threading
from pathlib import Path

import gradio as gr
import pytest
import requests
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, PngImagePlugin
from test_rest_api import _serve  # the REST test server, started once here too

from pipelines.core.paths import ModelLoadError
from pipelines.io import metadata
from pipelines.io.metadata import SAVED_NAME_PATTERN, clamp_to_request_limits, infotext_to_settings, parse_infotext
from pipelines.models.memory import GIB, MemoryManager, MemoryMode, largest_megapixels
from pipelines.tasks.txt2img import Txt2ImgRequest

TINY = {"prompt": "red apple", "sampler": "Euler", "steps": 2, "width": 64, "height": 64, "seed": 1,
        "preview_every": 0}
MALICIOUS_INFOTEXT = "cat\nSteps: 99999999, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 99999x99999"


# ----------------------------------------------------------------------------- the server and the files it is sent


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    app, context, args = _serve(tiny_model_dir, tmp_path_factory)
    yield app, context, f"http://127.0.0.1:{args.port}"
    app.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[2] + "/", verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory, served) -> dict[str, Path]:
    """Bad uploads (corrupt, truncated, 1×1, 6000×6000, not an image, a lying infotext) and bad model files: a
    `..` path, a link out of models/, pickles, a corrupt and a truncated .safetensors."""
    _, context, _ = served
    folder = tmp_path_factory.mktemp("bad-files")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    png = buffer.getvalue()
    paths = {name: folder / f"{name}.png" for name in ("good", "corrupt", "truncated", "one", "huge", "text",
                                                       "malicious")}
    paths["good"].write_bytes(png)
    paths["corrupt"].write_bytes(png[:16] + bytes(range(256)) * 4)
    paths["truncated"].write_bytes(png[:len(png) // 2])
    Image.new("RGB", (1, 1), (0, 0, 255)).save(paths["one"])
    Image.new("RGB", (6000, 6000), (0, 0, 0)).save(paths["huge"])
    paths["text"].write_text("hello, I am text")
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("parameters", MALICIOUS_INFOTEXT)
    Image.new("RGB", (64, 64)).save(paths["malicious"], pnginfo=chunks)

    models = context.models.models_dir
    outside = folder / "outside"
    shutil.copytree(models / "tiny-copy", outside)
    (models / "escape").symlink_to(outside, target_is_directory=True)
    (models / "model.ckpt").write_bytes(b"\x80\x04pickled")
    (models / "model.bin").write_bytes(b"\x80\x04pickled")
    (models / "corrupt.safetensors").write_bytes(b"\xff" * 64)
    weights = sorted((models / "tiny-copy" / "unet").glob("*.safetensors"))[0].read_bytes()
    (models / "truncated.safetensors").write_bytes(weights[:len(weights) // 3])
    paths |= {"outside": outside, "models": models}
    return paths


def base64_of(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# ----------------------------------------------------------------------------- after each case


def output_files(context) -> set[Path]:
    return {path for path in context.outputs_dir.rglob("*") if path.is_file()}


def assert_nothing_partial(context, before: set[Path], *, added: int = 0) -> None:
    """outputs/ holds `added` more files than `before`, each a whole PNG under its final name."""
    after = output_files(context)
    assert before <= after
    new = after - before
    assert len(new) == added, sorted(path.name for path in new)
    for path in after:
        assert SAVED_NAME_PATTERN.fullmatch(path.name), f"partial or stray file {path}"
    for path in new:
        with Image.open(path) as image:
            image.load()


def serves_next_in_process(context, before: set[Path]) -> None:
    done = context.generator.generate(Txt2ImgRequest(**TINY))
    assert len(done.images) == 1 and done.images[0].path
    assert_nothing_partial(context, before, added=1)


def serves_next_over_gradio(client, context, before: set[Path]) -> None:
    gallery, *_ = client.predict(**TINY, api_name="/txt2img")
    assert len(gallery) == 1
    assert_nothing_partial(context, before, added=1)


def serves_next_over_rest(url, context, before: set[Path]) -> None:
    answer = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "red apple", "sampler_name": "Euler", "steps": 2,
                                                             "width": 64, "height": 64, "save_images": True})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 1
    assert_nothing_partial(context, before, added=1)


def handler(app, api_name: str):
    """The function Gradio runs for the endpoint `api_name` (wrapped in the UI's error boundary)."""
    found = [block_fn.fn for block_fn in app.fns.values() if block_fn.api_name == api_name]
    assert len(found) == 1, api_name
    return found[0]


# ----------------------------------------------------------------------------- (a) handlers and services, in process

SAMPLING_CASES = [
    ("width-0", {"width": 0}, r"`width` must be a whole number from 8 to 2048 but is 0\."),
    ("width-negative", {"width": -64}, r"`width` must be a whole number from 8 to 2048 but is -64\."),
    ("width-7", {"width": 7}, r"`width` must be a whole number from 8 to 2048 but is 7\."),
    ("height-100000", {"height": 100000}, r"`height` must be a whole number from 8 to 2048 but is 100000\."),
    ("width-not-a-multiple-of-8", {"width": 100}, r"divisible by 8 but are 64 and 100"),
    ("steps-0", {"steps": 0}, r"`steps` must be a whole number from 1 to 200 but is 0\."),
    ("steps-negative", {"steps": -1}, r"`steps` must be a whole number from 1 to 200 but is -1\."),
    ("steps-10000", {"steps": 10000}, r"`steps` must be a whole number from 1 to 200 but is 10000\."),
    ("cfg-nan", {"guidance_scale": math.nan}, r"`guidance_scale` \(CFG\) must be a number from 0 to 50 but is nan\."),
    ("cfg-inf", {"guidance_scale": math.inf}, r"`guidance_scale` \(CFG\) must be a number from 0 to 50 but is inf\."),
    ("seed-minus-2", {"seed": -2}, r"`seed` must be -1 \(random\) or a whole number from 0 to 2\*\*63-1 .* but is -2\."),
    ("seed-2-to-the-64", {"seed": 2 ** 64}, r"`seed` must be -1 .* 2\*\*63-1 .* but is 18446744073709551616\."),
    ("seed-text", {"seed": "text"}, r"`seed` must be a whole number but is 'text'\."),
    ("batch-0", {"batch_size": 0}, r"`batch_size` must be a whole number from 1 to 16 but is 0\."),
    ("batch-1000", {"batch_size": 1000}, r"`batch_size` must be a whole number from 1 to 16 but is 1000\."),
    ("prompt-10000-characters", {"prompt": "red apple " * 1000},
     r"`prompt` is 10,000 characters long; at most 5,000 are taken"),
    ("prompt-nul", {"prompt": "red\x00apple"}, r"`prompt` holds the control character U\+0000 at position 3"),
    ("negative-prompt-escape", {"negative_prompt": "blurry \x1b[31m"},
     r"`negative_prompt` holds the control character U\+001B at position 7; prompts take text, tabs and line breaks"),
    ("sampler-unknown", {"sampler": "Nope"}, r"Unknown sampler 'Nope'\. Valid samplers: Euler, Euler a"),
    ("lora-path-in-tag", {"prompt": "red apple <lora:../../etc/passwd:1>"},
     r"No LoRA named '\.\./\.\./etc/passwd' in .* \(available: emoji-ldm-lcm, pencil\)"),
]


@pytest.mark.parametrize("change, message", [case[1:] for case in SAMPLING_CASES],
                         ids=[case[0] for case in SAMPLING_CASES])
def test_the_txt2img_handler_names_the_bad_value(served, change, message):
    app, context, _ = served
    before = output_files(context)
    with pytest.raises(gr.Error, match=message):
        list(handler(app, "txt2img")(**(TINY | change)))
    assert_nothing_partial(context, before)
    serves_next_in_process(context, before)


def test_empty_and_tab_and_newline_prompts_are_prompts(served):
    """An empty prompt is allowed (the unconditional image, as in A1111), and so are tabs and line breaks."""
    _, context, _ = served
    before = output_files(context)
    for prompt in ("", "red\tapple\r\nBREAK green"):
        assert len(context.generator.generate(Txt2ImgRequest(**(TINY | {"prompt": prompt}))).images) == 1
    assert_nothing_partial(context, before, added=2)


def test_the_img2img_handler_refuses_a_6000px_image_and_fits_a_1px_one(served):
    """Input images up to 16 megapixels of any shape are cropped and resized to the request's size; a 1×1 image
    becomes a flat colour; a larger one is refused before any work."""
    app, context, _ = served
    run = handler(app, "img2img")
    before = output_files(context)
    with pytest.raises(gr.Error, match=r"`init_image` is 6000×6000 \(36\.0 megapixels\); at most 16 megapixels"):
        list(run(**TINY, init_image=Image.new("RGB", (6000, 6000)), strength=0.5))
    assert_nothing_partial(context, before)
    *_, last = run(**TINY, init_image=Image.new("RGB", (1, 1), (0, 0, 255)), strength=0.5)
    images = [value for key, value in last.items() if isinstance(value, list) and value and isinstance(value[0], tuple)]
    assert images and len(images[0]) == 1
    assert_nothing_partial(context, before, added=1)


MODEL_CASES = [
    ("dot-dot", lambda files: str(files["models"] / ".." / files["outside"].name),
     r"is .*outside, outside the app's model folders"),
    ("relative-dot-dot", lambda files: "../../etc", r"'\.\./\.\./etc' is .*, outside the app's model folders"),
    ("absolute", lambda files: "/etc/passwd", r"'/etc/passwd' is /etc/passwd, outside the app's model folders"),
    ("symlink-out", lambda files: str(files["models"] / "escape"),
     r"escape' is .*outside, outside the app's model folders .*links out of models/ included"),
    ("ckpt", lambda files: str(files["models"] / "model.ckpt"), r"model\.ckpt is a pickled checkpoint.*--allow-pickle"),
    ("bin", lambda files: str(files["models"] / "model.bin"), r"model\.bin is a pickled checkpoint.*--allow-pickle"),
    ("corrupt-safetensors", lambda files: str(files["models"] / "corrupt.safetensors"),
     r"corrupt\.safetensors is not a readable checkpoint"),
    ("truncated-safetensors", lambda files: str(files["models"] / "truncated.safetensors"),
     r"truncated\.safetensors is not a readable checkpoint"),
    ("unknown-hub-id-offline", lambda files: "nobody/no-such-model",
     r"'nobody/no-such-model' is not in the local Hugging Face cache and cannot be downloaded \(no network\)"),
]


@pytest.mark.parametrize("spec, message", [case[1:] for case in MODEL_CASES], ids=[case[0] for case in MODEL_CASES])
def test_the_model_manager_refuses_paths_out_of_models_and_unreadable_files(served, files, spec, message):
    _, context, _ = served
    loaded = context.models.current
    before = output_files(context)
    with pytest.raises(ModelLoadError, match=message):
        context.models.load(spec(files), from_ui=True)
    assert context.models.current is loaded       # a failed load keeps the model that was there
    serves_next_in_process(context, before)


def test_png_info_clamps_a_lying_infotext_and_names_each_clamp():
    settings = infotext_to_settings(parse_infotext(MALICIOUS_INFOTEXT + ", Draft length: 0")[2])
    clamped, notes = clamp_to_request_limits(settings | {"guidance_scale": math.nan, "seed": -7})
    assert clamped == {"steps": 200, "sampler": "Euler", "width": 2048, "height": 2048, "draft_length": 1}
    assert notes == ["Steps: 99999999 is outside 1 to 200; restored as 200.",
                     "Size (width): 99999 is outside 8 to 2048; restored as 2048.",
                     "Size (height): 99999 is outside 8 to 2048; restored as 2048.",
                     "CFG scale: nan is not a number; not restored.",
                     "Draft length: 0 is outside 1 to 16; restored as 1.",
                     "Seed: -7 is outside 0 to 2**63-1; not restored."]
    Txt2ImgRequest(prompt="cat", **{key: value for key, value in clamped.items() if key != "sampler"})   # takes them


def test_unload_during_a_generation_lets_it_finish_and_the_next_load_works(served):
    """Unloading waits for the device: the generation that holds it finishes (or a stopped one keeps its finished
    images), the worker survives, the next generation says no model is loaded, and load + generate work again."""
    _, context, _ = served
    models, generator = context.models, context.generator
    spec = models.current.source.location
    before = output_files(context)
    # the device is held while the generation and then the unload are queued, so the unload is asked for while
    # the generation is in flight, in that order, with no race
    gate = threading.Event()
    holding = context.worker.submit(lambda _: gate.wait(60), kind="hold the device")
    job = generator.submit(Txt2ImgRequest(**(TINY | {"steps": 40, "preview_every": 1})))
    unloading = context.worker.submit(lambda _: models.unload(), kind="unload")
    gate.set()
    assert holding.result(timeout=60) is True
    done = job.result(timeout=120)
    unloading.result(timeout=60)
    assert not done.stopped and len(done.images) == 1 and done.images[0].steps_done == 40
    assert models.current is None
    with pytest.raises(ValueError, match="No model is loaded. Load one in the Models & memory tab"):
        generator.generate(Txt2ImgRequest(**TINY))
    models.load(spec)
    assert_nothing_partial(context, before, added=1)
    serves_next_in_process(context, output_files(context))


def test_a_request_past_the_free_memory_is_refused_before_anything_is_allocated(served, monkeypatch):
    _, context, url = served
    memory = context.models.memory
    monkeypatch.setattr(memory, "free_ram", lambda: 1 * GIB)      # (1 - 0.5 reserve) GiB / 5 GiB per megapixel
    encoder = context.models.current.pipeline.text_encoder
    encoded = []
    monkeypatch.setattr(encoder, "forward", lambda *args, **kwargs: encoded.append(1))
    before = output_files(context)
    with pytest.raises(ValueError, match=r"512×512 × batch 1 is 0\.26 megapixels at once, but with 1\.0 GiB of free "
                                         r"RAM at most 0\.10 megapixels × batch fit \(one image of at most 312×312\)"):
        context.generator.generate(Txt2ImgRequest(**(TINY | {"width": 512, "height": 512})))
    with pytest.raises(ValueError, match=r"at most 0\.10 megapixels × batch fit \(at 256×256 a batch of at most 1\)"):
        context.generator.generate(Txt2ImgRequest(**(TINY | {"width": 256, "height": 256, "batch_size": 4})))
    assert encoded == []                                           # refused before the prompt was even encoded
    answer = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "red apple", "width": 512, "height": 512})
    assert answer.status_code == 422 and "at most 0.10 megapixels × batch" in answer.json()["detail"]
    assert "largest request 0.10 MP × batch (312² px) with 1.0 GiB RAM free" in context.status_markdown()
    assert_nothing_partial(context, before)
    monkeypatch.undo()
    serves_next_in_process(context, before)


def test_the_cuda_budget_is_free_vram_plus_resident_weights_on_the_lowest_rung(monkeypatch):
    memory = MemoryManager(device="cpu")
    monkeypatch.setattr(memory, "device", torch.device("cuda"))
    monkeypatch.setattr(memory, "free_vram", lambda: 4 * GIB)
    weights = 2 * GIB
    assert largest_megapixels(mode=MemoryMode.HIGH, weights_bytes=weights, free_bytes=4 * GIB) == \
        pytest.approx((4 - 0.8 - 2) / 2.5)
    assert largest_megapixels(mode=MemoryMode.SEQUENTIAL, weights_bytes=weights, free_bytes=4 * GIB) == \
        pytest.approx((4 - 0.8) / (2.5 / 4))
    budget = memory.budget([])
    assert budget.mode is MemoryMode.SEQUENTIAL and budget.memory == "VRAM" and budget.megapixels == \
        pytest.approx(5.12)
    memory.requested_mode = "high"      # a set mode: an OOM is retried one rung lower, so that rung is the limit
    assert memory.budget([]).mode is MemoryMode.BALANCED
    with pytest.raises(ValueError, match=r"with 4\.0 GiB of free VRAM at most"):
        memory.budget([]).check(width=2048, height=2048, batch_size=16)


def test_saving_refuses_to_fill_the_disk_and_leaves_no_partial_file(served, client, monkeypatch):
    _, context, url = served
    before = output_files(context)
    margin = metadata.MIN_FREE_DISK_MB * metadata.MB
    # before the work: less than the margin free
    monkeypatch.setattr(metadata, "free_disk_bytes", lambda folder: 100 * metadata.MB)
    with pytest.raises(metadata.DiskSpaceError, match=r"Not saving: the disk holding .* has 100 MB free, and the "
                                                      r"studio keeps at least 200 MB free\. Free some space"):
        context.generator.generate(Txt2ImgRequest(**TINY))
    with pytest.raises(AppError, match=r"has 100 MB free, and the studio keeps at least 200 MB free"):
        client.predict(**TINY, api_name="/txt2img")
    saved = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "save_images": True})
    assert saved.status_code == 507 and "has 100 MB free" in saved.json()["detail"]
    unsaved = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64})
    assert unsaved.status_code == 200          # nothing is written without save_images, so nothing is checked
    # at the save: the margin is there before the work, but not once the image is added; the work is not lost
    monkeypatch.setattr(metadata, "free_disk_bytes", lambda folder: margin + 1024)
    done = context.generator.generate(Txt2ImgRequest(**(TINY | {"batch_size": 2})))
    assert [(image.finished, image.path) for image in done.images] == [(True, None), (True, None)]
    (note,) = [message for message in done.messages if message.startswith("Not saved")]
    assert re.search(r"Not saved from seed 1 on .*at least 200 MB plus the image's \d+ KB free", note)
    assert_nothing_partial(context, before)
    monkeypatch.undo()
    serves_next_in_process(context, before)


# ----------------------------------------------------------------------------- (b) the Gradio API

GRADIO_CASES = [
    ("width-0", "/txt2img", {"width": 0}, r"`width` must be a number from 64 to 2048 but is 0\."),
    ("width-negative", "/txt2img", {"width": -8}, r"`width` must be a number from 64 to 2048 but is -8\."),
    ("width-7", "/txt2img", {"width": 7}, r"`width` must be a number from 64 to 2048 but is 7\."),
    ("height-100000", "/txt2img", {"height": 100000}, r"`height` must be a number from 64 to 2048 but is 100000\."),
    ("width-not-a-multiple-of-8", "/txt2img", {"width": 100}, r"divisible by 8 but are 64 and 100"),
    ("steps-0", "/txt2img", {"steps": 0}, r"`steps` must be a number from 1 to 200 but is 0\."),
    ("steps-10000", "/txt2img", {"steps": 10000}, r"`steps` must be a number from 1 to 200 but is 10000\."),
    # JSON has no NaN or infinity (gradio_client refuses to send them); as text they are named
    ("cfg-nan-as-text", "/txt2img", {"guidance_scale": "NaN"}, r"`guidance_scale` must be a number from 1 to 20 "
                                                                r"but is 'NaN'\."),
    ("cfg-inf-as-text", "/txt2img", {"guidance_scale": "inf"}, r"`guidance_scale` must be a number .* but is 'inf'\."),
    ("seed-minus-2", "/txt2img", {"seed": -2}, r"`seed` must be -1 \(random\) or a whole number from 0 to 2\*\*63-1"),
    ("seed-2-to-the-64", "/txt2img", {"seed": 2 ** 64}, r"`seed` must be -1 .* but is 18446744073709551616\."),
    ("seed-text", "/txt2img", {"seed": "text"}, r"`seed` must be a number but is 'text'\."),
    ("batch-0", "/txt2img", {"batch_size": 0}, r"`batch_size` must be a number from 1 to 16 but is 0\."),
    ("batch-1000", "/txt2img", {"batch_size": 1000}, r"`batch_size` must be a number from 1 to 16 but is 1000\."),
    ("prompt-10000-characters", "/txt2img", {"prompt": "x" * 10000}, r"`prompt` is 10,000 characters long"),
    ("prompt-control-characters", "/txt2img", {"prompt": "red apple\x07"}, r"control character U\+0007 at position 9"),
    ("sampler-unknown", "/txt2img", {"sampler": "Nope"}, r"`sampler`: Value: Nope is not in the list of choices"),
    ("img2img-corrupt", "/img2img", {"init_image": "corrupt", "strength": 0.5},
     r"`init_image` could not be read as an image from corrupt\.png: it is damaged or not an image at all\. "),
    ("img2img-truncated", "/img2img", {"init_image": "truncated", "strength": 0.5},
     r"`init_image` could not be read as an image from truncated\.png: it is damaged or truncated\."),
    ("img2img-not-an-image", "/img2img", {"init_image": "text", "strength": 0.5},
     r"`init_image` could not be read as an image .* Upload a PNG, JPEG or WebP file\."),
    ("img2img-6000px", "/img2img", {"init_image": "huge", "strength": 0.5},
     r"`init_image` is 6000×6000 \(36\.0 megapixels\); at most 16 megapixels \(4000×4000\) are taken"),
    ("inpaint-mask-truncated", "/inpaint", {"init_image": "good", "mask": "truncated"},
     r"`mask` could not be read as an image"),
    ("controlnet-image-corrupt", "/controlnet", {"control_image": "corrupt", "model": "tiny-cn",
                                                 "preprocessor": "none"},
     r"`control_image` could not be read as an image"),
    ("png-info-truncated", "/png_info", {"path": "truncated"}, r"truncated\.png is a damaged or truncated PNG"),
    ("png-info-not-an-image", "/png_info", {"path": "text"}, r"text\.png is not a PNG image"),
    ("load-dot-dot", "/load_model", {"hub_id_or_path": "../../etc"}, r"outside the app's model folders"),
    ("load-absolute", "/load_model", {"hub_id_or_path": "/etc/passwd"},
     r"'/etc/passwd' is /etc/passwd, outside the app's model folders"),
    ("load-symlink-out", "/load_model", {"hub_id_or_path": "escape"},
     r"escape' is .*outside, outside the app's model folders"),
    ("load-ckpt", "/load_model", {"hub_id_or_path": "model.ckpt"}, r"model\.ckpt is a pickled checkpoint"),
    ("load-bin", "/load_model", {"hub_id_or_path": "model.bin"}, r"model\.bin is a pickled checkpoint"),
    ("load-hub-id-offline", "/load_model", {"hub_id_or_path": "nobody/no-such-model"},
     r"not in the local Hugging Face cache and cannot be downloaded \(no network\)"),
]
FILE_FIELDS = ("init_image", "mask", "control_image", "path")


def _gradio_arguments(api_name: str, change: dict, files: dict) -> tuple[list, dict]:
    """The call's arguments: file fields name a file of the `files` fixture, model paths are under the server's
    models/, and the generation endpoints get the tiny request's settings besides."""
    values = {name: handle_file(str(files[value])) if name in FILE_FIELDS else value for name, value in change.items()}
    if api_name == "/load_model":
        path = values["hub_id_or_path"]
        local = path not in ("/etc/passwd", "nobody/no-such-model") and not path.startswith("..")
        return [], {"hub_id_or_path": str(files["models"] / path) if local else path}
    if api_name == "/png_info":
        return [], values
    return [], TINY | values


@pytest.mark.parametrize("api_name, change, message", [case[1:] for case in GRADIO_CASES],
                         ids=[case[0] for case in GRADIO_CASES])
def test_the_gradio_api_names_the_bad_value(served, client, files, api_name, change, message):
    _, context, _ = served
    loaded = context.models.current
    before = output_files(context)
    arguments, keywords = _gradio_arguments(api_name, change, files)
    with pytest.raises(AppError, match=message):
        client.predict(*arguments, **keywords, api_name=api_name)
    assert context.models.current is loaded
    assert_nothing_partial(context, before)
    serves_next_over_gradio(client, context, before)


def test_the_gradio_api_fits_a_1px_image_and_reads_a_lying_infotext_as_text(served, client, files):
    _, context, _ = served
    before = output_files(context)
    gallery, *_ = client.predict(**TINY, init_image=handle_file(str(files["one"])), strength=0.5, api_name="/img2img")
    assert Image.open(gallery[0]["image"]).size == (64, 64)
    text, details, _ = client.predict(handle_file(str(files["malicious"])), api_name="/png_info")
    assert text == MALICIOUS_INFOTEXT and details is None        # read and shown; restoring it clamps (above)
    assert_nothing_partial(context, before, added=1)


@pytest.mark.slow
def test_unload_during_a_gradio_generation_then_load_and_generate(served, client, files):
    _, context, _ = served
    before = output_files(context)
    job = client.submit(**(TINY | {"steps": 40, "preview_every": 1}), api_name="/txt2img")
    next(iter(job))          # its first output comes once the job is on the device worker, ahead of the unload
    status, _ = client.predict(api_name="/unload_model")
    assert "No model loaded" in status
    gallery, _, job_status, *_ = job.result()
    assert len(gallery) == 1 and "Seed 1 · 1 image(s)" in job_status
    with pytest.raises(AppError, match="No model is loaded"):
        client.predict(**TINY, api_name="/txt2img")
    client.predict("embedded", str(files["models"] / "tiny-copy"), api_name="/load_model")
    assert context.models.current.name == "tiny-copy"
    assert_nothing_partial(context, before, added=1)
    serves_next_over_gradio(client, context, output_files(context))


# ----------------------------------------------------------------------------- (c) the REST API

REST_CASES = [
    ("width-0", "txt2img", {"width": 0}, r"`width` must be a whole number from 8 to 2048 but is 0\."),
    ("width-negative", "txt2img", {"width": -8}, r"`width` must be a whole number from 8 to 2048 but is -8\."),
    ("width-7", "txt2img", {"width": 7}, r"`width` must be a whole number from 8 to 2048 but is 7\."),
    ("height-100000", "txt2img", {"height": 100000}, r"`height` must be a whole number from 8 to 2048 but is 100000"),
    ("steps-0", "txt2img", {"steps": 0}, r"`steps` must be a whole number from 1 to 200 but is 0\."),
    ("steps-negative", "txt2img", {"steps": -1}, r"`steps` must be a whole number from 1 to 200 but is -1\."),
    ("steps-10000", "txt2img", {"steps": 10000}, r"`steps` must be a whole number from 1 to 200 but is 10000\."),
    ("cfg-nan", "txt2img", {"cfg_scale": math.nan}, r"`cfg_scale` \(CFG\) must be a number from 0 to 50 but is nan\."),
    ("cfg-inf", "txt2img", {"cfg_scale": math.inf}, r"`cfg_scale` \(CFG\) must be a number from 0 to 50 but is inf\."),
    ("seed-minus-2", "txt2img", {"seed": -2}, r"`seed` must be -1 \(random\) or a whole number from 0 to 2\*\*63-1"),
    ("seed-2-to-the-64", "txt2img", {"seed": 2 ** 64}, r"`seed` must be -1 .* but is 18446744073709551616\."),
    ("seed-text", "txt2img", {"seed": "text"}, r"`seed`: Input should be a valid integer.* \(it is 'text'\)"),
    ("batch-0", "txt2img", {"batch_size": 0}, r"`batch_size` must be a whole number from 1 to 16 but is 0\."),
    ("batch-1000", "txt2img", {"batch_size": 1000}, r"`batch_size` must be a whole number from 1 to 16 but is 1000"),
    ("n-iter-1000", "txt2img", {"n_iter": 1000}, r"`n_iter` must be a whole number from 1 to 100 but is 1000\."),
    ("prompt-10000-characters", "txt2img", {"prompt": "y" * 10000}, r"`prompt` is 10,000 characters long"),
    ("prompt-control-characters", "txt2img", {"prompt": "\x1b[1mred apple"}, r"control character U\+001B at position 0"),
    ("sampler-unknown", "txt2img", {"sampler_name": "Nope"}, r"Unknown sampler 'Nope'\. Valid samplers: Euler"),
    ("img2img-corrupt", "img2img", {"init_images": ["corrupt"]},
     r"`init_images\[0\]` could not be read as an image \(UnidentifiedImageError\)"),
    ("img2img-truncated", "img2img", {"init_images": ["truncated"]},
     r"`init_images\[0\]` could not be read as an image \(OSError\)"),
    ("img2img-not-an-image", "img2img", {"init_images": ["text"]}, r"`init_images\[0\]` could not be read as an image"),
    ("img2img-6000px", "img2img", {"init_images": ["huge"]},
     r"`init_images\[0\]` is 6000×6000 \(36\.0 megapixels\); at most 16 megapixels"),
    ("png-info-truncated", "png-info", {"image": "truncated"}, r"is a damaged or truncated PNG"),
    ("png-info-not-an-image", "png-info", {"image": "text"}, r"is not a PNG image"),
    ("options-dot-dot", "options", {"sd_model_checkpoint": "../outside"},
     r"No checkpoint '\.\./outside'; GET /sdapi/v1/sd-models lists them: embedded"),
    ("options-absolute", "options", {"sd_model_checkpoint": "/etc/passwd"}, r"No checkpoint '/etc/passwd'"),
    # bug 2: the size is refused before the input is resized to it; bug 13: png-info caps before PIL decodes
    ("img2img-width-4096", "img2img", {"init_images": ["good"], "width": 4096},
     r"`width` must be a whole number from 8 to 2048 but is 4096\."),
    ("png-info-6000px", "png-info", {"image": "huge"},
     r"`image` is 6000×6000 \(36\.0 megapixels\); at most 16 megapixels"),
]


@pytest.mark.parametrize("route, change, message", [case[1:] for case in REST_CASES],
                         ids=[case[0] for case in REST_CASES])
def test_the_rest_api_answers_422_naming_the_bad_value(served, files, route, change, message):
    _, context, url = served
    loaded = context.models.current
    before = output_files(context)
    if route in ("txt2img", "img2img"):
        body = {"prompt": "red apple", "steps": 2, "width": 64, "height": 64, "save_images": True} | change
    else:
        body = dict(change)
    if "init_images" in body:
        body["init_images"] = [base64_of(files[name]) for name in body["init_images"]]
    if route == "png-info":
        body["image"] = base64_of(files[body["image"]])
    # as Python's json writes it: NaN and Infinity as bare words (requests' `json=` refuses them)
    answer = requests.post(f"{url}/sdapi/v1/{route}", data=json.dumps(body),
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 422, answer.text[:300]
    assert re.search(message, answer.json()["detail"]), answer.json()["detail"]
    assert context.models.current is loaded
    assert_nothing_partial(context, before)
    serves_next_over_rest(url, context, before)


def test_the_rest_api_fits_a_1px_image_and_reports_a_lying_infotext_as_written(served, files):
    """As A1111's: png-info reports the infotext as it is written (restoring it is the client's; the studio's own
    restore clamps), and an img2img input of any size up to 16 megapixels is resized to the request's size."""
    _, context, url = served
    before = output_files(context)
    answer = requests.post(f"{url}/sdapi/v1/png-info", json={"image": base64_of(files["malicious"])})
    assert answer.status_code == 200
    assert answer.json()["parameters"]["Steps"] == "99999999" and answer.json()["info"] == MALICIOUS_INFOTEXT
    answer = requests.post(f"{url}/sdapi/v1/img2img", json={"prompt": "red apple", "steps": 2, "width": 64,
                                                             "height": 64, "init_images": [base64_of(files["one"])],
                                                             "save_images": True})
    assert answer.status_code == 200, answer.text
    assert Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).size == (64, 64)
    assert_nothing_partial(context, before, added=1)
