"""LoRA training (pipelines/lora_train.py) on the seeded tiny model: a few steps, as a job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.jobs.worker import Priority
from pipelines.lora.training import LoraTrainingRequest, LossPoint, TrainingWarning, train_lora
from pipelines.tasks.txt2img import Txt2ImgRequest


def dataset() -> list[Image.Image]:
    """Four images of one look: a dark frame around a bright square, in four colours."""
    images = []
    for colour in ((250, 40, 40), (40, 250, 40), (40, 40, 250), (250, 250, 40)):
        array = np.zeros((64, 64, 3), dtype=np.uint8)
        array[16:48, 16:48] = colour
        images.append(Image.fromarray(array))
    return images


def training(**overrides) -> LoraTrainingRequest:
    # one caption longer than the tiny tokenizer's window: encoded in two windows, padded for the others
    values = dict(name="frames", images=dataset(), trigger="framed",
                  captions=["red square in a dark frame, bright, centred, flat colour", "green", "blue", "yellow"],
                  steps=12, batch_size=2, learning_rate=1e-2, warmup_steps=2, checkpoint_every=5, sample_every=0,
                  seed=3)
    return LoraTrainingRequest(**(values | overrides))


def run(studio, request, tmp_path, **submit):
    job = studio.models.worker.submit(lambda job: train_lora(studio.models, request, job, cache_dir=tmp_path / "runs"),
                                      kind="train-lora", priority=Priority.BACKGROUND, **submit)
    return job


def test_training_writes_a_kohya_file_that_moves_the_image_and_loads_in_diffusers(studio, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    job = run(studio, training(), tmp_path)
    result = job.result(timeout=600)
    losses = [event for event in job.events() if isinstance(event, LossPoint)]
    assert [point.step for point in losses] == list(range(1, 13)) and result.steps == 12
    assert result.path == studio.models.lora_dir / "frames.safetensors"
    with safe_open(str(result.path), framework="pt") as reader:
        keys, metadata = list(reader.keys()), reader.metadata()
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    assert metadata["ss_network_dim"] == "8" and metadata["ss_trigger_words"] == "framed"
    assert result.moved and result.effect > 2.0
    assert np.isfinite([result.feature_distance_before, result.feature_distance_after]).all()
    # the adapter in training is gone: plain generation is unchanged; the file applies through the prompt
    plain = np.asarray(studio.generate(Txt2ImgRequest(prompt="framed, red", steps=4, seed=1)).images[0].image,
                       dtype=np.int16)
    styled = np.asarray(studio.generate(Txt2ImgRequest(prompt="framed, red <lora:frames:1>", steps=4,
                                                       seed=1)).images[0].image, dtype=np.int16)
    assert np.abs(styled - plain).mean() > 1
    pipeline = StableDiffusionPipeline.from_pretrained(studio.models.current.source.location)
    pipeline.load_lora_weights(str(result.path.parent), weight_name=result.path.name, adapter_name="frames")
    assert "frames" in pipeline.get_list_adapters()["unet"]


def test_a_stopped_run_resumes_from_its_last_checkpoint(studio, tmp_path):
    first = run(studio, training(), tmp_path)
    for event in first.events():
        if isinstance(event, LossPoint) and event.step == 7:
            first.cancel()
    assert first.result(timeout=600).stopped
    again = run(studio, training(), tmp_path)
    result = again.result(timeout=600)
    steps = [event.step for event in again.events() if isinstance(event, LossPoint)]
    assert steps[0] == 6 and steps[-1] == 12 and result.steps == 12      # from the checkpoint at step 5
    assert any("Resumed at step 5" in warning for warning in result.warnings)


def test_a_non_finite_loss_skips_the_step_and_halves_the_learning_rate(studio, tmp_path, monkeypatch):
    unet = studio.models.current.pipeline.unet
    forward = unet.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        output = forward(*args, **kwargs)
        if calls["n"] == 3 and torch.is_grad_enabled():
            output.sample = output.sample * float("nan")
        return output
    monkeypatch.setattr(unet, "forward", poisoned)
    job = run(studio, training(steps=6), tmp_path)
    result = job.result(timeout=600)
    warnings = [event for event in job.events() if isinstance(event, TrainingWarning)]
    assert len(warnings) == 1 and "not finite; step skipped, learning rate halved" in warnings[0].message
    from pipelines.lora.training import _schedule

    request = training(steps=6)
    rates = [event.learning_rate for event in job.events() if isinstance(event, LossPoint)]
    assert result.steps == 6 and np.isfinite(result.final_loss)
    assert rates[1] == pytest.approx(request.learning_rate * _schedule(1, request))        # before the NaN
    assert rates[3] == pytest.approx(request.learning_rate / 2 * _schedule(3, request))    # halved after it


def test_a_dataset_folder_must_lie_under_models(tmp_path):
    from pipelines.lora.training import dataset_folder, read_dataset

    folder = tmp_path / "models" / "datasets" / "frames"
    folder.mkdir(parents=True)
    for number, image in enumerate(dataset()):
        image.save(folder / f"square_{number}.png")
    (folder / "square_0.txt").write_text("a red square")
    items = read_dataset(dataset_folder("datasets/frames", tmp_path / "models"))
    assert [item.caption for item in items] == ["a red square", "square", "square", "square"]
    with pytest.raises(ValueError, match="outside"):
        dataset_folder("../elsewhere", tmp_path / "models")


@pytest.mark.parametrize("overrides,message", [({"name": "../evil"}, "`name` must be"), ({"images": []}, "at least one"),
                                               ({"captions": ["one"]}, "1 captions for 4 images"),
                                               ({"steps": 0}, "`steps` must be a whole number from 1")])
def test_bad_training_requests_say_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        training(**overrides)


def test_at_step_zero_the_lora_changes_nothing(studio):
    from pipelines.lora.training import add_training_adapter

    unet = studio.models.current.pipeline.unet
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = unet(sample, 500, encoder_hidden_states=context).sample
    parameters = add_training_adapter(unet, training(), "test")
    with torch.no_grad():
        after = unet(sample, 500, encoder_hidden_states=context).sample
    ups = [p for name, p in unet.named_parameters() if "lora_B" in name]
    downs = [p for name, p in unet.named_parameters() if "lora_A" in name]
    assert ups and all(float(p.abs().max()) == 0 for p in ups)          # B zero
    assert all(float(p.std()) > 0 for p in downs)                         # A Gaussian
    assert torch.equal(before, after) and all(p.requires_grad for p in parameters)
    assert not any(p.requires_grad for name, p in unet.named_parameters() if "lora" not in name)


def test_the_forward_process_is_the_model_s_own_whatever_sampler_ran_last(studio, tmp_path):
    """Training noises x_0 with the model's DDPM schedule; the sampler of the last generation (here Euler,
    whose add_noise works in sigmas on its own step grid) must not leak into it."""
    losses = {}
    for sampler in ("Euler", "DDIM"):
        studio.generate(Txt2ImgRequest(prompt="red", steps=2, sampler=sampler))
        job = run(studio, training(name=f"after-{sampler.lower()}", steps=3, learning_rate=1e-7), tmp_path)
        job.result(timeout=600)
        losses[sampler] = [event.loss for event in job.events() if isinstance(event, LossPoint)]
    assert losses["Euler"] == losses["DDIM"]


def test_a_generation_runs_between_training_steps_and_the_training_goes_on(studio, tmp_path):
    import threading

    from pipelines.lora.training import LossPoint as Point

    reached, plain_job = threading.Event(), {}
    baseline = studio.generate(Txt2ImgRequest(prompt="red", steps=3, seed=4)).images[0].image
    job = run(studio, training(steps=12), tmp_path)
    for event in job.events():
        if isinstance(event, Point) and event.step == 3 and not reached.is_set():
            reached.set()
            job.pause()          # it stops at its next checkpoint, before its last step: the generation runs there
            plain_job["done"] = studio.generate(Txt2ImgRequest(prompt="red", steps=3, seed=4))
            assert not job.finished
            job.resume()
    result = job.result(timeout=600)
    assert result.steps == 12 and not result.stopped
    steps = [event.step for event in job.events() if isinstance(event, Point)]
    assert steps == list(range(1, 13))
    # the training adapter was off for the generation in between: it is the plain image
    assert np.array_equal(np.asarray(plain_job["done"].images[0].image), np.asarray(baseline))
