"""The diffusion transformers (pipelines/core/transformers.py) on seeded tiny SD 3, Flux.1 dev, Flux 2 [dev] and
[klein], PixArt-Σ and Sana pipelines built in-process (recipe/tiny.py, at diffusers' own test sizes), each saved as a
diffusers folder and loaded the way a user's is: each family's own samplers run and give the image diffusers' own
pipeline gives for the same seed; Image-to-Image starts from the input; every family inpaints inside the mask and
keeps every pixel outside; Flux's distilled guidance is its own knob and round-trips through the infotext; a LoRA
moves the image; what a family does not run yet is refused naming the family."""

from __future__ import annotations

import re
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core.call import prepare
from pipelines.core.transformers import is_flow, transformer_samplers
from pipelines.io.metadata import infotext_to_settings, parse_infotext
from pipelines.tasks.img2img import Img2ImgRequest
from pipelines.tasks.inpaint import InpaintRequest
from pipelines.tasks.outpaint import OutpaintRequest
from pipelines.tasks.txt2img import Txt2ImgRequest
from recipe.tiny import (
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux2_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_pixart_alpha_pipeline,
    build_tiny_pixart_pipeline,
    build_tiny_sana_pipeline,
    build_tiny_sd3_pipeline,
)
from tests.test_explorer_forward import gradient_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUILDS = {"SD 3.x": build_tiny_sd3_pipeline, "Flux": build_tiny_flux_pipeline, "PixArt-Σ": build_tiny_pixart_pipeline,
          "PixArt-α": build_tiny_pixart_alpha_pipeline, "Sana": build_tiny_sana_pipeline,
          "Flux 2 dev": build_tiny_flux2_pipeline, "Flux 2 klein": build_tiny_flux2_klein_pipeline}
# variants within a family that change what its layers hold: the tabs' core tests run on them too
VARIANTS = {"Flux schnell": partial(build_tiny_flux_pipeline, guidance_embeds=False),
            "SD 3.5": partial(build_tiny_sd3_pipeline, sd35=True)}
FLOW_EULER = {"SD 3.x": "FlowMatchEulerDiscreteScheduler", "Flux": "FlowMatchEulerDiscreteScheduler",
              "Sana": "FlowMatchEulerDiscreteScheduler", "PixArt-Σ": "DPMSolverMultistepScheduler",
              "PixArt-α": "DPMSolverMultistepScheduler", "Flux 2 dev": "FlowMatchEulerDiscreteScheduler",
              "Flux 2 klein": "FlowMatchEulerDiscreteScheduler", "Flux schnell": "FlowMatchEulerDiscreteScheduler",
              "SD 3.5": "FlowMatchEulerDiscreteScheduler"}


@pytest.fixture(scope="module")
def families(tmp_path_factory, worker):
    """A studio (manager + generator), and where each family's tiny pipeline is saved as a diffusers folder (built
    when a test first uses it)."""
    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager

    root = tmp_path_factory.mktemp("families")
    folders = {family: root / "models" / family.lower().replace(" ", "-").replace("-σ", "")
               for family in BUILDS | VARIANTS}
    models = ModelManager(MemoryManager(device="cpu"), worker=worker, models_dir=root / "models")
    return Generator(models, None), folders


def use(families, family: str):
    studio, folders = families
    folder = folders[family]
    if not (folder / "model_index.json").exists():
        (BUILDS | VARIANTS)[family](folder.parent.parent / "build").save_pretrained(folder)
    if studio.models.current is None or studio.models.current.source.location != str(folder):
        studio.models.load(str(folder), from_ui=True)
    return studio


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("family", BUILDS | VARIANTS)
def test_each_family_runs_its_own_samplers_and_gives_diffusers_image(families, family):
    studio = use(families, family)
    model = studio.models.current
    samplers = transformer_samplers(model.pipeline, model.scheduler_config)
    size = (64, 32) if family == "Sana" else (64, 48)     # Sana's sides are multiples of 32
    for sampler in samplers[:5]:
        done = studio.generate(Txt2ImgRequest(prompt="red apple", steps=3, width=size[0], height=size[1], seed=3,
                                              sampler=sampler, guidance_scale=3.0))
        assert done.images[0].image.size == size, sampler
        assert f"Sampler: {sampler}," in done.images[0].infotext
    if family.startswith("Flux"):   # Flux's pipelines pass their own sigmas and shift: only these samplers take them
        assert samplers == ("Euler", "UniPC", "LCM")
    # Flux.1 [dev] and Flux 2 [dev] have a distilled-guidance input; [schnell] has none, and its infotext claims none
    assert ("Distilled CFG Scale" in done.images[0].infotext) == (family in ("Flux", "Flux 2 dev")), family
    # the studio's image against diffusers' own pipeline called as a user would, with the model's own scheduler
    # (a fresh one from its config) and the seed's CPU generator
    own_sampler = "DPM++ 2M" if family.startswith("PixArt") else "Euler"
    request = Txt2ImgRequest(prompt="red apple", negative_prompt="blurry", steps=4, width=64, height=64, seed=11,
                             sampler=own_sampler, guidance_scale=3.0)

    def ours():
        call = prepare(studio.models, request)
        assert type(call.pipeline.scheduler).__name__ == FLOW_EULER[family]
        return call(0)

    studied = studio.models.worker.call(ours)
    plain = dict(prompt="red apple", negative_prompt="blurry", num_inference_steps=4, width=64, height=64,
                 guidance_scale=3.0, generator=torch.Generator("cpu").manual_seed(11), output_type="latent")
    if family in ("Flux", "Flux schnell"):
        plain.update(true_cfg_scale=3.0, guidance_scale=3.5)
    if family.startswith("Flux 2"):   # no negative prompt; [dev]'s guidance is the distilled one; the last layer
        del plain["negative_prompt"]  # of the tiny Qwen (of two), the first of the tiny Mistral (of one)
        plain.update(guidance_scale=3.5 if family == "Flux 2 dev" else 3.0, text_encoder_out_layers=(1,))
    if family.startswith("PixArt") or family == "Sana":
        plain.update(use_resolution_binning=False)
    if family.startswith("PixArt"):
        plain.update(clean_caption=False)

    def theirs():
        pipeline = model.pipeline
        kept, pipeline.scheduler = pipeline.scheduler, type(pipeline.scheduler).from_config(model.scheduler_config)
        try:
            return pipeline(**plain).images
        finally:
            pipeline.scheduler = kept

    torch.testing.assert_close(studied, studio.models.worker.call(theirs), rtol=0, atol=0)


