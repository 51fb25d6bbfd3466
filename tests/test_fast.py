"""Few-step generation (issue 22, part 2): latent consistency distillation (recipe/lcm.py), a user's LCM-LoRA
through the ordinary LoRA and LCM-sampler path, and `fast`, which runs the model's own."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipelines.io.metadata import infotext_to_settings_and_dropped, parse_infotext
from pipelines.tasks.txt2img import Txt2ImgRequest
from recipe import lcm


def make_lcm_lora(model_dir, folder, steps: int = 3):
    """A tiny LCM-LoRA for the model in `model_dir`: `steps` steps of the recipe's own distillation, on random
    latents and the model's text encoder, saved in diffusers' LoRA format under `folder`."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir)
    student = lcm.lora_unet(model_dir, rank=4)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    with torch.no_grad():
        embed = lambda texts: pipeline.text_encoder(pipeline.tokenizer(  # noqa: E731
            texts, padding="max_length", max_length=pipeline.tokenizer.model_max_length, truncation=True,
            return_tensors="pt").input_ids)[0]
        conditional, empty = embed(["red apple", "blue heart"]), embed([""])
    alphas = pipeline.scheduler.alphas_cumprod
    solver = lcm.DDIMSolver(alphas)
    size = student.config.sample_size
    for _ in range(steps):
        x0 = torch.randn(2, student.config.in_channels, size, size)
        loss = lcm.distillation_loss(student, pipeline.unet, x0, conditional, empty, torch.full((2,), 7.5), solver,
                                     alphas)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(student),
                                              safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_lcm_lora(tiny_model_dir, tmp_path_factory):
    """The tiny LCM-LoRA, made once; each test copies it into its studio's models/lora/."""
    return make_lcm_lora(tiny_model_dir, tmp_path_factory.mktemp("lcm") / "tiny-lcm")


def test_the_consistency_parameterisation_and_the_ddim_solver_are_exact_where_they_must_be():
    """f(x, 0) = x (the boundary condition LCM's c_skip and c_out build in), and one DDIM step from a point of a
    trajectory, given that trajectory's x_0 and ε, lands on the same trajectory k timesteps earlier."""
    alphas = torch.linspace(0.9999, 0.005, 1000)
    solver = lcm.DDIMSolver(alphas)
    assert solver.timesteps[0] == 19 and solver.timesteps[-1] == 999 and solver.skip == 20
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    index = torch.tensor([0, 10, 49])
    stepped = solver.step(x0, eps, index)
    previous = torch.tensor([0, solver.timesteps[9], solver.timesteps[48]])
    expected = alphas[previous].sqrt().view(-1, 1, 1, 1) * x0 + (1 - alphas[previous]).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(stepped, expected)
    x = torch.randn(3, 4, 8, 8)
    assert torch.equal(lcm.consistency_output(torch.randn_like(x), x, torch.zeros(3, dtype=torch.long), alphas), x)
    late = lcm.consistency_output(eps, x, torch.full((3,), 999), alphas)   # far from 0: (almost) the predicted x_0
    x0_hat = (x - (1 - alphas[999]).sqrt() * eps) / alphas[999].sqrt()
    assert torch.allclose(late, x0_hat, atol=1e-3 * float(x0_hat.abs().max()))


