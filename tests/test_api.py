"""The public Gradio API as a script sees it: readable parameter names, and every endpoint answering with only
what it cannot do without."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
from PIL import Image

from tests.test_server import client, server  # noqa: F401  (the launched studio, tiny model; an API client)


def test_the_forward_process_has_an_endpoint_with_the_plots_numbers(client, tmp_path):  # noqa: F811
    from gradio_client import handle_file

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "x0.png")
    parameters = {p["parameter_name"]: p for p in
                  client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/explorer_forward"][
                      "parameters"]}
    assert list(parameters) == ["image", "schedule", "T", "t", "seed"]
    pixel, latent, caption, numbers = client.predict(image=handle_file(str(tmp_path / "x0.png")), schedule="cosine",
                                                     T=100, t=99, api_name="/explorer_forward")
    assert Image.open(pixel).width == Image.open(pixel).height >= 64 and "t = 99" in caption.replace("t=", "t = ")
    curve = numbers["schedules"]["cosine"]
    assert len(curve["betas"]) == len(curve["alphas_cumprod"]) == 100 and numbers["t"] == 99
    abar = curve["alphas_cumprod"][99]
    assert abs(numbers["signal_coefficient"] ** 2 - abar) < 1e-9 and abs(numbers["noise_coefficient"] ** 2 - (1 - abar)) < 1e-9
    assert np.all(np.diff(curve["alphas_cumprod"]) < 0)          # ᾱ_t falls with t
    # flow matching's x_t = (1 − t)·x_0 + t·ε: its coefficients at step 29 of 100 (t = 0.3)
    _, _, caption, numbers = client.predict(image=handle_file(str(tmp_path / "x0.png")), schedule="flow matching",
                                            T=100, t=29, seed=0, api_name="/explorer_forward")
    assert caption.startswith("**flow matching**, step 29 of T = 100: flow matching: x_t = (1 − t)·x_0 + t·ε")
    assert numbers["signal_coefficient"] == pytest.approx(0.7, abs=1e-12)
    assert numbers["noise_coefficient"] == pytest.approx(0.3, abs=1e-12)


# ----------------------------------------------------------------------------- every public endpoint

# What a call may be required to pass: what the task cannot do without (and the job a job endpoint is about)
REQUIRABLE = {"prompt", "image", "init_image", "mask", "control_image", "images", "path", "job_id",
              "identifier", "class_prompt",  # DreamBooth's: what it learns, and what it keeps
              "name", "settings"}     # a training preset's (what /save_training_preset saves, and under which name)
# Parameters that count something: the API must take them as whole numbers
WHOLE_NUMBERS = {"T", "t", "size", "rank", "left", "right", "top", "bottom", "overlap", "mask_blur",
                 "only_masked_padding", "processor_resolution"}
PROMPT = "red apple"


def _whole_number_fields() -> set[str]:
    """The int fields of every request the endpoints build (steps, width, seed, batch_size, …)."""
    import typing
    from dataclasses import fields

    from pipelines.tasks import TASKS
    from pipelines.training.loop import TrainingRequest

    classes = [task.request_class for task in TASKS.values()] + [TrainingRequest]
    return {item.name for request_class in classes for item in fields(request_class)
            if typing.get_type_hints(request_class).get(item.name) is int}


def _endpoints(api) -> dict:
    return api.view_api(return_format="dict", print_info=False)["named_endpoints"]


def test_every_public_endpoint_has_readable_typed_parameters_and_labelled_outputs(client):  # noqa: F811
    endpoints = _endpoints(client)
    whole = _whole_number_fields() | WHOLE_NUMBERS
    assert {"steps", "width", "height", "seed", "batch_size", "batch_count"} <= whole
    for name, endpoint in endpoints.items():
        for parameter in endpoint["parameters"]:
            where = f"{name} parameter {parameter['parameter_name']!r} ({parameter['label']})"
            assert re.fullmatch(r"[A-Za-z]+(_[a-z]+)*", parameter["parameter_name"]), f"{where}: not a readable name"
            assert not re.fullmatch(r"(param|parameter|value)_\d+|.*_value", parameter["parameter_name"]), where
            assert not re.fullmatch(r"parameter_\d+", parameter["label"]), f"{where}: no label"
            if parameter["parameter_name"] in whole:
                assert parameter["type"].get("type") == "integer", f"{where}: a count, but typed {parameter['type']}"
        for output in endpoint["returns"]:
            assert not re.fullmatch(r"value_\d+|\d+(st|nd|rd|th)", output["label"]), \
                f"{name} returns an unlabelled {output['component']}"


def test_the_readme_shows_a_call_of_every_public_endpoint(client):  # noqa: F811
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    scripting = readme[readme.index("## Scripting it"):].split("\n## ")[0]
    shown = set(re.findall(r'api_name="(/\w+)"', scripting))
    assert shown == set(_endpoints(client)), "README's Scripting it and the served endpoints differ"


def _png(path, pixels: np.ndarray) -> str:
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.mark.slow
def test_every_public_endpoint_answers_with_only_its_required_arguments(server, client, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    """Each endpoint the server lists is called with what it requires and nothing else, on the tiny model; the
    embedded model is loaded for /controlnet, whose default unit's model is a shipped ControlNet made for it."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from pipelines.io.metadata import parse_infotext
    from pipelines.training.request import LossPoint

    _, context = server
    monkeypatch.setattr(context.models, "models_dir", tmp_path / "models")   # the trained LoRA lands here
    endpoints = _endpoints(client)
    rng = np.random.default_rng(0)
    scribble = np.full((64, 64, 3), 255, dtype=np.uint8)
    scribble[16:48, 30:34] = 0
    centre = np.zeros((64, 64), dtype=np.uint8)
    centre[24:40, 24:40] = 255
    arguments = {"prompt": PROMPT, "control_image": handle_file(_png(tmp_path / "scribble.png", scribble)),
                 "mask": handle_file(_png(tmp_path / "mask.png", centre)),
                 "images": [handle_file(_png(tmp_path / f"square-{i}.png", rng.integers(0, 255, (64, 64, 3),
                                                                                          dtype=np.uint8)))
                            for i in range(4)],
                 "name": "api-preset", "settings": {"steps": 20, "rank": 4},
                 "identifier": "sks square", "class_prompt": "square"}
    made = {}     # what /txt2img made: the job id, the image (a PNG with parameters), its infotext

    def image(path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"))

    def generated(out) -> None:
        assert len(out["Images"]) == 1 and image(out["Images"][0]["image"]).std() > 2.0
        assert "Seed" in parse_infotext(out["Generation parameters"])[2] and out["Job id"]

    def txt2img(out) -> None:
        generated(out)
        made.update(job_id=out["Job id"], infotext=out["Generation parameters"])
        seed = parse_infotext(made["infotext"])[2]["Seed"]       # saved as <counter>-<seed>.png
        made["image"] = sorted(context.outputs_dir.rglob(f"*-{seed}.png"))[-1]
        arguments["image"] = arguments["init_image"] = arguments["path"] = handle_file(str(made["image"]))
        arguments["job_id"] = made["job_id"]

    def inpaint(out) -> None:
        generated(out)
        far = np.ones((64, 64), dtype=bool)
        far[16:48, 16:48] = False         # farther from the mask than its blur (4 px) and the latent cells
        assert np.array_equal(image(out["Images"][0]["image"])[far], image(made["image"])[far])

    def controlnet(out) -> None:
        generated(out)
        assert "ControlNet 0" in out["Generation parameters"]

    def train_lora(out) -> None:
        assert out["Result"]["file"] == "models/lora/my-lora.safetensors" and out["Result"]["steps"] > 0
        assert out["Result"]["stopped"] and stopped_at and out["Result"]["steps"] >= stopped_at[0]
        assert (tmp_path / "models" / "lora" / "my-lora.safetensors").exists() and "Saved" in out["Status"]

    def png_info(out) -> None:
        assert out["Parameters"] == made["infotext"]
        assert out["Full request and library versions (this studio's PNGs only)"]["request"]["prompt"] == PROMPT

    def explorer_forward(out) -> None:
        pixel = image(out["x_t in pixel space"])
        assert pixel.shape[0] == pixel.shape[1] >= 64
        numbers = out["Schedules: beta_t, abar_t, log-SNR per t; the coefficients at t"]
        assert abs(numbers["signal_coefficient"] ** 2 + numbers["noise_coefficient"] ** 2 - 1) < 1e-9

    def explorer_record(out) -> None:
        assert "Recorded" in out["Status"] and image(out["Final image"]).std() > 2.0
        assert image(out["x_t (what the UNet sees)"]).shape == image(out["Final image"]).shape

    def explorer_speculative(out) -> None:
        rows = out["Rounds"]["value"]["data"]
        assert rows and len(out["The image after each round"]) == len(rows) and "Seed" in out["Summary"]

    def compare_guidance(out) -> None:   # the page's methods on the tiny model: no classifier, so it is left out
        methods = out["Per method: RMS of each guidance direction at each model call, the judge's numbers"]["methods"]
        assert list(methods) == ["none", "CFG", "CFG + interval", "ICG", "CFG + PAG"]
        assert len(out["Final images: method · the judge's numbers"]) == 5 and "Seed" in out["Status"]

    def schedule_plot(out) -> None:
        table = out["Per schedule: timesteps, sigmas, alphas_cumprod at each model call"]
        assert set(table) == {"Default", "Align Your Steps"} and "Align Your Steps" in out["Caption"]
        assert table["Align Your Steps"]["timesteps"] == [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]

    def loaded(out) -> None:
        assert out["Studio status"] == out["Model and memory"] and "**Model:** embedded" in out["Studio status"]

    def unloaded(out) -> None:
        assert "No model loaded" in out["Studio status"] and context.models.current is None

    # in the order they are called: /txt2img makes the image and job the others take; /controlnet on the embedded
    # model; unload, then load, last
    checks = {
        "/txt2img": txt2img,
        "/img2img": generated,
        "/inpaint": inpaint,
        # which sides to extend is the outpainting itself: nothing to default to, and the error says so
        "/outpaint": AppError("at least one side to extend: `left`, `right`, `top` and `bottom`"),
        "/png_info": png_info,
        "/train_lora": train_lora,
        "/train_textual_inversion": lambda out: out["Result"]["file"] == "models/embeddings/my-embedding.safetensors"
        and out["Result"]["method"] == "textual_inversion" and out["Result"]["steps"] > 0,
        # stopped while it draws its class images: nothing trained, and the status says so
        "/train_dreambooth": lambda out: "Stopped while drawing the class images" in out["Status"],
        "/training_presets": lambda out: list(out.values()) == [[]],
        "/save_training_preset": lambda out: list(out.values()) == [["api-preset"]],
        "/load_training_preset": lambda out: list(out.values())[0]["rank"] == 4,
        "/loras": lambda out: [(lora["name"], lora["file"]) for lora in out["LoRAs: name, file, size_mb"]] ==
        [("emoji-ldm-lcm", "assets/emoji-ldm-lcm/pytorch_lora_weights.safetensors"), ("my-lora", "my-lora.safetensors")],
        "/explorer_forward": explorer_forward,
        "/explorer_record": explorer_record,
        "/explorer_speculative": explorer_speculative,
        "/schedule_plot": schedule_plot,
        "/compare_guidance": compare_guidance,
        "/job": lambda out: out["The job: id, kind, state, progress"]["state"] == "done",
        "/stop": lambda out: out["The job: id, kind, state, progress"]["id"] == made["job_id"],
        "/controlnet": controlnet,
        "/unload_model": unloaded,
        "/load_model": loaded,
    }
    assert set(endpoints) == set(checks), "public endpoints this test does not know, or no longer served: " \
        f"{set(endpoints) ^ set(checks)}"
    # The training's defaults (300 steps) are the page's; this test is about the call, so the run is stopped at its
    # first loss point (the result is then a saved LoRA that says it was stopped) instead of taking half a minute
    stopped_at: list[int] = []
    submit = context.worker.submit

    def stop_at_the_first_step(work, **options):
        job = submit(work, **options)
        if options["kind"].startswith("train-"):
            def follow():
                for event in job.events():
                    if isinstance(event, LossPoint):
                        stopped_at.append(event.step)
                        job.cancel()
                        return
                    if options["kind"] == "train-dreambooth":     # its first class image
                        job.cancel()
                        return
            threading.Thread(target=follow, daemon=True).start()
        return job

    monkeypatch.setattr(context.worker, "submit", stop_at_the_first_step)
    for name, check in checks.items():
        if name == "/controlnet":
            context.models.load("embedded")
        endpoint = endpoints[name]
        required = [p["parameter_name"] for p in endpoint["parameters"] if not p["parameter_has_default"]]
        assert set(required) <= REQUIRABLE, f"{name} requires {set(required) - REQUIRABLE}: give them defaults"
        call = {parameter: arguments[parameter] for parameter in required}
        if isinstance(check, AppError):
            with pytest.raises(AppError, match=re.escape(str(check))):
                client.predict(**call, api_name=name)
            continue
        result = client.predict(**call, api_name=name)
        result = result if len(endpoint["returns"]) > 1 else (result,)
        out = dict(zip([output["label"] for output in endpoint["returns"]], result, strict=True))
        assert check(out) is not False, f"{name} returned {out}"
