"""SD 2.x's v-prediction (Salimans & Ho 2022) on the seeded tiny model with a v-prediction scheduler: the studio's
own loop gives diffusers' image, the explorer's x̂_0 reads the model's output as v, and a LoRA trains on the
velocity target with min-SNR's v weighting."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from pipelines.core.call import prepare
from pipelines.tasks.guided import run_guided
from pipelines.tasks.txt2img import Txt2ImgRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def v_studio(tmp_path_factory, worker):
    """A studio on the tiny model whose scheduler says `v_prediction` (an SD 2.x 768-style model)."""
    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from pipelines.models.sources import ModelSource
    from recipe.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("v-prediction")
    pipeline = build_tiny_pipeline(folder)
    pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, prediction_type="v_prediction")
    models = ModelManager(MemoryManager(device="cpu"), worker=worker, models_dir=folder / "models")
    worker.call(lambda: models.adopt(pipeline, ModelSource("folder", str(folder), "tiny-v")))
    return Generator(models, None)


def test_the_own_loop_gives_diffusers_v_prediction_image(v_studio):
    request = Txt2ImgRequest(prompt="red apple", seed=7, steps=5, width=64, height=64, guidance_scale=5.0,
                             sampler="Euler a")

    def both():
        call = prepare(v_studio.models, request)
        assert call.pipeline.scheduler.config.prediction_type == "v_prediction"
        return call.run_pipeline(0), run_guided(call, 0)

    theirs, ours = v_studio.models.worker.call(both)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_the_explorer_reads_the_output_as_v(v_studio):
    """DDIM's deterministic step from x_t to x_{t-1} goes through its x̂_0: x_{t-1} = √ᾱ' x̂_0 + √(1-ᾱ') ε̂ with
    ε̂ = (x_t - √ᾱ x̂_0) / √(1-ᾱ). The explorer's x̂_0 satisfies it only when it reads the model's output as v (read
    as ε, the first step's x̂_0 would be ~7× too large). Checked at the first step: later, DDIM clips x̂_0 to
    [-1, 1] (this scheduler config leaves `clip_sample` on), and the explorer shows it unclipped."""
    from pipelines.explorer.reverse import record_trace

    trace = record_trace(v_studio.models, Txt2ImgRequest(prompt="red apple", seed=4, steps=8, width=64, height=64,
                                                         sampler="DDIM", guidance_scale=5.0))
    assert trace.prediction_type == "v_prediction"
    step, after = trace.steps[:2]
    abar, abar_next = step.alpha_cumprod, after.alpha_cumprod
    x_t, x0 = step.latents.double(), step.x0_pred.double()
    eps = (x_t - abar ** 0.5 * x0) / (1 - abar) ** 0.5
    stepped = abar_next ** 0.5 * x0 + (1 - abar_next) ** 0.5 * eps
    assert (stepped - after.latents.double()).abs().mean() < 1e-3 * after.latents.double().abs().mean()


def test_a_lora_trains_on_the_velocity(v_studio, tmp_path):
    from pipelines.training import loop
    from pipelines.training.data import prepare_data
    from tests.test_training_methods import request as training
    from tests.test_training_methods import run

    wanted = training(name="v-frames", steps=3, learning_rate=1e-2)
    pipeline = v_studio.models.current.pipeline
    scheduler = DDPMScheduler.from_config(v_studio.models.current.scheduler_config)
    data = v_studio.models.worker.call(lambda: prepare_data(pipeline, wanted, 64))
    batch = loop._batch(data, wanted, scheduler, torch.Generator().manual_seed(0), weight=1.0)
    abar = scheduler.alphas_cumprod[batch["t"]].view(-1, 1, 1, 1)
    # x_0 back from x_t and the target read as v: sqrt(abar) x_t - sqrt(1 - abar) v is one of the training latents
    x0 = abar.sqrt() * batch["x_t"] - (1 - abar).sqrt() * batch["target"]
    known = torch.cat([torch.cat([bucket.latents, bucket.mirrored]) for bucket in data.buckets])
    assert all(torch.cdist(row.flatten()[None], known.flatten(1)).min() < 1e-3 for row in x0)
    result, losses = run(v_studio, wanted, tmp_path)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))) and result.path.is_file()
    from safetensors import safe_open
    with safe_open(str(result.path), framework="pt") as reader:
        assert reader.metadata()["ss_v_parameterization"] == "True"
    # min-SNR's weight on a v-prediction's error is min(SNR, γ) / (SNR + 1)
    t = torch.tensor([10, 500, 990])
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    weighted = loop._weighted([{"t": t, "weight": 1.0}], [torch.ones(3)], wanted,
                              alphas_cumprod=scheduler.alphas_cumprod, processes=1, velocity=True)
    expected = (torch.clamp(snr, max=wanted.min_snr_gamma) / (snr + 1)).sum() / wanted.batch_size
    torch.testing.assert_close(weighted, expected)