def test_a_users_lcm_lora_runs_as_plain_diffusers_runs_it(studio, tiny_model_dir, tiny_lcm_lora):
    """The same LoRA path and LCM sampler serve a user's LCM-LoRA: the studio's image is diffusers' own
    (load_lora_weights + LCMScheduler, CFG 1, same seed), and the LoRA moved it."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    folder = shutil.copytree(tiny_lcm_lora, studio.models.lora_dir / "tiny-lcm")
    settings = dict(sampler="LCM", steps=4, guidance_scale=1.0, seed=5, width=64, height=64)
    done = studio.generate(Txt2ImgRequest(prompt="red apple <lora:tiny-lcm:1>", **settings))
    plain = studio.generate(Txt2ImgRequest(prompt="red apple", **settings))
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipeline.load_lora_weights(str(folder))
    pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    reference = pipeline("red apple", num_inference_steps=4, guidance_scale=1.0, width=64, height=64,
                         generator=torch.Generator().manual_seed(5)).images[0]
    ours = np.asarray(done.images[0].image, dtype=np.int16)
    assert np.abs(ours - np.asarray(reference, dtype=np.int16)).max() <= 1
    assert np.abs(ours - np.asarray(plain.images[0].image, dtype=np.int16)).mean() > 1.0
    assert "Lora hashes" in parse_infotext(done.images[0].infotext)[2]


def test_fast_on_a_model_without_a_few_step_version_says_what_to_do(studio):
    with pytest.raises(ValueError, match=r"Fast \(4 steps\) needs a few-step version of .*LCM-LoRA.*<lora:NAME:1>"):
        studio.generate(Txt2ImgRequest(prompt="red apple", steps=4, fast=True))
    assert studio.generate(Txt2ImgRequest(prompt="red apple", steps=2)).images     # still serving


def test_fast_on_an_lcm_model_keeps_its_guidance_scale_as_w(studio, tiny_model_dir, tmp_path):
    """A guidance-distilled LCM UNet embeds w (`time_cond_proj_dim`): fast picks the LCM sampler and adds no LoRA,
    and the CFG scale stays the request's (it is the model's w, not a second pass)."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "tiny-lcm-unet"
    shutil.copytree(tiny_model_dir, folder)
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(dict(base.config) | {"time_cond_proj_dim": 32})
    unet.load_state_dict(base.state_dict(), strict=False)      # the w embedding's layer stays random
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    studio.models.load(str(folder))
    done = studio.generate(Txt2ImgRequest(prompt="red apple", steps=4, guidance_scale=6.0, seed=1, fast=True))
    prompt, _, parameters = parse_infotext(done.images[0].infotext)
    assert (prompt, parameters["Sampler"], parameters["CFG scale"]) == ("red apple", "LCM", "6")
    assert "Lora hashes" not in parameters


@pytest.fixture(scope="module")
def embedded():
    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager

    manager = ModelManager(MemoryManager(device="cpu"))
    manager.load("embedded")
    return Generator(manager, outputs_dir=None)


def test_fast_runs_the_shipped_lcm_lora_and_its_infotext_restores_the_same_image(embedded):
    """Fast is the request a user could write: the shipped LCM-LoRA named in the prompt, the LCM sampler, CFG 1.
    PNG Info's settings (fast off) make the same pixels, and the LoRA is what changed the image."""
    done = embedded.generate(Txt2ImgRequest(prompt="red apple", steps=4, seed=3, fast=True))
    prompt, negative, parameters = parse_infotext(done.images[0].infotext)
    assert prompt == "red apple <lora:emoji-ldm-lcm:1>"
    assert (parameters["Sampler"], parameters["Steps"], parameters["CFG scale"]) == ("LCM", "4", "1")
    assert "emoji-ldm-lcm" in parameters["Lora hashes"]
    settings, _ = infotext_to_settings_and_dropped(parameters)
    fields = {k: v for k, v in settings.items() if k in Txt2ImgRequest.__dataclass_fields__}
    again = embedded.generate(Txt2ImgRequest(prompt=prompt, negative_prompt=negative, **fields))
    assert np.array_equal(np.asarray(again.images[0].image), np.asarray(done.images[0].image))
    without = embedded.generate(Txt2ImgRequest(prompt="red apple", steps=4, seed=3, sampler="LCM", guidance_scale=1.0))
    assert any("Tick Fast" in message for message in without.messages)
    assert not any("Tick Fast" in message for message in done.messages + again.messages)
    assert np.abs(np.asarray(without.images[0].image, dtype=np.int16)
                  - np.asarray(done.images[0].image, dtype=np.int16)).mean() > 5.0