# a block other than the PAG pipeline's default, and the module it names
OTHER_PAG_BLOCK = {"SD 3.x": ("blocks.0", "transformer_blocks.0.attn"),
                   "PixArt-Σ": ("blocks.0", "transformer_blocks.0.attn1"),
                   "Sana": ("transformer_blocks.1", "transformer_blocks.1.attn1")}


@pytest.mark.parametrize("family", OTHER_PAG_BLOCK)
def test_pag_on_a_transformer_is_diffusers_own_pag_pipeline(families, family):
    """Perturbed-attention guidance on the families diffusers has a PAG pipeline for: the studio's image is that
    pipeline's for the same seed and blocks, at its default block and at another one named, and the infotext names
    the block; PAG moves the image; a run that fails mid-way leaves the transformer's own attention; a layer the
    transformer lacks, or PAG in another tab, is refused saying so."""
    import diffusers

    from pipelines.core.transformer_call import PAG_PIPELINES

    studio = use(families, family)
    model = studio.models.current
    sampler = "DPM++ 2M" if family.startswith("PixArt") else "Euler"
    common = dict(prompt="red apple", negative_prompt="blurry", steps=3, width=64, height=64, seed=4,
                  sampler=sampler, guidance_scale=3.0)
    plain = dict(prompt="red apple", negative_prompt="blurry", num_inference_steps=3, width=64, height=64,
                 guidance_scale=3.0, pag_scale=2.0, output_type="latent",
                 **({"use_resolution_binning": False} if not family.startswith("SD 3") else {}),
                 **({"clean_caption": False} if family.startswith("PixArt") else {}))
    kind = getattr(diffusers, PAG_PIPELINES[family])
    layer, module = OTHER_PAG_BLOCK[family]
    own = {name: type(processor) for name, processor in model.pipeline.transformer.attn_processors.items()}
    assert not any(kind.__name__.startswith("PAG") for kind in own.values())

    def theirs(**layers):
        pipeline = kind.from_pipe(model.pipeline, **layers)
        pipeline.scheduler = type(model.pipeline.scheduler).from_config(model.scheduler_config)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(**plain, generator=torch.Generator("cpu").manual_seed(4)).images

    for layers, pag_layers in (({}, "mid"), ({"pag_applied_layers": [f"^{re.escape(module)}$"]}, layer)):
        request = Txt2ImgRequest(**common, pag_scale=2.0, pag_layers=pag_layers)
        studied = studio.models.worker.call(lambda: prepare(studio.models, request)(0))
        torch.testing.assert_close(studied, studio.models.worker.call(theirs, **layers), rtol=0, atol=0)
    guided = studio.generate(Txt2ImgRequest(**common, pag_scale=2.0)).images[0]
    unguided = studio.generate(Txt2ImgRequest(**common)).images[0]
    assert np.abs(pixels(guided.image) - pixels(unguided.image)).mean() > 0.1
    default = "transformer_blocks.0" if family == "Sana" else "blocks.1"
    assert "PAG scale: 2" in guided.infotext and f"PAG layers: {default}" in guided.infotext
    # a run that fails inside the pipeline's loop (Stop, out of memory) leaves no PAG processor behind
    def fails_mid_way():
        def boom(*arguments):
            raise RuntimeError("mid-way")
        prepare(studio.models, Txt2ImgRequest(**common, pag_scale=2.0))(0, callback=boom)
    with pytest.raises(RuntimeError, match="mid-way"):
        studio.models.worker.call(fails_mid_way)
    assert {name: type(p) for name, p in model.pipeline.transformer.attn_processors.items()} == own
    with pytest.raises(ValueError, match="PAG layer 'blocks.7' names no self-attention module of this"):
        studio.generate(Txt2ImgRequest(**common, pag_scale=2.0, pag_layers="blocks.7"))
    with pytest.raises(ValueError, match="PAG on a diffusion transformer runs in Text-to-Image"):
        studio.generate(Img2ImgRequest(**common, pag_scale=2.0, init_image=gradient_image(64, 64)))


def test_pag_layers_name_whole_blocks_and_sd3s_joint_attention():
    """A PAG layer id names whole blocks, matched against a dotted prefix of each module's name ("blocks.1" is
    block 1, not 10 and 11 too, as diffusers' own search would take them), and on SD 3 only a block's joint
    attention, not SD 3.5's second, image-only one, which diffusers' SD 3 PAG attention cannot read."""
    from diffusers import SD3Transformer2DModel

    from pipelines.core.transformer_call import pag_module_names

    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=12,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=16, pooled_projection_dim=16, out_channels=4,
                                        dual_attention_layers=(0, 1))
    assert pag_module_names(transformer, "SD 3.x", ["blocks.1"]) == ["transformer_blocks.1.attn"]
    assert pag_module_names(transformer, "SD 3.x", [r"blocks\.1\.", "blocks.(1|11)"]) == \
        ["transformer_blocks.1.attn", "transformer_blocks.11.attn"]
    assert len(pag_module_names(transformer, "SD 3.x", ["attn"])) == 12
    assert pag_module_names(transformer, "SD 3.x", ["1"]) == ["transformer_blocks.1.attn"]
    with pytest.raises(ValueError, match="PAG layer 'blocks.12' names no self-attention module"):
        pag_module_names(transformer, "SD 3.x", ["blocks.12"])
    with pytest.raises(ValueError, match="PAG layer '\\(\\?i\\)blocks' is not a valid layer pattern"):
        pag_module_names(transformer, "SD 3.x", ["(?i)blocks"])


