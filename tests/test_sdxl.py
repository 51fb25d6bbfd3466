"""SDXL in the studio's own loop, on a seeded tiny SDXL-layout model (two text encoders, `text_time` added
conditioning): the shared Denoiser gives the UNet SDXL's pooled text and size ids, so its Text-to-Image and
Image-to-Image are diffusers' images, and the tabs that run the studio's loop (Inpainting, speculative sampling)
take SDXL as they take SD 1.x."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core.call import prepare
from pipelines.io.metadata import parse_infotext
from pipelines.tasks.guided import run_guided
from pipelines.tasks.img2img import Img2ImgRequest
from pipelines.tasks.inpaint import InpaintRequest
from pipelines.tasks.txt2img import Txt2ImgRequest
from tests.test_explorer_forward import gradient_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_the_own_loop_gives_diffusers_sdxl_image(sdxl_studio, task):
    """The studio's loop against StableDiffusionXLPipeline's (and its Image-to-Image's) own call, same seed: equal
    only when the pooled text embeddings and the size and crop ids reach the UNet as diffusers sends them."""
    common = dict(prompt="red apple", negative_prompt="blurry", seed=77, steps=5, width=64, height=64,
                  guidance_scale=5.0, sampler="Euler a")
    request = Txt2ImgRequest(**common) if task == "txt2img" else \
        Img2ImgRequest(**common, init_image=gradient_image(64, 64), strength=0.6)

    def both():
        call = prepare(sdxl_studio.models, request)
        return call.run_pipeline(0), run_guided(call, 0)

    theirs, ours = sdxl_studio.models.worker.call(both)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_pag_in_the_own_loop_gives_diffusers_sdxl_pag_image(sdxl_studio):
    from diffusers import StableDiffusionXLPAGPipeline

    request = Txt2ImgRequest(prompt="red apple", seed=5, steps=5, width=64, height=64, guidance_scale=5.0,
                             sampler="Euler", pag_scale=3.0)

    def both():
        call = prepare(sdxl_studio.models, request)
        pag = StableDiffusionXLPAGPipeline.from_pipe(call.pipeline, pag_applied_layers=["mid"])
        theirs = pag(**call.arguments(0), pag_scale=3.0).images
        return theirs, run_guided(call, 0)

    theirs, ours = sdxl_studio.models.worker.call(both)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_sdxl_inpaints_inside_the_mask_and_keeps_every_pixel_outside(sdxl_studio):
    picture = Image.fromarray(np.asarray(gradient_image(64, 64).convert("RGB")))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[20:44, 20:44] = 255
    done = sdxl_studio.generate(InpaintRequest(prompt="red apple", init_image=picture, mask=Image.fromarray(mask),
                                               mask_blur=0, steps=4, seed=9, width=64, height=64))
    result = np.asarray(done.images[0].image.convert("RGB"), dtype=np.int16)
    original = np.asarray(picture, dtype=np.int16)
    outside = np.ones((64, 64), dtype=bool)
    outside[12:52, 12:52] = False          # beyond the mask's latent cells
    assert np.array_equal(result[outside], original[outside])
    assert np.abs(result[24:40, 24:40] - original[24:40, 24:40]).mean() > 3


def test_speculative_sampling_runs_on_sdxl(sdxl_studio):
    done = sdxl_studio.generate(Txt2ImgRequest(prompt="red apple", seed=3, steps=12, width=64, height=64,
                                               sampler="DDPM speculative", draft="frozen target", draft_length=3))
    image = np.asarray(done.images[0].image, dtype=np.float32)
    assert image.std() > 2.0
    assert int(parse_infotext(done.images[0].infotext)[2]["Target calls"]) <= 12


@pytest.fixture(scope="module")
def sdxl_controlnet(sdxl_studio):
    """A seeded tiny ControlNet made from the tiny SDXL UNet (`text_time` conditioning too), under models/."""
    from recipe.tiny import build_tiny_controlnet

    folder = sdxl_studio.models.models_dir / "controlnet"
    build_tiny_controlnet(sdxl_studio.models.current.pipeline.unet, seed=1).save_pretrained(folder / "tiny-xl")
    return "tiny-xl"


def test_our_controlnet_loop_is_diffusers_sdxl_controlnet_pipeline(sdxl_studio, sdxl_controlnet):
    """One unit on SDXL: the same latents as StableDiffusionXLControlNetPipeline on the same noise (the ControlNet
    takes the pooled text and size ids as the UNet does)."""
    from diffusers import StableDiffusionXLControlNetPipeline

    from pipelines.tasks.controlnet import ControlNetRequest
    from tests.test_controlnet import BASE, circle

    request = ControlNetRequest(**BASE, control_image=circle(), preprocessor="none", model=sdxl_controlnet,
                                weight=0.8)

    def both():
        call = prepare(sdxl_studio.models, request)
        reference = StableDiffusionXLControlNetPipeline.from_pipe(call.pipeline,
                                                                  controlnet=call.controlnets[sdxl_controlnet])
        theirs = reference(prompt=request.prompt, negative_prompt=request.negative_prompt, image=circle(),
                           num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                           controlnet_conditioning_scale=0.8, generator=call.generators(0), output_type="latent",
                           width=64, height=64).images
        return call(0), theirs

    ours, theirs = sdxl_studio.models.worker.call(both)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    plain = sdxl_studio.models.worker.call(lambda: prepare(sdxl_studio.models, Txt2ImgRequest(**BASE))(0))
    assert (ours - plain).abs().mean() > 1e-3            # it steered


def test_a_controlnet_of_another_family_is_refused_naming_both(sdxl_studio, tiny_model_dir):
    from diffusers import UNet2DConditionModel

    from pipelines.tasks.controlnet import ControlNetRequest
    from recipe.tiny import build_tiny_controlnet
    from tests.test_controlnet import BASE, circle

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    build_tiny_controlnet(unet).save_pretrained(sdxl_studio.models.models_dir / "controlnet" / "tiny-sd")
    with pytest.raises(ValueError, match=r"does not fit tiny-sdxl.*\(a ControlNet for an SD 1.x/2.x-style model, "
                                         r"on SDXL\)"):
        sdxl_studio.generate(ControlNetRequest(**BASE, control_image=circle(), preprocessor="none", model="tiny-sd"))


def test_an_sdxl_lora_trains_and_plain_diffusers_loads_it(sdxl_studio, tmp_path):
    """LoRA training on SDXL: the captions' pooled embeddings and each bucket's size and crop ids condition the
    UNet as at generation; the kohya file it writes loads in StableDiffusionXLPipeline and moves its image."""
    from recipe.tiny import build_tiny_sdxl_pipeline
    from tests.test_training_methods import request as training
    from tests.test_training_methods import run

    result, losses = run(sdxl_studio, training(name="xl-frames", trigger="framed", steps=4, learning_rate=1e-2),
                         tmp_path)
    assert len(losses) == 4 and np.isfinite(losses).all() and result.path.is_file()
    from safetensors import safe_open
    with safe_open(str(result.path), framework="pt") as reader:     # what kohya's and A1111's readers tell SDXL by
        metadata = reader.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    # the studio applies it by its prompt tag, as on SD 1.x
    base = dict(seed=1, steps=3, width=64, height=64)
    plain = np.asarray(sdxl_studio.generate(Txt2ImgRequest(prompt="framed, red", **base)).images[0].image, np.int16)
    styled = sdxl_studio.generate(Txt2ImgRequest(prompt="framed, red <lora:xl-frames:1>", **base)).images[0]
    assert np.abs(np.asarray(styled.image, np.int16) - plain).mean() > 0.5 and "Lora hashes" in styled.infotext
    diffusers = build_tiny_sdxl_pipeline(tmp_path / "plain")       # the same seeded weights, built afresh
    arguments = dict(prompt="framed, red", num_inference_steps=3, width=64, height=64, output_type="np")
    before = diffusers(**arguments, generator=torch.Generator().manual_seed(1)).images
    diffusers.load_lora_weights(str(result.path.parent), weight_name=result.path.name, adapter_name="xl-frames")
    assert "xl-frames" in diffusers.get_list_adapters()["unet"]
    after = diffusers(**arguments, generator=torch.Generator().manual_seed(1)).images
    assert np.abs(after - before).mean() > 1e-3
    with pytest.raises(ValueError, match="tiny-sdxl is SDXL-style, with two. Train a LoRA or a DreamBooth LoRA"):
        run(sdxl_studio, training(method="textual_inversion", name="xl-ti", init_word="frame"), tmp_path)


def test_the_explorer_records_and_branches_an_sdxl_generation(sdxl_studio):
    """The Diffusion Explorer on SDXL: x̂_0 at every step, and a branch that changes the prompt and turns CFG off
    mid-way gives the loop the new pooled text and as many size-id rows as it now has."""
    from pipelines.explorer.reverse import branch, record_trace

    models = sdxl_studio.models
    original = record_trace(models, Txt2ImgRequest(prompt="red apple", seed=4, steps=6, width=64, height=64,
                                                   sampler="DDIM", guidance_scale=5.0))
    assert len(original.steps) == 6 and all(step.x0_pred is not None for step in original.steps)
    again = branch(models, original, 3, {"guidance_scale": 5.0})
    assert np.array_equal(np.asarray(again.final_image), np.asarray(original.final_image))
    changed = branch(models, original, 2, {"prompt": "a cat", "guidance_scale": 1.0})
    assert changed.steps[1].eps_uncond is not None and changed.steps[2].eps_uncond is None
    assert torch.equal(changed.steps[2].latents, original.steps[2].latents)
    assert not np.array_equal(np.asarray(changed.final_image), np.asarray(original.final_image))


def test_sdxl_outpaints_and_keeps_the_original_bit_for_bit(sdxl_studio, monkeypatch):
    """The box is generated in its own shape, and SDXL's size ids say that shape, not the request's."""
    from pipelines.core.denoiser import Denoiser
    from pipelines.tasks.outpaint import OutpaintRequest

    seen = []     # the size ids each Denoiser gives the UNet
    original_init = Denoiser.__init__

    def recording(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        seen.append(self.added["time_ids"][0].tolist())
    monkeypatch.setattr(Denoiser, "__init__", recording)
    picture = gradient_image(64, 64).convert("RGB")
    request = OutpaintRequest(prompt="blue sky", init_image=picture, right=64, steps=4, seed=2)
    done = sdxl_studio.generate(request)
    result = np.asarray(done.images[0].image.convert("RGB"), dtype=np.int16)
    assert result.shape == (64, 128, 3)
    assert np.array_equal(result[:, :64], np.asarray(picture, dtype=np.int16))
    assert result[:, 72:].std() > 2.0
    width, height = request.as_inpainting().region(sdxl_studio.models.current.pipeline.vae_scale_factor).image.size
    assert seen and all(ids == [height, width, 0, 0, height, width] for ids in seen) and (width, height) != (64, 64)


def test_a_dreambooth_lora_trains_on_sdxl_with_its_class_rows(sdxl_studio, tmp_path):
    """DreamBooth on SDXL: the class images drawn by the model itself, their rows (pooled text and size ids too)
    in the same UNet call as the instance rows."""
    from tests.test_training_methods import request as training
    from tests.test_training_methods import run

    result, losses = run(sdxl_studio, training(method="dreambooth", name="xl-sks", trigger="sks frame",
                                               class_prompt="frame", class_images=2, steps=2, learning_rate=1e-2),
                         tmp_path)
    assert len(losses) == 2 and np.isfinite(losses).all() and result.path.is_file()
    assert set(result.comparison) == {"sks frame, red", "frame"}        # the first prompt, and the class
    with pytest.raises(ValueError, match="Training the text encoder too takes models with one CLIP text encoder"):
        run(sdxl_studio, training(name="xl-te", train_text_encoder=True), tmp_path)


def test_an_sdxl_image_s_infotext_restores_the_same_image(sdxl_studio):
    """The infotext (A1111's, as PNG Info reads it) of an SDXL image with PAG and the guidance interval gives the
    same image again."""
    from pipelines.io.metadata import infotext_to_settings

    original = Txt2ImgRequest(prompt="green apple", negative_prompt="blurry", sampler="DPM++ 2M Karras", steps=5,
                              guidance_scale=6.5, seed=42, width=64, height=64, pag_scale=2.0, cfg_start=0.2)
    made = sdxl_studio.generate(original).images[0]
    prompt, negative, parameters = parse_infotext(made.infotext)
    settings = infotext_to_settings(parameters)
    assert (prompt, negative, parameters["Model"]) == ("green apple", "blurry", "tiny-sdxl")
    assert settings.pop("model") == "tiny-sdxl"
    restored = Txt2ImgRequest(prompt=prompt, negative_prompt=negative, **settings)
    assert np.array_equal(np.asarray(sdxl_studio.generate(restored).images[0].image), np.asarray(made.image))