def test_a_lone_lora_runs_merged_on_a_cpu_and_the_plain_model_comes_back_bit_for_bit(studio, tiny_model_dir,
                                                                                     tiny_lcm_lora):
    """pipelines/lora/merged.py: one LoRA is merged into the weights (two are not); the merged image is the
    adapter's, and a request without LoRAs afterwards is the plain model's exactly (the originals are put back)."""
    from tests.test_lora import make_kohya_lora

    shutil.copytree(tiny_lcm_lora, studio.models.lora_dir / "tiny-lcm")
    make_kohya_lora(tiny_model_dir / "unet", studio.models.lora_dir / "style.safetensors")
    settings = dict(sampler="LCM", steps=2, guidance_scale=1.0, seed=9, width=64, height=64)
    image = lambda prompt: np.asarray(studio.generate(Txt2ImgRequest(prompt=prompt, **settings)).images[0].image,  # noqa: E731
                                      dtype=np.int16)
    plain = image("red apple")
    merged = image("red apple <lora:tiny-lcm:1>")
    unet = studio.models.current.pipeline.unet
    assert unet._studio_active[1] and all(layer.merged for layer, _, _ in unet._studio_merged[1])
    unmerged = image("red apple <lora:tiny-lcm:1> <lora:style:0>")     # two adapters: run as adapters
    assert not unet._studio_active[1] and not any(layer.merged for layer, _, _ in unet._studio_merged[1])
    assert np.abs(merged - unmerged).max() <= 1 and np.abs(merged - plain).mean() > 1.0
    assert np.array_equal(image("red apple <lora:tiny-lcm:1>"), merged)   # swapped back in, the same weights
    assert np.array_equal(image("red apple"), plain)


def test_the_api_s_fast_takes_four_steps_unless_told_otherwise():
    from studio.tabs.generate import request_from_controls

    assert request_from_controls("txt2img", {"prompt": "red apple", "fast": True, "steps": None}).steps == 4
    assert request_from_controls("txt2img", {"prompt": "red apple", "fast": True, "steps": 2}).steps == 2
    assert request_from_controls("txt2img", {"prompt": "red apple", "fast": None, "steps": None}).steps == 25


def test_a_lora_with_biases_runs_unmerged_and_leaves_the_plain_model_as_it_was(studio, tiny_model_dir):
    """peft's merge would add a LoRA's bias into the layers' biases too; such a LoRA is not merged (it runs as an
    adapter), so nothing has to be undone for the plain model."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_out.0", "proj_out"], lora_bias=True,
                                init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(studio.models.lora_dir / "biased",
                                              unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    settings = dict(steps=2, seed=4, width=64, height=64)
    plain = np.asarray(studio.generate(Txt2ImgRequest(prompt="red apple", **settings)).images[0].image)
    biased = np.asarray(studio.generate(Txt2ImgRequest(prompt="red apple <lora:biased:1>", **settings)).images[0].image)
    assert not studio.models.current.pipeline.unet._studio_active[1]
    assert not np.array_equal(plain, biased)
    assert np.array_equal(np.asarray(studio.generate(Txt2ImgRequest(prompt="red apple", **settings)).images[0].image),
                          plain)


FAST_PROMPTS_CHECKED = 16
FAST_MIN_TOP5_HITS = 8     # the shipped LCM-LoRA at 4 steps recognises 12 of these 16 (70% over 300: fast-eval.json)


@pytest.mark.slow
def test_fast_draws_what_the_prompt_names_in_four_steps(embedded):
    """The first prompts of the evaluation (their classes held out from the distillation), as the 25-step test in
    test_embedded.py: chance top-5 is 0.26%, i.e. 0.04 hits in 16."""
    from recipe import evaluate

    judge, class_names = evaluate.load_judge()
    report = json.loads((evaluate.ROOT / "assets" / "emoji-ldm-eval.json").read_text())
    samples = report["samples"][:FAST_PROMPTS_CHECKED]
    images = [np.asarray(embedded.generate(Txt2ImgRequest(prompt=sample["prompt"], seed=sample["seed"], steps=4,
                                                          fast=True)).images[0].image) for sample in samples]
    top5 = np.argsort(-evaluate.classify(judge, np.stack(images)), axis=1)[:, :5]
    hits = sum(class_names.index(sample["class"]) in row for sample, row in zip(samples, top5))
    assert hits >= FAST_MIN_TOP5_HITS, f"only {hits} of {len(samples)} prompts recognised in the top 5"
