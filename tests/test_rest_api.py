"""The AUTOMATIC1111-compatible REST API (`launch.py --api`), driven by a client we did not write: `webuiapi`."""

from __future__ import annotations

import base64
import functools
import io
import queue
import re
import shutil
import socket
import struct
import threading
import zlib

import numpy as np
import pytest
import requests
import webuiapi
from fastapi.openapi.utils import get_openapi
from PIL import Image, ImageFile

import launch
from pipelines.core.checks import MAX_INPUT_PIXELS, MAX_SIDE
from pipelines.core.results import Preview
from pipelines.core.samplers import SAMPLER_NAMES
from pipelines.generation.generator import Generator
from pipelines.io.metadata import parse_infotext
from pipelines.tasks.controlnet import ControlNetRequest
from pipelines.tasks.txt2img import Txt2ImgRequest
from studio import a1111


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(tiny_model_dir, tmp_path_factory, *flags):
    """The studio as `python launch.py --api ...` starts it, on the tiny model, with its models/ in a tmp folder
    (a copy of the tiny model as `tiny-copy`, a LoRA file, the tiny ControlNet as `tiny-cn`)."""
    from recipe.tiny import build_tiny_controlnet

    outputs, models = tmp_path_factory.mktemp("outputs"), tmp_path_factory.mktemp("models")
    args = launch.parse_args(["--model", str(tiny_model_dir), "--device", "cpu", "--outputs", str(outputs),
                              "--port", str(free_port()), "--api", *flags])
    app, context = launch.build(args)
    context.models.models_dir = models
    shutil.copytree(tiny_model_dir, models / "tiny-copy")
    (models / "lora").mkdir()
    (models / "lora" / "pencil.safetensors").write_bytes(b"listed, never loaded here")
    build_tiny_controlnet(context.models.current.pipeline.unet).save_pretrained(models / "controlnet" / "tiny-cn")
    launch.start(app, context, args)
    return app, context, args


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    app, context, args = _serve(tiny_model_dir, tmp_path_factory)
    yield args.port, context
    app.close()


@pytest.fixture
def api(server):
    port, _ = server
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=6)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _control_image() -> Image.Image:
    control = Image.new("RGB", (64, 64), "black")
    control.paste((255, 255, 255), (20, 10, 44, 54))
    return control


def test_txt2img_answers_as_a1111_and_matches_the_studios_own_generation(api, server):
    _, context = server
    saved_before = set(context.outputs_dir.rglob("*.png"))
    result = api.txt2img(prompt="red apple", seed=99, width=64, height=64, cfg_scale=5.0, batch_size=2)
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert result.info["seed"] == 99 and result.info["all_seeds"] == [99, 100]
    assert result.info["sampler_name"] == "Euler a" and result.info["steps"] == 6
    assert result.parameters["prompt"] == "red apple" and result.parameters["cfg_scale"] == 5.0
    _, _, params = parse_infotext(result.info["infotexts"][1])
    assert params["Seed"] == "100" and params["Sampler"] == "Euler a" and params["Size"] == "64x64"
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]   # each PNG carries its infotext
    assert set(context.outputs_dir.rglob("*.png")) == saved_before              # A1111's API saves only when asked
    # the same generation through the studio's own service gives the same pixels
    own = Generator(context.models, None).generate(Txt2ImgRequest(
        prompt="red apple", sampler="Euler a", steps=6, guidance_scale=5.0, seed=99, width=64, height=64,
        batch_size=2))
    for served, made in zip(result.images, own.images):
        assert np.array_equal(_pixels(served), _pixels(made.image))
    assert _pixels(result.images[0]).std() > 2.0

    saved = api.txt2img(prompt="red apple", seed=7, width=64, height=64, save_images=True)
    assert len(set(context.outputs_dir.rglob("*-7.png")) - saved_before) == 1
    assert saved.images[0].info["parameters"] == saved.info["infotexts"][0]


