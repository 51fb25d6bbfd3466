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