def test_pag_is_refused_where_diffusers_pag_attention_would_change_the_model(families):
    """diffusers' PAG attention for SD 3 (and Sana) leaves out q/k normalisation, which SD 3.5 has: on such a model
    every row of a perturbed block would change, so PAG is refused before any work, saying why."""
    studio = use(families, "SD 3.5")
    with pytest.raises(ValueError, match="leaves out this model's q/k normalisation \\(rms_norm"):
        studio.generate(Txt2ImgRequest(prompt="a", steps=2, width=64, height=64, sampler="Euler", pag_scale=2.0))


@pytest.mark.parametrize("family", BUILDS | VARIANTS)
def test_image_to_image_starts_from_the_input(families, family):
    """With the transformer's output projection zeroed (the model predicts 0: nothing moves), the final latents are
    where the run started: near the input's latents at a low strength, pure noise at strength 1. (A random model's
    steps, and a random VAE's decode, would hide where it started.)"""
    from pipelines.core.images import image_to_tensor
    from pipelines.core.vae import encode

    studio = use(families, family)
    source = gradient_image(64, 64)

    def distance(strength: float, sampler: str) -> float:
        request = Img2ImgRequest(prompt="red apple", steps=10, width=64, height=64, seed=5, sampler=sampler,
                                 init_image=source, strength=strength)

        def run():
            call = prepare(studio.models, request)
            start = encode(call.pipeline.vae, image_to_tensor(source))
            output = call.pipeline.transformer.proj_out
            kept = [parameter.detach().clone() for parameter in output.parameters()]
            try:
                with torch.no_grad():
                    for parameter in output.parameters():
                        parameter.zero_()
                final = call.spatial(call(0))
                scheduler = call.pipeline.scheduler     # the t it started at: its sigma at its begin index
                first = float(scheduler.sigmas[scheduler.begin_index or 0])
                return float((final - start).abs().mean()), first
            finally:
                with torch.no_grad():
                    for parameter, value in zip(output.parameters(), kept):
                        parameter.copy_(value)
        return studio.models.worker.call(run)

    model = studio.models.current
    samplers = transformer_samplers(model.pipeline, model.scheduler_config, "img2img")
    # the first-order sampler and the multistep solver (its last, lower-order step must fall on the last step kept)
    for sampler in [name for name in ("Euler", "DPM++ 2M") if name in samplers]:
        (near, t_near), (far, t_far) = distance(0.1, sampler), distance(1.0, sampler)
        if is_flow(model.scheduler_config):
            # nothing moves, so x_final − x_0 = t_0·(ε − x_0): the distances are in the ratio of the start times
            assert abs(near / far - t_near / t_far) <= 0.01 * t_near / t_far + 1e-4, (sampler, near, far, t_near)
            assert t_near < 0.5 and t_far > 0.99, (sampler, t_near, t_far)
        else:         # DDPM's ε: near the input's latents at a low strength
            assert near < far / 4, (sampler, near, far)
    # the real model, a batch of two: finite, the size asked for, each image its own
    done = studio.generate(Img2ImgRequest(prompt="red apple", steps=4, width=64, height=64, seed=5,
                                          sampler=samplers[-1], init_image=source, strength=0.5, batch_size=2))
    images = [pixels(item.image) for item in done.images]
    assert len(images) == 2 and images[0].shape == (64, 64, 3) and "Denoising strength: 0.5" in done.images[0].infotext
    assert images[0].std() > 0 and (images[0] != images[1]).any()
    if family in ("SD 3.x", "Flux", *VARIANTS):    # their image-to-image pipelines noise the start with scale_noise
        assert "DPM++ 2M" not in samplers and "UniPC" not in samplers


@pytest.mark.parametrize("family", ["SD 3.x", "Flux", "Flux 2 klein", "Flux 2 dev", "PixArt-Σ", "Sana", *VARIANTS])
def test_inpainting_changes_the_mask_and_keeps_every_pixel_outside(families, family):
    studio = use(families, family)
    picture = gradient_image(64, 64).convert("RGB")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    done = studio.generate(InpaintRequest(prompt="red apple", steps=4, width=64, height=64, seed=2, sampler="Euler",
                                          init_image=picture, mask=Image.fromarray(mask), mask_blur=0))
    before, after = pixels(picture), pixels(done.images[0].image)
    outside = mask == 0
    assert (after[outside] == before[outside]).all()
    assert (after[~outside] != before[~outside]).any(axis=-1).mean() > 0.5
    extended = studio.generate(OutpaintRequest(prompt="red apple", steps=4, width=64, height=64, seed=2,
                                               sampler="Euler", init_image=picture, right=16, mask_blur=0))
    grown = pixels(extended.images[0].image)
    assert grown.shape[:2] == (64, 80)
    assert (grown[:, :64] == before).all()