def test_img2img_and_inpainting_with_a1111_fields(api):
    start = api.txt2img(prompt="red apple", seed=3, width=64, height=64).image
    moved = api.img2img(images=[start], prompt="green apple", denoising_strength=0.5, seed=4, width=64, height=64)
    assert moved.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in moved.info["infotexts"][0]
    assert not np.array_equal(_pixels(moved.image), _pixels(start))

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    painted = api.img2img(images=[start], mask_image=mask, prompt="sunglasses", seed=5, width=64, height=64,
                          denoising_strength=1.0, mask_blur=4, inpainting_fill=2, inpaint_full_res=False,
                          inpainting_mask_invert=0)
    assert painted.image.size == (64, 64)
    _, _, params = parse_infotext(painted.info["infotexts"][0])
    assert params["Mask blur"] == "4" and params["Masked content"] == "latent noise"
    before, after = _pixels(start), _pixels(painted.image)
    far = np.ones((64, 64), bool)
    far[24 - 5:40 + 5, 24 - 5:40 + 5] = False            # beyond the mask and its blur: the input, bit for bit
    assert np.array_equal(before[far], after[far])
    assert np.abs(before[28:36, 28:36] - after[28:36, 28:36]).mean() > 2.0


def test_options_read_and_switch_the_model(api, server):
    _, context = server
    titles = [model["title"] for model in api.get_sd_models()]
    assert {"embedded", "tiny-copy", "tiny-sd"} <= set(titles)
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sd" == api.util_get_current_model()
    api.set_options({"sd_model_checkpoint": "tiny-copy"})
    assert api.get_options()["sd_model_checkpoint"] == "tiny-copy"
    assert context.models.current.source.location.endswith("tiny-copy")
    assert api.txt2img(prompt="red apple", seed=1, width=64, height=64).info["sd_model_name"] == "tiny-copy"
    refused = api.set_options({"sd_model_checkpoint": "nope"})     # webuiapi hands back the JSON as it is
    assert refused["error"] == "ValueError" and "No checkpoint 'nope'" in refused["detail"]
    assert api.get_options()["sd_model_checkpoint"] == "tiny-copy"
    api.util_set_model("tiny-sd")                     # back to the model named at launch (outside models/)
    assert context.models.current.source.location.endswith("tiny-sd")
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sd"


def test_progress_and_interrupt_during_a_generation_queued_with_the_page(api, server, monkeypatch):
    from gradio_client import Client

    port, context = server
    submitted: queue.Queue = queue.Queue()
    submit = Generator.submit

    def recorded(self, request, **options):
        job = submit(self, request, **options)
        submitted.put(job)
        return job
    monkeypatch.setattr(Generator, "submit", recorded)

    answers: dict = {}
    long = threading.Thread(target=lambda: answers.update(result=api.txt2img(
        prompt="a cat", steps=200, n_iter=100, seed=5, width=64, height=64)))
    long.start()
    try:
        job = submitted.get(timeout=120)
        first = next(event for event in job.events() if isinstance(event, Preview))    # the job runs, a preview exists

        progress = api.get_progress()
        assert 0 < progress["progress"] < 1 and progress["state"]["job_count"] == 100
        assert progress["state"]["sampling_steps"] == 200 and progress["state"]["sampling_step"] >= first.step
        assert progress["state"]["job_id"] == job.id and not progress["state"]["interrupted"]
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert preview.size == (64, 64)

        # a page's generation asked for meanwhile waits for the REST one: one device, one queue
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        page = client.submit(prompt="red apple", steps=4, seed=6, preview_every=0, api_name="/txt2img")
        page_job = next(iter(page))[3]
        assert client.predict(job_id=page_job, api_name="/job")["state"] == "queued"

        api.interrupt()
        long.join(timeout=120)
        result = answers["result"]
        assert any("Stopped" in message for message in result.info["messages"])
        assert len(result.images) >= 1 and "Stopped at step" in result.info["infotexts"][-1]
        assert "Seed 6" in page.result()[2]                               # the page's generation ran after it
        assert api.get_progress()["state"]["job_count"] in (0, 1)         # nothing of the REST job's is left running
    finally:     # a failure above must not leave 100 batches of 200 steps on the module's shared device
        if long.is_alive():
            api.interrupt()
            long.join(timeout=120)


def test_png_info_and_the_lists(api, server):
    made = api.txt2img(prompt="red apple", seed=42, width=64, height=64)
    read = api.png_info(made.image)
    assert read.info == made.info["infotexts"][0]
    assert read.json["parameters"]["Seed"] == "42" and read.json["parameters"]["Size-1"] == "64"
    assert read.json["parameters"]["Prompt"] == "red apple"
    assert read.json["items"]["studio"]["request"]["seed"] == 42
    assert [sampler["name"] for sampler in api.get_samplers()] == list(SAMPLER_NAMES)
    assert {"automatic", "karras"} <= {schedule["name"] for schedule in api.get_schedulers()}
    assert [lora["name"] for lora in api.get_loras()] == ["emoji-ldm-lcm", "pencil"]   # the shipped LCM-LoRA too
    assert "tiny-cn" in api.controlnet_model_list()


