"""The one denoising path (pipelines/core/call.py, pipelines/core/denoiser.py): a prepared call, and the
explicit step that exposes the noise predictions and the transition, on the seeded tiny model."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from pipelines.core.call import prepare
from pipelines.core.denoiser import Denoiser
from pipelines.tasks.txt2img import Txt2ImgRequest


def request(**overrides) -> Txt2ImgRequest:
    return Txt2ImgRequest(**(dict(prompt="red apple", negative_prompt="blurry", steps=4, guidance_scale=5.0,
                                  width=64, height=64, seed=77) | overrides))


def initial_noise(call) -> torch.Tensor:
    pipeline = call.pipeline
    shape = (1, pipeline.unet.config.in_channels, call.request.height // pipeline.vae_scale_factor,
             call.request.width // pipeline.vae_scale_factor)
    return randn_tensor(shape, generator=call.generators(0), dtype=pipeline.unet.dtype)


def explicit_loop(models, wanted: Txt2ImgRequest, **step_arguments) -> torch.Tensor:
    call = prepare(models, wanted)
    denoiser = Denoiser(call, **step_arguments)
    scheduler = call.pipeline.scheduler
    scheduler.set_timesteps(wanted.steps)
    latents = initial_noise(call) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        latents = denoiser.step(latents, t).latents
    return latents


def test_explicit_steps_reproduce_the_diffusers_loop_bit_for_bit(studio):
    models = studio.models
    for sampler in ("DDIM", "DPM++ 2M"):
        wanted = request(sampler=sampler, guidance_rescale=0.3)

        def both():
            call = prepare(models, wanted)
            return call(0, latents=initial_noise(call)), explicit_loop(models, wanted)

        pipeline_latents, explicit_latents = models.worker.call(both)
        assert torch.equal(pipeline_latents, explicit_latents), sampler


def test_a_step_exposes_the_cfg_combination_and_a_deterministic_sampler_is_a_point_mass(studio):
    def one_step():
        call = prepare(studio.models, request(sampler="DDIM", guidance_scale=6.0))
        denoiser = Denoiser(call)
        call.pipeline.scheduler.set_timesteps(4)
        return denoiser.step(initial_noise(call), call.pipeline.scheduler.timesteps[0])

    result = studio.models.worker.call(one_step)
    prediction = result.prediction
    torch.testing.assert_close(prediction.eps_guided,
                               prediction.eps_uncond + 6.0 * (prediction.eps_cond - prediction.eps_uncond))
    assert not torch.equal(prediction.eps_uncond, prediction.eps_cond)
    assert result.variance == 0.0 and torch.equal(result.mean, result.latents)


def test_the_ddpm_transition_is_the_gaussian_the_sampler_draws_from(studio):
    """x_{t-1} = mu_t + sqrt(beta~_t) z with the z the scheduler drew: replay its generator to get z."""
    def steps():
        call = prepare(studio.models, request(sampler="DDPM", steps=5))
        denoiser = Denoiser(call)
        scheduler = call.pipeline.scheduler
        scheduler.set_timesteps(5)
        latents = initial_noise(call)
        checked = []
        for t in scheduler.timesteps:
            generators = denoiser.extra_step_kwargs["generator"]
            states = [generator.get_state() for generator in generators]
            result = denoiser.step(latents, t)
            replayed = [torch.Generator("cpu").set_state(state) for state in states]
            z = randn_tensor(latents.shape, generator=replayed, dtype=latents.dtype)
            checked.append((int(t), result, z))
            latents = result.latents
        return checked

    checked = studio.models.worker.call(steps)
    for t, result, z in checked:
        assert result.mean is not None and result.variance is not None
        if t > 0:
            assert 0.0 < result.variance < 1.0
            torch.testing.assert_close(result.latents, result.mean + result.variance ** 0.5 * z, rtol=1e-4, atol=1e-5)
        else:
            assert result.variance == 0.0 and torch.allclose(result.latents, result.mean)


def test_controlnet_residuals_reach_the_unet(studio):
    from diffusers import ControlNetModel

    def predictions():
        call = prepare(studio.models, request(guidance_scale=1.0))   # no CFG: a batch of one
        denoiser = Denoiser(call)
        scheduler = call.pipeline.scheduler
        scheduler.set_timesteps(4)
        latents, t = initial_noise(call), scheduler.timesteps[0]
        controlnet = ControlNetModel.from_unet(call.pipeline.unet)   # zero-initialised output convs
        # its condition embedding downsamples 8 times; the tiny VAE only 4, hence 128 px for 16 latent px
        condition = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            down, mid = controlnet(latents, t, encoder_hidden_states=denoiser.embeddings, controlnet_cond=condition,
                                   return_dict=False)
        plain = denoiser.predict(latents, t)
        zero = denoiser.predict(latents, t, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        pushed = denoiser.predict(latents, t, down_block_additional_residuals=[r + 0.5 for r in down],
                                  mid_block_additional_residual=mid + 0.5)
        return plain, zero, pushed, [float(r.abs().max()) for r in (*down, mid)]

    plain, zero, pushed, residual_sizes = studio.models.worker.call(predictions)
    assert max(residual_sizes) == 0.0                      # a new ControlNet starts as a no-op ...
    assert torch.equal(plain.eps_guided, zero.eps_guided)  # ... so the prediction is the base model's
    assert (pushed.eps_guided - plain.eps_guided).abs().mean() > 1e-3


def test_cross_attention_kwargs_carry_a_lora_scale_to_the_unet(studio):
    from peft import LoraConfig

    def predictions():
        call = prepare(studio.models, request())
        unet = call.pipeline.unet
        scheduler = call.pipeline.scheduler
        scheduler.set_timesteps(4)
        latents, t = initial_noise(call), scheduler.timesteps[0]
        base = Denoiser(call).predict(latents, t)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False), adapter_name="test")
        try:
            off = Denoiser(call, cross_attention_kwargs={"scale": 0.0}).predict(latents, t)
            on = Denoiser(call, cross_attention_kwargs={"scale": 1.0}).predict(latents, t)
        finally:
            unet.delete_adapters("test")
        return base, off, on

    base, off, on = studio.models.worker.call(predictions)
    torch.testing.assert_close(off.eps_guided, base.eps_guided)
    assert (on.eps_guided - base.eps_guided).abs().mean() > 1e-4


def test_a_stochastic_sampler_continues_the_generators_that_drew_its_start(studio):
    models = studio.models
    wanted = request(sampler="Euler a")

    def both():
        reference = prepare(models, wanted)(0)            # diffusers draws x_T, then each step's noise
        call = prepare(models, wanted)
        generators = call.generators(0)
        pipeline = call.pipeline
        shape = (1, pipeline.unet.config.in_channels, 64 // pipeline.vae_scale_factor, 64 // pipeline.vae_scale_factor)
        latents = randn_tensor(shape, generator=generators, dtype=pipeline.unet.dtype)
        denoiser = Denoiser(call, generators=generators)    # the same generators, advanced by that draw
        pipeline.scheduler.set_timesteps(wanted.steps)
        latents = latents * pipeline.scheduler.init_noise_sigma
        for t in pipeline.scheduler.timesteps:
            latents = denoiser.step(latents, t).latents
        return reference, latents

    reference, explicit = models.worker.call(both)
    assert torch.equal(reference, explicit)