@pytest.mark.parametrize("family", ["PixArt-Σ", "PixArt-α", "Sana", "Flux 2 dev"])
def test_pixart_sana_and_flux_2_dev_inpaint_by_keeping_the_known_latents_after_every_step(families, family):
    """diffusers has no inpainting pipeline for them: their text-to-image call starts from the image and, after every
    step of any sampler, the cells outside the mask are the input's latents noised to that step, so that the run
    ends on the input's own latents there, and on new ones inside."""
    from pipelines.core.images import image_to_tensor
    from pipelines.core.vae import encode

    studio = use(families, family)
    picture = gradient_image(64, 64).convert("RGB")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    model = studio.models.current
    names = transformer_samplers(model.pipeline, model.scheduler_config, "inpaint")
    # the first ones, a multistep solver, and DDIM (which keeps no step index)
    for sampler in dict.fromkeys([*names[:2], *(name for name in ("DPM++ 2M", "DDIM") if name in names)]):
        request = InpaintRequest(prompt="red apple", steps=5, width=64, height=64, seed=2, sampler=sampler,
                                 init_image=picture, mask=Image.fromarray(mask), mask_blur=0,
                                 inpaint_area="Whole picture", strength=0.8)

        def run():
            call = prepare(studio.models, request)
            return call.spatial(call(0)), encode(call.pipeline.vae, image_to_tensor(picture)), call.pipeline
        final, start, pipeline = studio.models.worker.call(run)
        cells = final.shape[-1] // 2
        # kept: the input's latents (as the pipeline's own image processor and encode read the picture)
        torch.testing.assert_close(final[..., :cells], start[..., :cells], rtol=0, atol=1e-5, msg=sampler)
        assert (final[..., cells:] - start[..., cells:]).abs().mean() > 0.05, sampler
        assert pipeline.start_image is None and pipeline.start_mask is None          # nothing left on the pipeline
    if family == "Sana":      # flow matching: after step i the kept cells are (1 − t_i)·x_0 + t_i·ε, one ε throughout
        request = InpaintRequest(prompt="red apple", steps=5, width=64, height=64, seed=2, sampler="Euler",
                                 init_image=picture, mask=Image.fromarray(mask), mask_blur=0,
                                 inpaint_area="Whole picture", strength=0.8)
        kept = []

        def record():
            call = prepare(studio.models, request)
            call(0, callback=lambda pipe, step, t, tensors: kept.append(tensors["latents"][..., :cells].clone())
                 or tensors)
            return call.pipeline.scheduler.sigmas, encode(call.pipeline.vae, image_to_tensor(picture))[..., :cells]
        sigmas, clean = studio.models.worker.call(record)
        noises = [(latents - (1 - t) * clean) / t for latents, t in zip(kept[:-1], sigmas[1:].tolist())]
        for noise in noises[1:]:
            torch.testing.assert_close(noise, noises[0], rtol=0, atol=1e-4)
        assert (noises[0] - clean).abs().mean() > 0.1 and 0.5 < float(noises[0].std()) < 2   # noise, not x_0


def test_a_stochastic_sampler_inpaints_pixart_from_the_seed_alone(families):
    """The blending step keeps the sampler's signature, so the pipeline still hands it the seed's generator: Euler a
    gives the same image for the same seed whatever torch's global random state."""
    studio = use(families, "PixArt-Σ")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    request = InpaintRequest(prompt="red apple", steps=4, width=64, height=64, seed=8, sampler="Euler a",
                             init_image=gradient_image(64, 64).convert("RGB"), mask=Image.fromarray(mask),
                             mask_blur=0)
    images = []
    for state in (1, 2):
        torch.manual_seed(state)
        images.append(pixels(studio.generate(request).images[0].image))
    assert (images[0] == images[1]).all()


def test_flux_distilled_guidance_is_its_own_knob_and_round_trips(families):
    studio = use(families, "Flux")
    common = dict(prompt="red apple", steps=3, width=64, height=64, seed=9, sampler="Euler")
    low = studio.generate(Txt2ImgRequest(**common, guidance_scale=1.0, distilled_guidance=1.0)).images[0]
    high = studio.generate(Txt2ImgRequest(**common, guidance_scale=1.0, distilled_guidance=6.0)).images[0]
    assert np.abs(pixels(low.image) - pixels(high.image)).max() > 0
    assert "Distilled CFG Scale: 6" in high.infotext and "CFG scale: 1," in high.infotext
    prompt, _, parameters = parse_infotext(high.infotext)
    settings = infotext_to_settings(parameters)
    assert settings["distilled_guidance"] == 6.0 and settings["sampler"] == "Euler"
    again = studio.generate(Txt2ImgRequest(prompt=prompt, **{key: settings[key] for key in (
        "steps", "width", "height", "seed", "sampler", "guidance_scale", "distilled_guidance")})).images[0]
    assert (pixels(again.image) == pixels(high.image)).all()
    # the studio's default sampler does not run Flux: its own runs, and the note says so
    done = studio.generate(Txt2ImgRequest(prompt="red apple", steps=2, width=64, height=64, seed=1))
    assert "Sampler: Euler," in done.images[0].infotext
    assert any("DPM++ 2M does not run Text-to-Image on Flux models; this ran Euler" in note for note in done.messages)
    with pytest.raises(ValueError, match="Flux models run the samplers Euler, UniPC, LCM; 'Heun'"):
        studio.generate(Txt2ImgRequest(prompt="red apple", steps=2, width=64, height=64, sampler="Heun"))


def test_what_a_family_does_not_run_is_refused_naming_it(families):
    from pipelines.tasks.controlnet import ControlNetRequest

    studio = use(families, "Sana")
    picture = gradient_image(64, 64)
    with pytest.raises(ValueError, match="emoji-controlnet-canny is a ControlNet for the embedded model; sana is a "
                                         "Sana model"):
        studio.generate(ControlNetRequest(prompt="a", steps=2, width=64, height=64, control_image=picture))
    with pytest.raises(ValueError, match="ControlNet does not run PixArt-Σ models yet: diffusers has no ControlNet"):
        use(families, "PixArt-Σ").generate(ControlNetRequest(prompt="a", steps=2, width=64, height=64,
                                                             control_image=picture))
    studio = use(families, "Sana")
    with pytest.raises(ValueError, match="Sana models run with plain CFG and PAG: ICG, classifier guidance, the "
                                         "guidance interval"):
        studio.generate(Txt2ImgRequest(prompt="a", steps=2, width=64, height=64, sampler="Euler", cfg_start=0.5))
    with pytest.raises(ValueError, match="PAG on a diffusion transformer runs in Text-to-Image on SD 3.x, PixArt-Σ, "
                                         "Sana models"):
        use(families, "Flux").generate(Txt2ImgRequest(prompt="a", steps=2, width=64, height=64, pag_scale=2.0))
    studio = use(families, "Sana")
    # a distilled guidance restored from a Flux image onto another model is left unused, and said so
    done = studio.generate(Txt2ImgRequest(prompt="a", steps=2, width=64, height=64, sampler="Euler",
                                          distilled_guidance=5.0))
    assert any(note.startswith("Distilled CFG scale 5 is Flux dev's guidance input; this model has none")
               for note in done.messages) and "Distilled CFG Scale" not in done.images[0].infotext
    assert studio.generate(Txt2ImgRequest(prompt="a", steps=2, width=64, height=64, sampler="Euler")).images