def test_a_controlnet_unit_from_webuiapi_steers_as_the_studios_controlnet_does(api, server):
    _, context = server
    control = _control_image()
    unit = webuiapi.ControlNetUnit(image=control, module="invert (from white bg & black line)",
                                   model="tiny-cn [0123abcd]", weight=0.8, guidance_start=0.0, guidance_end=1.0,
                                   control_mode=1, resize_mode="Crop and Resize", pixel_perfect=True)
    off = webuiapi.ControlNetUnit(image=control, module="canny", model="tiny-cn", enabled=False)
    result = api.txt2img(prompt="red apple", seed=21, steps=4, width=64, height=64, controlnet_units=[unit, off])
    infotext = result.info["infotexts"][0]
    assert 'ControlNet 0: "Module: invert, Model: tiny-cn' in infotext and "ControlNet 1" not in infotext
    assert "Control Mode: My prompt is more important" in infotext and "Weight: 0.8" in infotext

    own = Generator(context.models, None).generate(ControlNetRequest(
        prompt="red apple", sampler="Euler a", steps=4, seed=21, guidance_scale=7.0, width=64, height=64,
        control_image=control, preprocessor="invert", model="tiny-cn", weight=0.8,
        control_mode="my prompt is more important", resize_mode="crop and resize", pixel_perfect=True))
    assert np.array_equal(_pixels(result.image), _pixels(own.images[0].image))
    # the plain image from the studio itself: webuiapi's txt2img keeps the units of its last call in its mutable
    # default `alwayson_scripts`, so a second webuiapi call would still carry this one's ControlNet
    plain = Generator(context.models, None).generate(Txt2ImgRequest(
        prompt="red apple", sampler="Euler a", steps=4, seed=21, guidance_scale=7.0, width=64, height=64))
    assert np.abs(_pixels(result.image) - _pixels(plain.images[0].image)).mean() > 2.0


def test_bad_input_gets_a_4xx_naming_the_value_and_the_server_keeps_serving(api, server):
    port, _ = server
    cases = [({"steps": -1}, r"`steps`.*-1"), ({"sampler_name": "Nope"}, r"Unknown sampler 'Nope'"),
             ({"seed": "text"}, r"`seed`.*'text'"), ({"enable_hr": True}, r"`enable_hr`.*Hires fix"),
             ({"alwayson_scripts": {"ADetailer": {"args": []}}}, r"always on script 'ADetailer' not found"),
             ({"alwayson_scripts": {"controlnet": {"args": [{"image": "", "model": "tiny-cn", "module": "sobel"}]}}},
              r"unit 0.*`module` 'sobel'")]
    for change, message in cases:
        answer = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img",
                               json={"prompt": "red apple", "width": 64, "height": 64, **change})
        assert answer.status_code == 422, (change, answer.text)
        body = answer.json()
        assert set(body) >= {"error", "detail"}
        assert re.search(message, body["detail"]), (change, body["detail"])
    with pytest.raises(RuntimeError, match=r"422.*`init_images\[0\]`.*not base64!"):
        api.custom_post("img2img", baseurl=True, payload={"init_images": ["not base64!"], "prompt": "red apple"})
    with pytest.raises(RuntimeError, match=r"422.*not a PNG"):
        api.custom_post("png-info", baseurl=True, payload={"image": base64.b64encode(b"GIF89a not really").decode()})
    assert len(api.txt2img(prompt="red apple", seed=2, width=64, height=64).images) == 1   # still serving


