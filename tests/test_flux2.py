"""Flux 2 ([dev] and [klein]) in the studio, on the seeded tiny pipelines of tests/test_transformers.py (which runs
their samplers, Image-to-Image, inpainting, LoRA, previews and explorer with the other families): each is guided by
its own knob, and the explorer draws its resolution-shifted schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.io.metadata import infotext_to_settings, parse_infotext
from pipelines.tasks.txt2img import Txt2ImgRequest
from tests.test_explorer_forward import gradient_image
from tests.test_transformers import families, pixels, use  # noqa: F401 (families: the module's fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_flux_2_dev_is_guided_by_its_distilled_guidance_and_klein_by_cfg(families):
    """Flux 2 [dev] takes its guidance as an input (the distilled CFG scale; no CFG, no negative prompt), Flux 2
    [klein] takes CFG; each says what it left unused, and each tab's defaults follow."""
    from types import SimpleNamespace

    from pipelines.core.transformer_call import text_encoder_layers
    from pipelines.core.transformers import default_cfg, takes_distilled_guidance

    common = dict(prompt="red apple", steps=3, width=64, height=64, seed=9, sampler="Euler")
    studio = use(families, "Flux 2 dev")
    pipeline = studio.models.current.pipeline
    assert takes_distilled_guidance(pipeline) and default_cfg(pipeline) == 1.0
    low = studio.generate(Txt2ImgRequest(**common, guidance_scale=1.0, distilled_guidance=1.0)).images[0]
    high = studio.generate(Txt2ImgRequest(**common, guidance_scale=1.0, distilled_guidance=6.0))
    assert np.abs(pixels(low.image) - pixels(high.images[0].image)).max() > 0 and not high.messages
    assert "Distilled CFG Scale: 6" in high.images[0].infotext
    # PNG Info's round trip: the settings read back from the infotext draw the same pixels
    prompt, _, parameters = parse_infotext(high.images[0].infotext)
    settings = infotext_to_settings(parameters)
    again = studio.generate(Txt2ImgRequest(prompt=prompt, **{key: settings[key] for key in (
        "steps", "width", "height", "seed", "sampler", "guidance_scale", "distilled_guidance")})).images[0]
    assert (pixels(again.image) == pixels(high.images[0].image)).all()
    unused = studio.generate(Txt2ImgRequest(**common, guidance_scale=5.0, negative_prompt="blurry",
                                            distilled_guidance=6.0))
    assert (pixels(unused.images[0].image) == pixels(high.images[0].image)).all()
    assert any("takes no CFG, so CFG scale 5 was not used" in note for note in unused.messages)
    assert any("takes no negative prompt" in note for note in unused.messages)

    studio = use(families, "Flux 2 klein")
    pipeline = studio.models.current.pipeline
    assert not takes_distilled_guidance(pipeline) and default_cfg(pipeline) == 4.0
    plain = studio.generate(Txt2ImgRequest(**common, guidance_scale=1.0)).images[0]
    guided = studio.generate(Txt2ImgRequest(**common, guidance_scale=4.0))
    assert np.abs(pixels(plain.image) - pixels(guided.images[0].image)).max() > 0 and not guided.messages
    # the prompt's embedding stacks as many of the text encoder's layers as the transformer reads, spread as the
    # released models' are
    def model(layers: int, width: int, joint: int):
        text = SimpleNamespace(num_hidden_layers=layers, hidden_size=width)
        return SimpleNamespace(text_encoder=SimpleNamespace(config=text),
                               transformer=SimpleNamespace(config=SimpleNamespace(joint_attention_dim=joint)))
    assert text_encoder_layers(model(40, 5120, 15360)) == (10, 20, 30)       # Flux 2 [dev]'s Mistral Small 3.1
    assert text_encoder_layers(model(36, 2560, 7680)) == (9, 18, 27)         # [klein] 4B's Qwen 3
    assert text_encoder_layers(pipeline) == (1,)


def test_the_sampling_schedule_of_flux_2_is_its_resolution_shifted_one_at_1024(families):
    """Flux 2 shifts its schedule by the sequence's length and the step count (`compute_empirical_mu`): the panel's
    t, drawn for 1024² (4,096 patches), against the t a real run of that many patches hands its sampler, with the
    released models' scheduler settings (dynamic shifting on)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipelines.core.schedules import schedule_table

    studio = use(families, "Flux 2 klein")
    released = dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0, time_shift_type="exponential",
                                                    base_image_seq_len=256, max_image_seq_len=4096).config)
    drawn = schedule_table(released, "Euler", ["Default"], 6, flux_sigmas=True, flux2=True)["Default"]["flow_t"]
    pipeline, handed = studio.models.current.pipeline, []

    def run():   # the tiny VAE does not downsample: 128² pixels are 64² patches of 2×2, as 1024² are for the real
        kept = pipeline.scheduler
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(released)
        step = pipeline.scheduler.step
        pipeline.scheduler.step = lambda output, t, *args, **kwargs: (handed.append(float(t) / 1000),
                                                                       step(output, t, *args, **kwargs))[1]
        try:
            pipeline(prompt="red apple", num_inference_steps=6, width=128, height=128, output_type="latent",
                     text_encoder_out_layers=(1,), generator=torch.Generator().manual_seed(0))
        finally:
            pipeline.scheduler = kept
    studio.models.worker.call(run)
    np.testing.assert_allclose(drawn, handed, rtol=1e-5)
    assert drawn[0] > 0.99 and drawn[1] > 1 - 1 / 6   # shifted toward noise, not linspace's


def test_a_step_distilled_klein_takes_no_cfg_in_any_tab(families):
    """A step-distilled Flux 2 [klein] (`is_distilled`) runs one pass per step whatever the CFG scale, in Image-to-
    Image too (whose pipeline is rebuilt from the model's and keeps the flag), and says the scale was not used."""
    from pipelines.core.transformers import default_cfg
    from pipelines.tasks.img2img import Img2ImgRequest
    from recipe.tiny import build_tiny_flux2_klein_pipeline

    studio, folders = families
    folder = folders["Flux 2 klein"].parent / "flux-2-klein-distilled"
    build_tiny_flux2_klein_pipeline(folder.parent.parent / "build", distilled=True).save_pretrained(folder)
    studio.models.load(str(folder), from_ui=True)
    assert default_cfg(studio.models.current.pipeline) == 1.0
    common = dict(prompt="red apple", steps=3, width=64, height=64, seed=9, sampler="Euler")
    source = gradient_image(64, 64).convert("RGB")
    for request in (Txt2ImgRequest, lambda **kw: Img2ImgRequest(**kw, init_image=source, strength=0.6)):
        plain = studio.generate(request(**common, guidance_scale=1.0))
        scaled = studio.generate(request(**common, guidance_scale=5.0))
        assert (pixels(plain.images[0].image) == pixels(scaled.images[0].image)).all()
        assert any("takes no CFG, so CFG scale 5 was not used" in note for note in scaled.messages)