@pytest.mark.parametrize("family", ["Flux", "PixArt-Σ", "Flux 2 dev"])
def test_previews_arrive_and_a_stop_interrupts_after_the_step_in_progress(families, family, previews_in_lockstep):
    """Flux's previews unpack its 2×2-packed latents (Flux 2's also un-normalise them); PixArt's pipeline has only
    the old step callback, which the studio stops by leaving its loop."""
    import threading

    from pipelines.core.results import Preview

    studio = use(families, family)
    stop, events = threading.Event(), []
    for event in studio.run(Txt2ImgRequest(prompt="red apple", steps=6, width=64, height=64, seed=4, sampler="Euler",
                                           preview_every=1, preview_mode="linear"), stop=stop):
        events.append(event)
        if isinstance(event, Preview):
            if event.step == 2:
                stop.set()
            previews_in_lockstep()
            assert event.images[0].size == (64, 64)
    done = events[-1]
    assert done.stopped and done.images[0].steps_done == 2 and not done.images[0].finished
    assert "Stopped at step: 2" in done.images[0].infotext


@pytest.mark.parametrize("family", ["SD 3.x", "Flux", "Sana", "Flux 2 klein"])
def test_a_lora_named_in_the_prompt_moves_the_image_and_leaves_it(families, family, tmp_path):
    """A diffusers-format LoRA for the family's transformer (saved by the family's own `save_lora_weights`), named in
    the prompt as in A1111: it patches the transformer and moves the image; the plain prompt after it gives the
    plain image again."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    studio = use(families, family)
    trained = BUILDS[family](tmp_path / "build", seed=1)
    torch.manual_seed(1)
    trained.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                               target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    name = f"tiny-{family.lower().replace(' ', '-')}-lora"
    type(trained).save_lora_weights(studio.models.lora_dir, weight_name=f"{name}.safetensors",
                                    transformer_lora_layers=get_peft_model_state_dict(trained.transformer))
    common = dict(steps=3, width=64, height=64, seed=6, sampler="Euler", guidance_scale=1.0)
    plain = studio.generate(Txt2ImgRequest(prompt="red apple", **common)).images[0]
    moved = studio.generate(Txt2ImgRequest(prompt=f"red apple <lora:{name}:1>", **common))
    # (a random VAE decodes any latents to much the same texture: the move is small in pixels, and exact)
    assert np.abs(pixels(moved.images[0].image) - pixels(plain.image)).mean() > 0.1
    assert any(note.startswith(f"LoRA {name}: weight 1,") for note in moved.messages)
    assert f"Lora hashes: \"{name}:" in moved.images[0].infotext or f"Lora hashes: {name}:" in moved.images[0].infotext
    again = studio.generate(Txt2ImgRequest(prompt="red apple", **common)).images[0]
    assert (pixels(again.image) == pixels(plain.image)).all()


def test_a_kohya_flux_lora_is_the_same_lora_as_in_diffusers_format(families):
    """A Flux LoRA in kohya's sd-scripts layout, as Civitai and Forge carry them (BFL's module names, `alpha`, the
    attention's q, k and v fused into one `qkv` pair), named in the prompt: it moves the image exactly as the same
    weights in diffusers' layout do (q, k and v each their own, `alpha / rank` folded in)."""
    from safetensors.torch import save_file

    studio = use(families, "Flux")
    rank, alpha, width = 4, 2.0, studio.models.current.pipeline.transformer.inner_dim
    generator = torch.Generator().manual_seed(7)

    def random(*shape):
        return torch.randn(*shape, generator=generator) * 0.5

    kohya, ours = {}, {}
    # (kohya module, its input and output widths, diffusers' modules it splits into along the output)
    modules = (("double_blocks_0_img_attn_qkv", width, 3 * width, ("attn.to_q", "attn.to_k", "attn.to_v")),
               ("double_blocks_0_txt_attn_qkv", width, 3 * width, ("attn.add_q_proj", "attn.add_k_proj",
                                                                   "attn.add_v_proj")),
               ("double_blocks_0_img_mlp_0", width, 4 * width, ("ff.net.0.proj",)),
               ("double_blocks_0_txt_mod_lin", width, 6 * width, ("norm1_context.linear",)))
    for module, inputs, outputs, targets in modules:
        down, up = random(rank, inputs), random(outputs, rank)
        kohya.update({f"lora_unet_{module}.lora_down.weight": down, f"lora_unet_{module}.lora_up.weight": up,
                      f"lora_unet_{module}.alpha": torch.tensor(alpha)})
        for target, part in zip(targets, up.chunk(len(targets))):
            ours.update({f"transformer.transformer_blocks.0.{target}.lora_A.weight": down * (alpha / rank),
                         f"transformer.transformer_blocks.0.{target}.lora_B.weight": part.contiguous()})
    studio.models.lora_dir.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(studio.models.lora_dir / "flux-kohya.safetensors"))
    save_file(ours, str(studio.models.lora_dir / "flux-diffusers.safetensors"))
    common = dict(steps=3, width=64, height=64, seed=6, sampler="Euler", guidance_scale=1.0)
    plain, from_kohya, from_ours = (
        pixels(studio.generate(Txt2ImgRequest(prompt=f"red apple{tag}", **common)).images[0].image)
        for tag in ("", " <lora:flux-kohya:1>", " <lora:flux-diffusers:1>"))
    assert np.abs(from_kohya - plain).mean() > 0.1
    assert (from_kohya == from_ours).all()