def test_auth_protects_the_rest_api(tiny_model_dir, tmp_path_factory):
    """Every route the REST API serves (read from the FastAPI app, so that a new route is covered without editing
    this test) answers 401 without credentials and with wrong ones, and lets the right ones through."""
    app, context, args = _serve(tiny_model_dir, tmp_path_factory, "--auth", "ada:secret")
    try:
        base = f"http://127.0.0.1:{args.port}"
        # FastAPI's own listing of what it serves (it wraps included routers, so `app.routes` does not show them)
        served = get_openapi(title="studio", version="0", routes=app.server_app.routes)["paths"]
        routes = [(path, method.upper()) for path, operations in served.items()
                  if path.startswith(("/sdapi/v1/", "/controlnet/")) for method in operations]
        assert {("/sdapi/v1/txt2img", "POST"), ("/sdapi/v1/img2img", "POST"), ("/sdapi/v1/options", "GET"),
                ("/sdapi/v1/options", "POST"), ("/controlnet/model_list", "GET")} <= set(routes)
        for path, method in routes:
            # a body no route acts on (generation refuses `steps` 0), so that the right credentials run nothing
            send = {"json": {"steps": 0}} if method == "POST" else {}
            refused = requests.request(method, base + path, **send)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Basic", (path, method)
            assert "Incorrect username or password" in refused.json()["detail"], (path, method)
            wrong = requests.request(method, base + path, auth=("ada", "wrong"), **send)
            assert wrong.status_code == 401, (path, method)
            assert requests.request(method, base + path, auth=("eve", "secret"), **send).status_code == 401
            right = requests.request(method, base + path, auth=("ada", "secret"), **send)
            assert right.status_code != 401 and right.status_code < 500, (path, method, right.text[:300])
        client = webuiapi.WebUIApi(host="127.0.0.1", port=args.port, username="ada", password="secret", steps=3)
        assert len(client.txt2img(prompt="red apple", width=64, height=64).images) == 1
        # bug 11: with --auth a job belongs to the user (as the page's do), so only the user's are interrupted
        assert {job.owner for job in context.worker.jobs(active=False)} == {"user:ada"}
    finally:
        app.close()


def test_the_a1111_translation_of_units_and_samplers():
    units, _ = a1111.controlnet_units({"ControlNet": {"args": [
        {"input_image": "x", "model": "tiny-cn", "control_mode": 2, "resize_mode": 0, "guidance": 0.5},
        {"image": "x", "model": "tiny-cn", "enabled": False}, None]}})
    assert len(units) == 1
    assert units[0]["control_mode"] == "controlnet is more important" and units[0]["resize_mode"] == "just resize"
    assert units[0]["end"] == 0.5 and units[0]["image"] == "x" and units[0]["preprocessor"] == "none"
    assert a1111.resolve_sampler("DPM++ 2M", "automatic") == "DPM++ 2M Karras"     # A1111 >= 1.9's default
    assert a1111.resolve_sampler("DPM++ 2M", None) == "DPM++ 2M"                    # older clients' meaning
    assert a1111.resolve_sampler("DPM++ 2M", "Karras") == "DPM++ 2M Karras"
    assert a1111.resolve_sampler("PLMS", "automatic") == "PNDM"
    assert a1111.resolve_sampler(None, None) == "Euler"
    with pytest.raises(ValueError, match="Unknown `scheduler` 'exponential'"):
        a1111.resolve_sampler("Euler", "Exponential")
    with pytest.raises(ValueError, match="`sampler_name` 'Heun' has no Karras schedule"):
        a1111.resolve_sampler("Heun", "karras")
    assert a1111.in_a1111_terms("`guidance_scale` (CFG) must be") == "`cfg_scale` (CFG) must be"
    assert a1111.resolve_sampler("DPM++ 2M", "align_your_steps") == "DPM++ 2M"    # the schedule is ours, below
    body = {"prompt": "x", "steps": 10, "cfg_scale": 7.0, "seed": 1, "batch_size": 1, "n_iter": 1,
            "sampler_name": "DPM++ 2M", "scheduler": "align_your_steps"}
    assert a1111.generation_request(body, img2img=False, native_side=64, preview_every=0).request.schedule == \
        "Align Your Steps"


# ----------------------------------------------------------------------------- sizes checked before pixels


def _base64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _unit(image: str | None) -> dict:
    return {"alwayson_scripts": {"controlnet": {"args": [{"image": image, "module": "none", "model": "tiny-cn"}]}}}


SMALL = _base64_png(Image.new("RGB", (64, 64), (200, 30, 30)))
SMALL_MASK = _base64_png(Image.new("L", (64, 64), 255))
# What each route is sent besides the size: every way an image reaches a request
SIZE_ROUTES = {
    "txt2img": ("txt2img", {}),
    "txt2img-controlnet": ("txt2img", _unit(SMALL)),
    "img2img-just-resize": ("img2img", {"init_images": [SMALL], "resize_mode": 0}),
    "img2img-crop-and-resize": ("img2img", {"init_images": [SMALL], "resize_mode": 1}),
    "img2img-controlnet": ("img2img", {"init_images": [SMALL]} | _unit(None)),
    "inpaint-whole-picture": ("img2img", {"init_images": [SMALL], "mask": SMALL_MASK, "inpaint_full_res": False}),
    "inpaint-only-masked": ("img2img", {"init_images": [SMALL], "mask": SMALL_MASK, "inpaint_full_res": True}),
}


