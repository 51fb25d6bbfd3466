"""The shipped embedded model, end to end: plain diffusers loads it, the studio defaults to it,
and its images are recognised by an independent classifier trained only on real emoji."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import launch
from pipelines.core.preview import is_blank
from pipelines.core.samplers import SAMPLER_NAMES, STOCHASTIC, model_default_sampler
from pipelines.generation.generator import Generator
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.models.sources import EMBEDDED_MODEL
from pipelines.tasks.img2img import Img2ImgRequest
from pipelines.tasks.txt2img import Txt2ImgRequest

REPORT = EMBEDDED_MODEL.parent / "emoji-ldm-eval.json"
# The first prompts of the committed evaluation (drawn with random.Random(0) from the caption set,
# not picked by hand), each with its evaluation seed. Chance top-5 over 1,906 classes is 0.26%,
# i.e. 0.04 hits in 16; the shipped model scores 11 of 16; the bound is set under that, so the test
# fails if the model (or the studio's generation path) stops producing recognisable emoji.
PROMPTS_CHECKED = 16
MIN_TOP5_HITS = 8


@pytest.fixture(scope="module")
def embedded_studio():
    manager = ModelManager(MemoryManager(device="cpu"))
    manager.load("embedded")
    return Generator(manager, outputs_dir=None)


def test_plain_diffusers_loads_the_embedded_model_in_fp32():
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL)
    assert {pipeline.unet.dtype, pipeline.vae.dtype, pipeline.text_encoder.dtype} == {torch.float32}
    image = pipeline("red apple", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and not is_blank(image)


def test_embedded_model_is_small_and_safetensors_only():
    files = [path for path in EMBEDDED_MODEL.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 60 * 1024 ** 2
    assert not [path for path in files if path.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    assert (EMBEDDED_MODEL / "tokenizer" / "tokenizer_config.json").exists()


def test_studio_starts_with_the_embedded_model_by_default():
    app, context = launch.build(launch.parse_args(["--device", "cpu"]))
    app.close()
    assert context.models.current.name == "embedded"
    assert context.models.current.pipeline.unet.config.sample_size * context.models.current.pipeline.vae_scale_factor == 64


def test_inpainting_and_controlnet_pipelines_derive_from_the_embedded_model():
    from diffusers import (
        AutoPipelineForInpainting,
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    base = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL)
    assert base.unet.config.in_channels == base.vae.config.latent_channels == 4  # SD's layout
    seed = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    source = base("red apple", num_inference_steps=4, generator=seed()).images[0]

    # Inpainting (diffusers' pipeline, shared weights): the masked left half changes, the right doesn't.
    inpaint = AutoPipelineForInpainting.from_pipe(base)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 255
    painted = inpaint("blue car", image=source, mask_image=Image.fromarray(mask), strength=1.0,
                      num_inference_steps=4, generator=seed()).images[0]
    change = np.abs(np.asarray(painted, dtype=np.int16) - np.asarray(source, dtype=np.int16)).mean(axis=2)
    inside, outside = change[:, :24].mean(), change[:, 40:].mean()  # away from the mask's edge
    # Outside the mask the latents are the source's, but every pixel is decoded again by the VAE
    # (an 8x8 latent: its decoder sees the whole image), so it moves a little; without the mask
    # both halves would change alike.
    assert inside > 2 * outside, (inside, outside)

    # ControlNet: a new ControlNet's output convs start at zero, so until it is trained the
    # controlled pipeline draws exactly what the base model draws, whatever the control image.
    controlnet = ControlNetModel.from_unet(base.unet)
    controlled = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    edges = Image.fromarray(np.tile(np.eye(64, dtype=np.uint8) * 255, (3, 1, 1)).transpose(1, 2, 0))
    drawn = controlled("red apple", image=edges, num_inference_steps=4, generator=seed()).images[0]
    assert np.abs(np.asarray(drawn, dtype=np.int16) - np.asarray(source, dtype=np.int16)).max() <= 1


def test_img2img_runs_on_the_embedded_model(embedded_studio):
    source = embedded_studio.generate(Txt2ImgRequest(prompt="red apple", seed=1, steps=5)).images[0].image
    changed = embedded_studio.generate(Img2ImgRequest(prompt="green apple", seed=1, steps=5, init_image=source,
                                                      strength=0.7)).images[0].image
    assert np.abs(np.asarray(source, dtype=np.int16) - np.asarray(changed, dtype=np.int16)).mean() > 2.0


# The steps each deterministic sampler draws the embedded model's image in (test_every_sampler_draws_the_embedded_
# model_s_image; another sampler: the studio's 25), each well inside the bound of half another seed's distance
# (RMS from DDIM's 25-step image: Euler 4, DPM++ 2M 9, DPM++ 2M Karras 5, UniPC 8, Heun 8; another seed 31). The
# 4th-order LMS and PLMS (PNDM) need 50 (at 25 they diverge on this small model, in plain diffusers too: 88 and 91
# away; at 50, 8.5 and 8.6).
SAMPLER_STEPS = {"DDIM": 25, "Euler": 15, "DPM++ 2M": 15, "Heun": 20, "DPM++ 2M Karras": 20, "UniPC": 20,
                 "LMS": 50, "PNDM": 50}


@pytest.mark.slow
def test_every_sampler_draws_the_embedded_model_s_image(embedded_studio):
    """Each deterministic sampler lands near DDIM's image for the seed (another seed is ~30 away), each its own way
    and at its own number of steps (SAMPLER_STEPS). The stochastic ones draw fresh noise, so they only have to draw
    a picture at all, which 2 steps show (a flat image, a sampler broken, shows at any number)."""
    def image(sampler: str, seed: int = 1) -> np.ndarray:
        steps = 2 if sampler in STOCHASTIC else SAMPLER_STEPS.get(sampler, 25)
        request = Txt2ImgRequest(prompt="red apple", seed=seed, steps=steps, sampler=sampler)
        return np.asarray(embedded_studio.generate(request).images[0].image, dtype=np.float64)

    def rms(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a - b) ** 2)))

    reference = image("DDIM")
    another_seed = rms(reference, image("DDIM", seed=2))
    drawn = {sampler: image(sampler) for sampler in SAMPLER_NAMES if sampler != "DDIM"}
    for sampler, picture in drawn.items():
        assert picture.std() > 60, f"{sampler} drew a flat image"
        if sampler not in STOCHASTIC:
            assert rms(picture, reference) < another_seed / 2, sampler
    distinct = {picture.tobytes() for sampler, picture in drawn.items() if sampler not in STOCHASTIC}
    assert len(distinct) == len([s for s in drawn if s not in STOCHASTIC])   # the sampler name is not ignored


@pytest.mark.slow
def test_the_default_model_draws_what_the_prompt_names(embedded_studio):
    """The recipe's evaluation prompts, at its settings (the studio's defaults), drawn by the shipped model: the
    judge names at least MIN_TOP5_HITS of PROMPTS_CHECKED in its top 5. They are drawn as one batch through the
    pipeline Text-to-Image prepares (its sampler, each prompt's seed as its own generator), which is Text-to-Image's
    own image for the first prompt, to rounding."""
    from pipelines.core.call import prepare
    from recipe.evaluate import SHIPPED_JUDGE, classify, load_judge

    judge, class_names = load_judge(SHIPPED_JUDGE)
    report = json.loads(REPORT.read_text())
    samples = report["samples"][:PROMPTS_CHECKED]
    settings = report["generation"]
    model = embedded_studio.models.current
    assert settings["sampler"] == model_default_sampler(model.scheduler_config)  # the studio's defaults

    def request(sample: dict) -> Txt2ImgRequest:
        return Txt2ImgRequest(prompt=sample["prompt"], seed=sample["seed"], sampler=settings["sampler"],
                              steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                              width=settings["width"], height=settings["height"])
    call = prepare(embedded_studio.models, request(samples[0]))
    images = np.stack([np.asarray(image) for image in call.pipeline(
        prompt=[sample["prompt"] for sample in samples], negative_prompt=[""] * len(samples),
        generator=[torch.Generator().manual_seed(sample["seed"]) for sample in samples],
        num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"], width=settings["width"],
        height=settings["height"]).images])
    single = np.asarray(embedded_studio.generate(request(samples[0])).images[0].image, dtype=np.int16)
    assert np.abs(images[0].astype(np.int16) - single).max() <= 1
    logits = classify(judge, images)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    hits = sum(class_names.index(sample["class"]) in row for sample, row in zip(samples, top5))
    assert hits >= MIN_TOP5_HITS, f"only {hits} of {len(samples)} prompts recognised in the top 5"


SHIPPED_CONTROLNETS = ("emoji-controlnet-canny", "emoji-controlnet-scribble", "emoji-controlnet-colour")
HELD_OUT_EXAMPLES = EMBEDDED_MODEL.parent / "examples" / "held-out"


@pytest.mark.parametrize("name", SHIPPED_CONTROLNETS)
def test_shipped_controlnets_are_small_fp16_and_load_in_plain_diffusers(name):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    folder = EMBEDDED_MODEL.parent / name
    weights = sorted(folder.glob("*.safetensors"))
    assert len(weights) == 1 and weights[0].stat().st_size <= 20 * 1024 ** 2
    assert not [path for path in folder.iterdir() if path.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    with safe_open(weights[0], "pt") as stored:                       # shipped as fp16 ...
        assert {stored.get_slice(key).get_dtype() for key in stored.keys()} == {"F16"}
    controlnet = ControlNetModel.from_pretrained(folder)            # ... and plain diffusers loads it (in fp32)
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(EMBEDDED_MODEL, controlnet=controlnet.float())
    control = Image.open(next(HELD_OUT_EXAMPLES.glob("*.png")))
    image = pipeline("red apple", image=control, num_inference_steps=4).images[0]
    assert image.size == (64, 64) and not is_blank(image)


@pytest.fixture(scope="module")
def plain_image(embedded_studio):
    """Text-to-Image's image for some settings, made once per test process (the canny and scribble cases share
    them)."""
    made: dict = {}

    def image(**settings) -> Image.Image:
        key = tuple(sorted(settings.items()))
        if key not in made:
            made[key] = embedded_studio.generate(Txt2ImgRequest(**settings)).images[0].image
        return made[key]
    return image


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["canny", "scribble"])
def test_shipped_controlnets_make_held_out_emoji_follow_moved_lines(embedded_studio, plain_image, kind):
    """Emoji the ControlNets never trained on, moved off their usual place: the generated image's edges follow
    the control's lines far better with the ControlNet than Text-to-Image's do (recipe/controlnet_eval.py
    measures the same on 200). 8 steps show it as well as 20 (the means' margins over the bound: canny 0.19,
    scribble 0.10; at 20, 0.18 and 0.08)."""
    from pipelines.tasks.controlnet import ControlNetRequest
    from recipe import controlnet
    from recipe.controlnet_eval import score

    with_control, without = [], []
    for index, path in enumerate(sorted(HELD_OUT_EXAMPLES.glob("*.png"))):
        moved = controlnet.place(np.asarray(Image.open(path).convert("RGB")), *controlnet.evaluation_placement(index))
        control = controlnet.evaluation_control(kind, moved)
        prompt = path.stem.split("-", 1)[1].replace("-", " ")
        common = dict(prompt=prompt, seed=1000 + index, steps=8)
        steered = embedded_studio.generate(ControlNetRequest(**common, control_image=control, preprocessor="none",
                                                             model=f"emoji-controlnet-{kind}")).images[0].image
        plain = plain_image(**common)
        with_control.append(score(kind, steered, control))
        without.append(score(kind, plain, control))
    assert len(with_control) == 6
    assert np.mean(with_control) > np.mean(without) + 0.1, (with_control, without)


def test_the_colour_controlnet_paints_the_blocked_in_colours(embedded_studio):
    from pipelines.tasks.controlnet import ControlNetRequest
    from recipe.controlnet_eval import colour_error

    layout = np.full((64, 64, 3), 255, np.uint8)
    layout[8:40, 8:40] = (220, 40, 40)       # a red block top left, a blue one bottom right, on white
    layout[32:56, 32:56] = (40, 60, 220)
    layout = Image.fromarray(layout)
    common = dict(prompt="large orange circle", seed=5, steps=8)
    steered = embedded_studio.generate(ControlNetRequest(**common, control_image=layout, preprocessor="colour grid",
                                                         model="emoji-controlnet-colour")).images[0].image
    plain = embedded_studio.generate(Txt2ImgRequest(**common)).images[0].image
    from pipelines.tasks.preprocessors import colour_grid
    assert colour_error(steered, colour_grid(layout)) < colour_error(plain, colour_grid(layout)) - 10