def test_an_sd3_folder_saved_without_its_t5_loads_and_paints(families):
    """SD 3 runs without its 4.7B-parameter T5 (`text_encoder_3=None`, zeros in its place): such a folder lists the
    encoder as absent, which diffusers' loader refuses unless told; the studio tells it, and every paint tab runs."""
    from diffusers import StableDiffusion3Pipeline

    studio, folders = families
    folder = folders["SD 3.x"].parent / "sd3-without-t5"
    built = build_tiny_sd3_pipeline(folder.parent.parent / "build")
    StableDiffusion3Pipeline(**built.components | {"text_encoder_3": None, "tokenizer_3": None}).save_pretrained(folder)
    studio.models.load(str(folder), from_ui=True)
    assert studio.models.current.pipeline.text_encoder_3 is None
    picture = gradient_image(64, 64).convert("RGB")
    common = dict(prompt="red apple", steps=2, width=64, height=64, seed=3, sampler="Euler")
    for request in (Txt2ImgRequest(**common), Img2ImgRequest(**common, init_image=picture, strength=0.5),
                    InpaintRequest(**common, init_image=picture, mask=Image.new("L", (64, 64), 255))):
        assert pixels(studio.generate(request).images[0].image).std() > 0, type(request).__name__


def test_a_lora_on_pixart_is_refused_saying_why(families):
    studio = use(families, "PixArt-Σ")
    studio.models.lora_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    save_file({"transformer.x.lora_A.weight": torch.zeros(4, 8)}, studio.models.lora_dir / "some-lora.safetensors")
    with pytest.raises(ValueError, match="PixArtSigmaPipeline\\) takes no LoRA files in diffusers"):
        studio.generate(Txt2ImgRequest(prompt="a <lora:some-lora:1>", steps=2, width=64, height=64, sampler="Euler"))


def test_the_studio_serves_a_flux_model_from_launch_to_every_tab(tmp_path):
    """`launch.py --model <a Flux folder>`, driven through the API as a script would: the sampler menu holds Flux's
    samplers only, the defaults are Flux's (Euler, CFG 1), the distilled guidance is a parameter that reaches the
    infotext, Image-to-Image answers, and the ControlNet tab refuses the shipped (embedded-model) ControlNet naming
    both families."""
    from gradio_client import Client, handle_file

    import launch
    from studio.app import serve
    from tests.test_server import free_port

    folder = tmp_path / "models" / "tiny-flux"
    build_tiny_flux_pipeline(tmp_path / "build").save_pretrained(folder)
    args = launch.parse_args(["--model", str(folder), "--device", "cpu", "--outputs", str(tmp_path / "outputs"),
                              "--port", str(free_port())])
    app, context = launch.build(args)
    serve(app, server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True)
    try:
        assert "**Model:** tiny-flux (folder" in context.status_markdown() and " · Flux · " in context.status_markdown()
        client = Client(f"http://{args.host}:{args.port}/", verbose=False)
        endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/txt2img"]
        parameters = {item["parameter_name"]: item for item in endpoint["parameters"]}
        assert parameters["sampler"]["type"]["enum"] == ["Euler", "UniPC", "LCM"]
        assert parameters["sampler"]["parameter_default"] == "Euler"
        assert parameters["guidance_scale"]["parameter_default"] == 1.0
        _, infotext, status, *_ = client.predict(prompt="red apple", steps=2, width=64, height=64, seed=3,
                                                 distilled_guidance=5.0, api_name="/txt2img")
        assert "Distilled CFG Scale: 5, " in infotext and "Sampler: Euler," in infotext and "Seed 3" in status
        picture = tmp_path / "picture.png"
        gradient_image(64, 64).save(picture)
        _, infotext, *_ = client.predict(prompt="red apple", init_image=handle_file(str(picture)), strength=0.5,
                                         steps=2, width=64, height=64, api_name="/img2img")
        assert "Denoising strength: 0.5" in infotext
        refused = "emoji-controlnet-canny is a ControlNet for the embedded model; tiny-flux is a Flux model"
        with pytest.raises(Exception, match=refused):
            client.predict(prompt="red apple", control_image=handle_file(str(picture)), steps=2,
                           api_name="/controlnet")
    finally:
        app.close()
        context.models.unload()