@pytest.mark.parametrize("route, extra", list(SIZE_ROUTES.values()), ids=list(SIZE_ROUTES))
def test_a_size_past_the_limit_is_refused_before_any_image_is_resized_to_it(server, monkeypatch, route, extra):
    """Bug 2: A1111's img2img resized the input to the request's width × height before the size was checked (a
    50000×50000 request took 47 s and 9.3 GB before its 422). 4096 is past the 2048 limit yet cheap to resize to,
    so the spy on PIL's resize shows the order without the cost."""
    port, _ = server
    resized_to: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def recorded(image, size, *args, **kwargs):
        resized_to.append(tuple(size))
        return resize(image, size, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "resize", recorded)

    answer = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/{route}",
                           json={"prompt": "red apple", "steps": 2, "width": 4096, "height": 4096} | extra)
    assert answer.status_code == 422, answer.text[:300]
    assert re.search(r"`width` must be a whole number from 8 to 2048 but is 4096\.", answer.json()["detail"])
    assert [size for size in resized_to if max(size) > MAX_SIDE] == []


@functools.cache
def _bomb(side: int, *, text_first: bool = False) -> str:
    """A valid black PNG of side × side one-bit pixels, written chunk by chunk so that the test never holds its
    pixels: zlib packs the rows of zeros into a few KB, while the header declares the whole size. `text_first`
    puts a text chunk before the header, which PIL reads all the same (so the header is not at a fixed place)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = bytes(1 + (side + 7) // 8)                  # filter byte 0, then the row's bits
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)       # bit depth 1, greyscale
    text = chunk(b"tEXt", b"parameters\x00red apple") if text_first else b""
    png = b"\x89PNG\r\n\x1a\n" + text + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


# Where a base64 image enters: the route, and the body with the bomb in that place
BOMB_PLACES = {
    "init-image": ("img2img", lambda bomb: {"init_images": [bomb]}),
    "mask": ("img2img", lambda bomb: {"init_images": [SMALL], "mask": bomb, "inpaint_full_res": False}),
    "controlnet-unit-image": ("txt2img", lambda bomb: _unit(bomb)),
    "png-info": ("png-info", lambda bomb: {"image": bomb}),
    "png-info-text-first": ("png-info", lambda bomb: {"image": bomb}),
}


@pytest.mark.parametrize("side", [6000, 20000])
@pytest.mark.parametrize("route, body", list(BOMB_PLACES.values()), ids=list(BOMB_PLACES))
def test_a_base64_decompression_bomb_is_refused_by_its_header_before_it_is_decoded(server, monkeypatch, route, body,
                                                                                   side):
    """Bug 13 (API half): base64 images were decoded before their size was checked, so a few KB could declare
    gigabytes of pixels. 6000×6000 is past the studio's 16-megapixel cap but under PIL's own bomb limit (89
    megapixels warned, 179 refused), so only the studio's cap can refuse it before decoding; 20000×20000 is past
    PIL's too (PIL refuses it without naming a limit the client can meet), and the answer must still name the
    studio's cap. A spy on PIL's decoding shows that nothing that large is decoded."""
    port, _ = server
    decoded: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def recorded(image):
        if image.size[0] * image.size[1] > MAX_INPUT_PIXELS:
            decoded.append(image.size)
        return load(image)
    monkeypatch.setattr(ImageFile.ImageFile, "load", recorded)

    url = f"http://127.0.0.1:{port}/sdapi/v1"
    payload = body(_bomb(side, text_first=body is BOMB_PLACES["png-info-text-first"][1]))
    if route != "png-info":
        payload |= {"prompt": "red apple", "steps": 2, "width": 64, "height": 64}
    answer = requests.post(f"{url}/{route}", json=payload)
    assert answer.status_code == 422, answer.text[:300]
    assert re.search(r"at most 16(\.\d+)? megapixels", answer.json()["detail"]), answer.json()["detail"]
    assert decoded == []
    served = requests.post(f"{url}/txt2img", json={"prompt": "red apple", "steps": 2, "width": 64, "height": 64})
    assert served.status_code == 200 and len(served.json()["images"]) == 1
