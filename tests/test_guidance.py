"""Guidance beyond plain CFG on the seeded tiny model: the studio's own loop gives diffusers' images, PAG gives
diffusers' PAG pipeline's, the guidance interval skips the negative prompt's pass outside it, ICG and PAG move
the image, the settings round-trip through the infotext, and what can't run is refused with its reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.core.call import prepare
from pipelines.core.guidance import classifier_guided
from pipelines.io.metadata import infotext_to_settings, parse_infotext
from pipelines.tasks.guided import run_guided
from pipelines.tasks.img2img import Img2ImgRequest
from pipelines.tasks.txt2img import Txt2ImgRequest
from tests.test_controlnet import BASE, circle, tiny_controlnets  # noqa: F401  (the fixture)
from tests.test_explorer_forward import gradient_image


def _request(**overrides) -> Txt2ImgRequest:
    # Euler: diffusers' pipelines, built by `from_pipe`, set a shared DDIM's `clip_sample` to False
    return Txt2ImgRequest(**(dict(prompt="red apple", seed=77, steps=6, width=64, height=64, guidance_scale=5.0,
                                  sampler="Euler") | overrides))


def _latents(studio, request) -> torch.Tensor:
    return studio.models.worker.call(lambda: prepare(studio.models, request)(0))


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_the_own_loop_gives_the_diffusers_call_s_image(studio, task):
    if task == "txt2img":
        request = _request(sampler="Euler a")
    else:
        request = Img2ImgRequest(prompt="red apple", seed=77, steps=6, width=64, height=64, guidance_scale=5.0,
                                 sampler="Euler a", init_image=gradient_image(64, 64), strength=0.6)

    def both():
        call = prepare(studio.models, request)
        return call.run_pipeline(0), run_guided(call, 0)

    theirs, ours = studio.models.worker.call(both)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_pag_gives_the_diffusers_pag_pipeline_s_image_and_leaves_the_unet_as_it_was(studio):
    from diffusers import StableDiffusionPAGPipeline

    request = _request(pag_scale=3.0, pag_adaptive_scale=0.002)
    base = studio.models.pipeline("txt2img")
    processors = dict(base.unet.attn_processors)

    def theirs():
        call = prepare(studio.models, request)   # the request's sampler on the base
        pag = StableDiffusionPAGPipeline.from_pipe(base, pag_applied_layers=["mid"])
        return pag(**call.arguments(0), pag_scale=3.0, pag_adaptive_scale=0.002).images

    expected = studio.models.worker.call(theirs)
    ours = _latents(studio, request)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert {name: type(p) for name, p in base.unet.attn_processors.items()} == \
        {name: type(p) for name, p in processors.items()}
    plain = _latents(studio, _request())
    assert (ours - plain).abs().mean() > 1e-3     # PAG moved the image


def test_the_guidance_interval_runs_cfg_only_inside_it(studio):
    rows = []
    unet = studio.models.pipeline("txt2img").unet
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        _latents(studio, _request(steps=10, cfg_start=0.3, cfg_end=0.8))
    finally:
        handle.remove()
    # step i of 10 has CFG when 0.3 <= i/10 and (i+1)/10 <= 0.8: steps 3-7 stack [negative, prompt]
    assert rows == [1, 1, 1, 2, 2, 2, 2, 2, 1, 1]
    full = _latents(studio, _request(cfg_start=0.0, cfg_end=1.0))
    torch.testing.assert_close(full, _latents(studio, _request()), rtol=0, atol=1e-5)


def test_icg_stands_a_seeded_random_prompt_in_for_the_negative_one(studio):
    icg = studio.generate(_request(cfg_method="ICG", negative_prompt="blurry"))
    again = studio.generate(_request(cfg_method="ICG", negative_prompt="blurry"))
    cfg = studio.generate(_request())
    assert np.array_equal(np.asarray(icg.images[0].image), np.asarray(again.images[0].image))
    assert not np.array_equal(np.asarray(icg.images[0].image), np.asarray(cfg.images[0].image))
    assert any("random prompt stood in for the negative prompt" in note for note in icg.messages)


def test_an_icg_batch_image_is_the_image_its_seed_gives_alone(studio):
    batch = studio.generate(_request(cfg_method="ICG", batch_size=2))
    alone = studio.generate(_request(cfg_method="ICG", seed=78))
    assert np.array_equal(np.asarray(batch.images[1].image), np.asarray(alone.images[0].image))


def test_image_to_image_applies_the_guidance_rescale_it_records(studio):
    """diffusers' Image-to-Image call swallows `guidance_rescale` unused: the studio's loop runs it instead."""
    values = dict(prompt="red apple", seed=77, steps=6, width=64, height=64, guidance_scale=5.0, sampler="Euler",
                  init_image=gradient_image(64, 64), strength=0.8)
    plain = np.asarray(studio.generate(Img2ImgRequest(**values)).images[0].image, dtype=np.int16)
    rescaled = np.asarray(studio.generate(Img2ImgRequest(**values, guidance_rescale=0.7)).images[0].image,
                          dtype=np.int16)
    assert not np.array_equal(rescaled, plain)   # through diffusers' call they were the same image


def test_an_interval_that_holds_no_step_says_so(studio):
    done = studio.generate(_request(steps=4, cfg_start=0.3, cfg_end=0.7))
    assert any("holds none of the 4 steps" in message for message in done.messages)


def test_guidance_settings_round_trip_through_the_infotext(studio):
    request = _request(pag_scale=2.5, pag_layers="mid, down_blocks.0", cfg_start=0.1, cfg_end=0.9, cfg_method="ICG",
                       sampler="DPM++ 2M", schedule="Align Your Steps")
    done = studio.generate(request)
    _, _, params = parse_infotext(done.images[0].infotext)
    assert params["Schedule type"] == "Align Your Steps"    # A1111's own name for it
    settings = infotext_to_settings(params)
    for name in ("pag_scale", "pag_layers", "cfg_start", "cfg_end", "cfg_method", "sampler", "schedule"):
        assert settings[name] == getattr(request, name), name
    assert "PAG scale" not in studio.generate(_request()).images[0].infotext   # what is off is left out


def test_controlnet_with_pag_is_diffusers_controlnet_pag_pipeline(studio, tiny_controlnets):
    """A balanced unit and PAG: one UNet call of three rows, the residuals on all three, as diffusers does."""
    from diffusers import StableDiffusionControlNetPAGPipeline

    from pipelines.tasks.controlnet import ControlNetRequest

    request = ControlNetRequest(**BASE, control_image=circle(), preprocessor="none", model="tiny-a", weight=0.8,
                                pag_scale=2.0)

    def both():
        call = prepare(studio.models, request)
        ours = call(0)
        reference = StableDiffusionControlNetPAGPipeline.from_pipe(
            call.pipeline, controlnet=call.controlnets["tiny-a"], pag_applied_layers=["mid"])
        theirs = reference(prompt=request.prompt, negative_prompt=request.negative_prompt, image=circle(),
                           num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                           controlnet_conditioning_scale=0.8, generator=call.generators(0), output_type="latent",
                           width=64, height=64, pag_scale=2.0).images
        return ours, theirs

    ours, theirs = studio.models.worker.call(both)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_inpainting_with_pag_keeps_the_outside_bit_for_bit(studio):
    from PIL import Image

    from pipelines.tasks.inpaint import InpaintRequest

    image = gradient_image(64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    values = dict(prompt="red apple", seed=5, steps=6, width=64, height=64, init_image=image, mask=mask,
                  mask_blur=0)
    plain = np.asarray(studio.generate(InpaintRequest(**values)).images[0].image)
    pag = np.asarray(studio.generate(InpaintRequest(**values, pag_scale=3.0)).images[0].image)
    outside = np.asarray(mask) == 0
    assert np.array_equal(pag[outside], np.asarray(image)[outside])
    assert np.abs(pag[~outside].astype(int) - plain[~outside]).mean() > 1


@pytest.mark.parametrize("values, message", [
    (dict(cfg_start=0.8, cfg_end=0.2), "guidance interval is empty"),
    (dict(classifier_scale=4.0), "needs a class to steer to"),
    (dict(pag_scale=-1.0), "`pag_scale`"),
    (dict(cfg_method="APG"), "`cfg_method`"),
    (dict(pag_scale=3.0, pag_layers="mid("), "not a valid layer pattern"),
])
def test_bad_guidance_settings_are_refused_with_the_reason(values, message):
    with pytest.raises(ValueError, match=message):
        _request(**values)


def test_a_pag_layer_the_unet_lacks_and_classifier_guidance_off_the_embedded_model_are_refused(studio):
    with pytest.raises(ValueError, match="names no self-attention layer.*mid_block"):
        _latents(studio, _request(pag_scale=3.0, pag_layers="up.block_7"))
    with pytest.raises(ValueError, match="ships one for the embedded model only"):
        _latents(studio, _request(classifier_scale=3.0, classifier_class="flags"))


class _LinearClassifier:
    """log p(y | x) = <w, x> for every y: its gradient is w."""

    def __init__(self, weight):
        self.weight = weight

    def log_prob_gradient(self, x_t, timestep, class_index):
        return self.weight.expand_as(x_t).clone(), (x_t * self.weight).flatten(1).sum(1)


def test_classifier_guidance_shifts_eps_by_the_scaled_gradient():
    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)
    eps, x_t, weight = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    guided, gradient = classifier_guided(eps, x_t, 400, alphas_cumprod, _LinearClassifier(weight), 0, 2.0)
    torch.testing.assert_close(guided, eps - (1 - alphas_cumprod[400]) ** 0.5 * 2.0 * weight)
    torch.testing.assert_close(gradient, weight.expand_as(x_t))


def test_sdxl_runs_pag_icg_and_align_your_steps(sdxl_studio):
    from diffusers.schedulers import AysSchedules

    base = dict(prompt="red apple", seed=3, steps=10, width=64, height=64, sampler="Euler")
    unet = sdxl_studio.models.current.pipeline.unet
    processors = {name: type(p) for name, p in unet.attn_processors.items()}
    plain = np.asarray(sdxl_studio.generate(Txt2ImgRequest(**base)).images[0].image, dtype=np.int16)
    pag = sdxl_studio.generate(Txt2ImgRequest(**base, pag_scale=3.0))
    assert np.abs(np.asarray(pag.images[0].image, dtype=np.int16) - plain).mean() > 0.5
    assert "PAG scale: 3" in pag.images[0].infotext
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors   # the shared UNet as it was
    ays = sdxl_studio.generate(Txt2ImgRequest(**base, schedule="Align Your Steps"))
    scheduler = sdxl_studio.models.pipeline("txt2img").scheduler
    np.testing.assert_allclose(scheduler.sigmas.numpy(), AysSchedules["StableDiffusionXLSigmas"], rtol=1e-5)
    assert "Schedule type: Align Your Steps" in ays.images[0].infotext
    icg = sdxl_studio.generate(Txt2ImgRequest(**base, cfg_method="ICG"))    # the studio's own loop, on SDXL too
    assert np.abs(np.asarray(icg.images[0].image, dtype=np.int16) - plain).mean() > 0.5
