"""An SDXL model trained in the EDM formulation, as Playground v2.5 is (recipe/tiny.py's seeded tiny one: its UNet
preconditioned by σ, diffusers' EDM scheduler, its VAE's latents normalised per channel): the studio draws
diffusers' own images with it, offers only the samplers it runs, and refuses what works on DDPM's ᾱ_t, saying so."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.tasks.img2img import Img2ImgRequest
from pipelines.tasks.inpaint import InpaintRequest
from pipelines.tasks.txt2img import Txt2ImgRequest
from tests.test_explorer_forward import gradient_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EDM = "trained in the EDM formulation"


@pytest.fixture(scope="module")
def playground(tmp_path_factory, worker):
    """A studio on the tiny Playground-layout model, loaded from its folder; and the folder."""
    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from recipe.tiny import build_tiny_playground_pipeline

    root = tmp_path_factory.mktemp("edm")
    build_tiny_playground_pipeline(root / "build").save_pretrained(root / "models" / "tiny-playground")
    models = ModelManager(MemoryManager(device="cpu"), worker=worker, models_dir=root / "models")
    models.load(str(root / "models" / "tiny-playground"))
    return Generator(models, None), root / "models" / "tiny-playground"


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "Euler"])
def test_an_edm_model_draws_diffusers_own_images_with_its_samplers(playground, sampler):
    """Text-to-Image and Image-to-Image against plain diffusers' SDXL pipelines on the same folder, with the EDM
    scheduler of that name: the same pixels (the σ-preconditioned steps, and the VAE's per-channel latents both
    ways). Every tab's menu holds only the samplers an EDM model runs, the model's own picked; the infotext names
    them as A1111 does (its DPM++ 2M steps Karras's σ)."""
    from diffusers import EDMEulerScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from studio.app import model_defaults

    studio, folder = playground
    defaults = model_defaults(studio.models.current)
    assert set(defaults["samplers"]["txt2img"]) == set(defaults["samplers"]["inpaint"]) == {"Euler", "DPM++ 2M Karras"}
    assert defaults["sampler"] == "DPM++ 2M Karras"
    common = dict(prompt="red apple", seed=3, steps=5, width=64, height=64, guidance_scale=3.0, sampler=sampler)
    picture = gradient_image(64, 64).convert("RGB")
    for plain, request, extra in (
            (StableDiffusionXLPipeline, Txt2ImgRequest(**common), {"width": 64, "height": 64}),
            (StableDiffusionXLImg2ImgPipeline, Img2ImgRequest(**common, init_image=picture, strength=0.6),
             {"image": picture, "strength": 0.6})):
        theirs = plain.from_pretrained(folder)
        if sampler == "Euler":
            theirs.scheduler = EDMEulerScheduler.from_config(theirs.scheduler.config)
        theirs.set_progress_bar_config(disable=True)
        # on the studio's device thread, whose torch threads are the studio's (the last bit of a sum depends on them)
        expected = studio.models.worker.call(lambda: theirs("red apple", generator=torch.Generator().manual_seed(3),
                                                            num_inference_steps=5, guidance_scale=3.0,
                                                            **extra).images[0])
        done = studio.generate(request).images[0]
        assert _pixels(done.image).std() > 0 and np.array_equal(_pixels(done.image), _pixels(expected))
        assert ("Sampler: DPM++ 2M, Schedule type: Karras" if "Karras" in sampler else "Sampler: Euler,") in \
            done.infotext


def test_an_edm_model_inpaints_inside_the_mask_and_keeps_every_pixel_outside(playground):
    studio, _ = playground
    picture = gradient_image(64, 64).convert("RGB")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[20:44, 20:44] = 255
    done = studio.generate(InpaintRequest(prompt="red apple", init_image=picture, mask=Image.fromarray(mask),
                                          mask_blur=0, steps=4, seed=9, width=64, height=64))
    result, original = _pixels(done.images[0].image), _pixels(picture)
    outside = np.ones((64, 64), dtype=bool)
    outside[12:52, 12:52] = False          # beyond the mask's latent cells
    assert np.array_equal(result[outside], original[outside])
    assert np.abs(result[24:40, 24:40] - original[24:40, 24:40]).mean() > 3


def test_what_works_on_ddpms_schedule_is_refused_on_an_edm_model_saying_why(playground):
    """DDPM's samplers, Align Your Steps, classifier guidance and the explorer's views built on ᾱ_t are refused,
    naming the formulation and what to do instead; the explorer's sampler comparison runs, its default reference
    (DDIM) being the model's own sampler."""
    from pipelines.explorer import guidance
    from pipelines.explorer.comparison import compare
    from pipelines.explorer.reverse import record_trace
    from pipelines.explorer.service import Explorer

    studio, _ = playground
    common = dict(prompt="red apple", seed=3, steps=3, width=64, height=64)
    with pytest.raises(ValueError, match=f"The Heun sampler steps DDPM's noise schedule, and this model is {EDM}.*"
                                         "it runs Euler, DPM\\+\\+ 2M Karras"):
        studio.generate(Txt2ImgRequest(**common, sampler="Heun"))
    # the studio's default sampler (an API call's, DPM++ 2M on DDPM's σ) runs the model's own, saying so
    done = studio.generate(Txt2ImgRequest(**common, sampler="DPM++ 2M"))
    own = studio.generate(Txt2ImgRequest(**common, sampler="DPM++ 2M Karras")).images[0]
    assert np.array_equal(_pixels(done.images[0].image), _pixels(own.image)) and done.images[0].infotext == own.infotext
    assert any("this ran its own sampler, DPM++ 2M Karras" in note for note in done.messages)
    for settings, what in ((dict(schedule="Align Your Steps"), "Align Your Steps works on DDPM's noise schedule"),
                           (dict(classifier_scale=1.0, classifier_class="food & drink"), "Classifier guidance")):
        with pytest.raises(ValueError, match=f"{what}.*{EDM}"):
            studio.generate(Txt2ImgRequest(**common, **settings))
    explorer = Explorer(studio.models)
    with pytest.raises(ValueError, match=f"step-by-step trace.*{EDM}.*compare its samplers"):
        studio.models.worker.call(record_trace, studio.models, Txt2ImgRequest(**common, sampler="Euler"))
    with pytest.raises(ValueError, match=f"guidance comparison.*{EDM}"):
        studio.models.worker.call(guidance.compare_guidance, studio.models, prompt="red apple", steps=3, width=64,
                                  height=64)
    with pytest.raises(ValueError, match=f"Schedule \"model\".*{EDM}.*x_σ = x_0 \\+ σ·ε"):
        explorer.schedules(["model"], 100)
    # the sampling-schedule panel opens on the studio's default sampler: the model's own is drawn, saying so
    view = explorer.sampling_schedules(sampler="DPM++ 2M", steps=4, schedules=["Default"], quantity="sigmas")
    assert view.caption.startswith("DPM++ 2M steps DDPM's noise schedule") and len(view.table["Default"]["sigmas"]) == 4
    _, rows = studio.models.worker.call(compare, studio.models, Txt2ImgRequest(**common, sampler="Euler"),
                                        samplers=["Euler", "DPM++ 2M"], reference_steps=3)
    assert [(row.sampler, row.reference_sampler) for row in rows] == [("Euler", "DPM++ 2M Karras"),
                                                                      ("DPM++ 2M Karras", "DPM++ 2M Karras")]
    assert rows[1].rms_to_reference == 0 < rows[0].rms_to_reference


def test_the_edm_loss_is_the_denoised_images_error_at_the_models_sigma_levels():
    """edm.py writes EDM's loss on the UNet's raw output F: for any F, c_out²·(F − target)² is the denoised image's
    squared error (D = c_skip·x_σ + c_out·F against x_0, as diffusers' EDM scheduler preconditions it), the UNet reads
    c_in·x_σ at c_noise(σ) = ¼·log σ, and σ is one of the model's training levels."""
    from pipelines.core.samplers import make_scheduler
    from pipelines.training.edm import edm_batch, training_schedule
    scheduler = make_scheduler("DPM++ 2M Karras", {"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_data": 0.5})
    schedule = training_schedule(dict(scheduler.config) | {"_class_name": "EDMDPMSolverMultistepScheduler"})
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    indices = torch.tensor([0, 500, 999])
    batch = edm_batch(schedule, x0, noise, indices)
    sigma = schedule.sigmas[indices].view(-1, 1, 1, 1)
    x_sigma = x0 + sigma * noise
    torch.testing.assert_close(batch["x_t"], x_sigma / (sigma ** 2 + 0.25).sqrt())
    torch.testing.assert_close(batch["t"], 0.25 * sigma.flatten().log())
    model_output = torch.randn(3, 4, 8, 8, generator=generator)
    denoised = schedule.precondition_outputs(x_sigma, model_output, sigma)
    ours = batch["row_weight"] * (model_output - batch["target"]).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(ours, (denoised - x0).square().mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-6)
    assert 0.002 <= float(sigma.min()) < float(sigma.max()) <= 80.0


def test_a_lora_trains_on_an_edm_model_and_plain_diffusers_loads_it(playground, tmp_path):
    """LoRA training on the EDM model (its σ levels and preconditioning, edm.py): the loss is finite, the run says
    min-SNR is not applied, and the file loads in plain diffusers' SDXL pipeline and moves its image."""
    from diffusers import StableDiffusionXLPipeline

    from pipelines.training.edm import MIN_SNR_NOTE
    from tests.test_training_methods import request as training
    from tests.test_training_methods import run

    studio, folder = playground
    result, losses = run(studio, training(name="edm-frames", trigger="framed", steps=4, learning_rate=1e-2), tmp_path)
    assert len(losses) == 4 and np.isfinite(losses).all() and result.path.is_file()
    assert MIN_SNR_NOTE in result.warnings
    plain = StableDiffusionXLPipeline.from_pretrained(folder)
    plain.set_progress_bar_config(disable=True)
    arguments = dict(prompt="framed, red", num_inference_steps=3, width=64, height=64, output_type="np")
    before = plain(**arguments, generator=torch.Generator().manual_seed(1)).images
    plain.load_lora_weights(str(result.path.parent), weight_name=result.path.name, adapter_name="edm-frames")
    after = plain(**arguments, generator=torch.Generator().manual_seed(1)).images
    assert np.abs(after - before).mean() > 1e-3