def test_a_controlnet_steers_sd3_flux_and_sana_and_another_familys_is_refused_naming_both(families):
    """Each family's own ControlNet (diffusers' SD3ControlNetModel / FluxControlNetModel / SanaControlNetModel, from
    a folder under models/controlnet/): at weight 0 the Text-to-Image image bit for bit, at weight 1 another; two
    units add up (diffusers' multi-ControlNet; Sana's pipeline takes one, and says so); a ControlNet of another
    family is refused naming both."""
    from PIL import ImageDraw

    from pipelines.tasks.controlnet import ControlNetRequest
    from recipe.tiny import build_tiny_transformer_controlnet

    studio, folders = families
    control = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(control).rectangle((20, 10, 44, 54), outline="white", width=3)
    for family in ("SD 3.x", "Flux", "Sana"):
        studio = use(families, family)
        name = f"tiny-{family.split()[0].lower().replace('sd', 'sd3')}-controlnet"
        build_tiny_transformer_controlnet(studio.models.current.pipeline).save_pretrained(
            studio.models.models_dir / "controlnet" / name)
        common = dict(prompt="red apple", steps=3, width=64, height=64, seed=8, sampler="Euler", guidance_scale=1.0)
        plain = pixels(studio.generate(Txt2ImgRequest(**common)).images[0].image)
        unit = dict(control_image=control, model=name, preprocessor="none")
        unused = pixels(studio.generate(ControlNetRequest(**common, **unit, weight=0.0)).images[0].image)
        assert (unused == plain).all(), family
        steered = studio.generate(ControlNetRequest(**common, **unit)).images[0]
        assert np.abs(pixels(steered.image) - plain).mean() > 1 and f"Model: {name}" in steered.infotext
        second = {"image": control, "model": name, "preprocessor": "none"}
        if family == "Sana":
            with pytest.raises(ValueError, match="Sana's ControlNet pipeline takes one unit"):
                studio.generate(ControlNetRequest(**common, **unit, more_units=[second]))
            with pytest.raises(ValueError, match="steering every step: set Starting and Ending control step to 0"):
                studio.generate(ControlNetRequest(**common, **unit, end=0.5))
            continue
        two = studio.generate(ControlNetRequest(**common, **unit, more_units=[second]))
        assert np.abs(pixels(two.images[0].image) - pixels(steered.image)).mean() > 0
    # now on Flux: SD 3's ControlNet, and the embedded model's shipped one, are refused naming both families
    studio = use(families, "Flux")
    with pytest.raises(ValueError, match="tiny-sd3-controlnet is a ControlNet for SD 3.x; flux is a Flux model"):
        studio.generate(ControlNetRequest(prompt="a", steps=2, width=64, height=64, sampler="Euler",
                                          control_image=control, model="tiny-sd3-controlnet", preprocessor="none"))
    with pytest.raises(ValueError, match="emoji-controlnet-canny is a ControlNet for the embedded model; flux is a"):
        studio.generate(ControlNetRequest(prompt="a", steps=2, width=64, height=64, sampler="Euler",
                                          control_image=control, preprocessor="none"))


def test_a_transformer_controlnet_cached_from_the_hub_is_read_as_its_own_class(families, tmp_path, monkeypatch):
    """A hub id of a Flux ControlNet in the local cache (models--owner--name/snapshots/<rev>) is read as the class its
    cached config names, FluxControlNetModel, and steers."""
    import huggingface_hub.constants as constants

    from pipelines.tasks.controlnet import ControlNetRequest
    from recipe.tiny import build_tiny_transformer_controlnet

    studio = use(families, "Flux")
    repo = tmp_path / "hub" / "models--someone--tiny-flux-controlnet"
    build_tiny_transformer_controlnet(studio.models.current.pipeline).save_pretrained(repo / "snapshots" / ("2" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("2" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    common = dict(prompt="red apple", steps=3, width=64, height=64, seed=8, sampler="Euler", guidance_scale=1.0)
    plain = pixels(studio.generate(Txt2ImgRequest(**common)).images[0].image)
    steered = studio.generate(ControlNetRequest(**common, control_image=gradient_image(64, 64).convert("RGB"),
                                                model="someone/tiny-flux-controlnet", preprocessor="none")).images[0]
    assert np.abs(pixels(steered.image) - plain).mean() > 1
    assert "Model: someone/tiny-flux-controlnet" in steered.infotext


@pytest.mark.parametrize("family", ["Flux", "Sana", "Flux 2 klein"])
def test_the_explorer_records_a_flow_matching_run_in_the_models_own_parameterisation(families, family):
    """The reverse process of a flow-matching transformer: every sampler step's x_t and velocity, x̂_0 = x_t − t·v;
    Euler's last step lands on its x̂_0 exactly; the final image is the generator's. A branch continues the run from
    its recorded x_t at step k: with nothing changed it ends on the trace's image (Euler continues exactly; Flux 2's
    state goes back through its patch normalisation, so to rounding), with another prompt it keeps the first k steps
    and ends elsewhere."""
    from pipelines.explorer.reverse import branch, record_trace

    studio = use(families, family)
    request = Txt2ImgRequest(prompt="red apple", steps=4, width=64, height=64, seed=12, sampler="Euler",
                             guidance_scale=3.0)
    trace = studio.models.worker.call(record_trace, studio.models, request)
    assert len(trace.steps) == 4 and trace.prediction_type == "flow"
    times = [step.flow_time for step in trace.steps]
    assert times == sorted(times, reverse=True) and 0 < times[-1] < times[0] <= 1
    assert all("flow matching · t = " in step.describe() for step in trace.steps)
    last = trace.steps[-1]
    torch.testing.assert_close(last.x0_pred, trace.final_latents.float(), rtol=0, atol=1e-5)
    generated = studio.generate(request).images[0].image
    assert (pixels(trace.final_image) == pixels(generated)).all()
    assert trace.frame(1, "x0_pred").size == (64, 64) and trace.frame(1, "eps_guided").size == (64, 64)
    same = studio.models.worker.call(branch, studio.models, trace, 2, {})
    assert same.num_steps == 4 and same.branched_at == 2 and same.steps[:2] == trace.steps[:2]
    torch.testing.assert_close(same.steps[2].latents, trace.steps[2].latents, rtol=0,
                               atol=1e-5 if family.startswith("Flux 2") else 0)
    changed = pixels(same.final_image) - pixels(trace.final_image)
    assert np.abs(changed).max() <= (1 if family.startswith("Flux 2") else 0)
    other = studio.models.worker.call(branch, studio.models, trace, 2, {"prompt": "blue car"})
    assert other.changes == {"prompt": "blue car"} and other.request.prompt == "blue car"
    assert [k for k, _ in other.settings] == [0, 2] and other.steps[:2] == trace.steps[:2]
    # (the tiny models' random VAEs decode any latents to much the same texture, and a tiny random [klein] reads its
    # prompt weakly: the move is read off the latents, a hundred times what an unchanged branch's rounding moves)
    assert (other.final_latents - trace.final_latents).abs().mean() > 1e-3
    assert (pixels(other.final_image) != pixels(trace.final_image)).any()
    last = studio.models.worker.call(branch, studio.models, trace, 3, {"guidance_scale": 1.0})
    assert last.steps[:3] == trace.steps[:3] and last.num_steps == 4 and last.settings[-1][0] == 3
    with pytest.raises(ValueError, match="a branch at step 2 keeps the sampler \\(Euler\\)"):
        studio.models.worker.call(branch, studio.models, trace, 2, {"sampler": "UniPC"})
    restarted = studio.models.worker.call(branch, studio.models, trace, 0, {"sampler": "UniPC"})
    assert restarted.request.sampler == "UniPC" and restarted.num_steps == 4 and restarted.branched_at == 0
    if family == "Sana":        # Heun: two model calls a step, a frame each
        heun = studio.models.worker.call(record_trace, studio.models, replace(request, sampler="Heun", steps=2))
        assert heun.num_steps == 3
        with pytest.raises(ValueError, match="Heun calls the model twice a step"):
            studio.models.worker.call(branch, studio.models, heun, 1, {"prompt": "blue car"})


@pytest.mark.parametrize("family", ["SD 3.x", "Flux", "Flux 2 klein"])
def test_the_sampling_schedule_of_a_flow_model_is_the_one_it_runs(families, family):
    """The explorer's sampling-schedule panel against the t each sampler step of a real run was handed (Flux's
    pipeline passes its own sigmas, SD 3's lets the scheduler space them)."""
    from pipelines.explorer.reverse import record_trace
    from pipelines.explorer.service import Explorer

    studio = use(families, family)
    view = Explorer(studio.models).sampling_schedules(sampler="Euler", steps=6, quantity="sigmas",
                                                      schedules=["Default", "Align Your Steps"])
    trace = studio.models.worker.call(record_trace, studio.models, Txt2ImgRequest(
        prompt="red apple", steps=6, width=64, height=64, seed=1, sampler="Euler"))
    np.testing.assert_allclose(view.table["Default"]["flow_t"], [step.flow_time for step in trace.steps], rtol=1e-5)
    assert "flow matching, x_t = (1 − t)·x_0 + t·ε" in view.caption
    assert "Align Your Steps** left out: Align Your Steps is tuned for DDPM models" in view.caption

def test_the_a1111_api_takes_forges_distilled_cfg_scale():
    from studio.a1111 import generation_request
    from studio.rest_http import Txt2ImgBody

    body = Txt2ImgBody(prompt="red apple", cfg_scale=1.0, distilled_cfg_scale=5.0, steps=4).model_dump()
    generation = generation_request(body, img2img=False, native_side=64, preview_every=0)
    assert generation.request.distilled_guidance == 5.0 and generation.request.guidance_scale == 1.0
    plain = generation_request(Txt2ImgBody(prompt="red apple", steps=4).model_dump(), img2img=False, native_side=64,
                               preview_every=0)
    assert plain.request.distilled_guidance == 3.5


def test_an_outpainted_box_on_a_transformer_is_in_multiples_of_its_patch_of_cells():
    """SD 3's and Flux's sides are multiples of 16 (8-px cells in 2×2 patches): the box outpainting generates is
    rounded to that, so that no request is refused for a size Width and Height cannot change."""
    from pipelines.tasks.outpaint import box_processing_size

    assert box_processing_size((0, 0, 1324, 868), 1024, 1024) == (1560, 1024)          # a UNet's 8 px: unchanged
    width, height = box_processing_size((0, 0, 1324, 868), 1024, 1024, 16)
    assert width % 16 == 0 and height % 16 == 0 and abs(width / height - 1324 / 868) < 0.02


@pytest.mark.parametrize("family", ["SD 3.x", "Flux"])
def test_the_explorer_compares_a_flow_models_samplers_counting_the_transformers_calls(families, family):
    """The explorer's sampler comparison on a flow-matching transformer: each cell is the image Text-to-Image draws
    at its settings, measured against the model's own sampler (it does not run the default reference, DDIM) at the
    reference's steps; the transformer's calls are counted (SD 3's CFG: one call of two rows a step; Flux's true CFG:
    two calls of one row). A sampler the family does not run is refused, naming those it does."""
    from pipelines.explorer.comparison import compare, rms_distance

    studio = use(families, family)
    request = Txt2ImgRequest(prompt="red apple", steps=3, width=64, height=64, seed=5, sampler="Euler",
                             guidance_scale=3.0)
    _, rows = studio.models.worker.call(compare, studio.models, request, samplers=["Euler", "UniPC"], steps=[2, 3],
                                        reference_steps=3)
    assert [(row.sampler, row.steps) for row in rows] == [("Euler", 2), ("Euler", 3), ("UniPC", 2), ("UniPC", 3)]
    assert {row.reference_sampler for row in rows} == {"Euler"}
    reference = studio.generate(request).images[0].image
    for row in rows:
        image = studio.generate(replace(request, sampler=row.sampler, steps=row.steps)).images[0].image
        assert row.rms_to_reference == rms_distance(image, reference)
        assert (row.unet_calls, row.model_evaluations) == ((row.steps, 2 * row.steps) if family == "SD 3.x" else
                                                           (2 * row.steps, 2 * row.steps))
    assert rows[1].rms_to_reference == 0 and rows[0].rms_to_reference > 0
    # the explorer's own default sampler (the studio's, DPM++ 2M) runs as Text-to-Image runs it: Flux's own sampler
    _, rows = studio.models.worker.call(compare, studio.models, replace(request, sampler="DPM++ 2M"), steps=[2],
                                        reference_steps=2)
    assert [row.sampler for row in rows] == ["DPM++ 2M" if family == "SD 3.x" else "Euler"]
    with pytest.raises(ValueError, match=f"\\({family}\\) does not run DDIM, DDPM \\(the reference\\); it runs Euler"):
        studio.models.worker.call(compare, studio.models, request, samplers=["DDIM"], reference_sampler="DDPM")
