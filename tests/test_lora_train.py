"""LoRA training (pipelines/training/loop.py and its parts) on the seeded tiny model: a few steps, as a job."""

from __future__ import annotations

import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.jobs.worker import Priority
from pipelines.lora.judge import feature_distances
from pipelines.tasks.txt2img import Txt2ImgRequest
from pipelines.training.loop import train
from pipelines.training.methods import UNET_TARGETS
from pipelines.training.request import LossPoint, TrainingRequest, TrainingWarning


def dataset() -> list[Image.Image]:
    """Four images of one look: a dark frame around a bright square, in four colours."""
    images = []
    for colour in ((250, 40, 40), (40, 250, 40), (40, 40, 250), (250, 250, 40)):
        array = np.zeros((64, 64, 3), dtype=np.uint8)
        array[16:48, 16:48] = colour
        images.append(Image.fromarray(array))
    return images


def training(**overrides) -> TrainingRequest:
    # one caption longer than the tiny tokenizer's window: encoded in two windows, padded for the others
    values = dict(name="frames", images=dataset(), trigger="framed",
                  captions=["red square in a dark frame, bright, centred, flat colour", "green", "blue", "yellow"],
                  steps=12, batch_size=2, learning_rate=1e-2, warmup_steps=2, checkpoint_every=5, sample_every=0,
                  sample_steps=6, seed=3)
    return TrainingRequest(**(values | overrides))


def run(studio, request, tmp_path, *, stop_at: int | None = None, score=feature_distances, **submit):
    """The training as the studio runs it (a background job, scored by the emoji judge). `stop_at`: Stop is
    pressed as step `stop_at` is reported, so the run stops at the end of that step, wherever the test is."""
    def work(job):
        if stop_at is not None:
            emit = job.emit

            def emit_then_stop(event, **kwargs):
                emit(event, **kwargs)
                if isinstance(event, LossPoint) and event.step == stop_at:
                    job.cancel()
            job.emit = emit_then_stop
        return train(studio.models, request, job, cache_dir=tmp_path / "runs", score=score)
    return studio.models.worker.submit(work, kind="train-lora", priority=Priority.BACKGROUND, **submit)


def paused_after_first_step(studio, request, tmp_path):
    """A training that waits at its checkpoint after step 1: what the test asks of the device worker next
    runs there, between two of its steps. (Paused before it starts, behind a job that holds the worker.)"""
    release = threading.Event()
    studio.models.worker.submit(lambda job: release.wait(), kind="test-holds-the-device")
    job = run(studio, request, tmp_path)
    job.pause()
    release.set()
    next(event for event in job.events() if isinstance(event, LossPoint))
    return job


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    """A second tiny model, the same architecture and folder name with other seeded weights."""
    from recipe.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("other") / "tiny-sd"
    build_tiny_pipeline(folder.parent, seed=1).save_pretrained(folder, safe_serialization=True)
    return folder


def read_lora(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as reader:
        return {key: reader.get_tensor(key) for key in reader.keys()}, reader.metadata()  # noqa: SIM118


def assert_trained_lora(path: Path, unet, *, alpha: float = 8.0) -> dict:
    """The file holds exactly kohya's names for the UNet's transformer layers the training adapts (attention
    projections, feed-forward, proj_in/out; lora_down, lora_up, alpha each), its B (lora_up, zero at step 0) has
    moved, and its alpha is the training's. Returns its metadata."""
    tensors, metadata = read_lora(path)
    modules = ["lora_unet_" + name.replace(".", "_") for name, _ in unet.named_modules()
               if name.endswith(tuple("." + target for target in UNET_TARGETS))]
    assert modules and set(tensors) == {f"{module}.{part}" for module in modules
                                        for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(float(tensors[f"{module}.lora_up.weight"].abs().max()) > 0 for module in modules)
    assert all(float(tensors[f"{module}.alpha"]) == alpha for module in modules)
    return metadata


def assert_made_on(metadata: dict, model) -> None:
    assert (metadata["ss_sd_model_name"], metadata["ss_sd_model_hash"]) == (model.name, model.model_hash)


def test_training_writes_a_kohya_file_that_moves_the_image_and_loads_in_diffusers(studio, tmp_path):
    from diffusers import StableDiffusionPipeline

    job = run(studio, training(), tmp_path)
    result = job.result(timeout=600)
    losses = [event for event in job.events() if isinstance(event, LossPoint)]
    assert [point.step for point in losses] == list(range(1, 13)) and result.steps == 12
    assert result.path == studio.models.lora_dir / "frames.safetensors"
    metadata = assert_trained_lora(result.path, studio.models.current.pipeline.unet)
    assert metadata["ss_network_dim"] == "8" and metadata["ss_trigger_words"] == "framed"
    assert_made_on(metadata, studio.models.current)
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


@pytest.mark.slow
def test_the_file_s_alpha_is_the_training_s_so_it_applies_at_the_trained_scale(studio, tmp_path):
    """Rank 4 with alpha 8 trains at scale alpha / rank = 2; kohya readers take the scale from the `.alpha`
    tensors, which diffusers' converter would have set to the rank (scale 1)."""
    result = run(studio, training(steps=3, rank=4, alpha=8.0), tmp_path, score=None).result(timeout=600)
    metadata = assert_trained_lora(result.path, studio.models.current.pipeline.unet, alpha=8.0)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"


@pytest.mark.slow
def test_a_stopped_run_resumes_from_its_last_checkpoint(studio, tmp_path):
    first = run(studio, training(), tmp_path, stop_at=7).result(timeout=600)
    assert first.stopped and first.steps == 7
    # what a stopped run saves is what it trained, at the step it stopped
    assert read_lora(first.path)[1]["ss_steps"] == "7"
    assert_trained_lora(first.path, studio.models.current.pipeline.unet)
    again = run(studio, training(), tmp_path)
    result = again.result(timeout=600)
    steps = [event.step for event in again.events() if isinstance(event, LossPoint)]
    assert steps[0] == 6 and steps[-1] == 12 and result.steps == 12      # from the checkpoint at step 5
    assert any("Resumed at step 5" in warning for warning in result.warnings)


@pytest.mark.slow
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

    request = training(steps=6)
    rates = [event.learning_rate for event in job.events() if isinstance(event, LossPoint)]
    assert result.steps == 6 and np.isfinite(result.final_loss)
    assert rates[1] == pytest.approx(request.learning_rate * request.learning_rate_factor(1))        # before the NaN
    assert rates[3] == pytest.approx(request.learning_rate / 2 * request.learning_rate_factor(3))    # halved after it


def test_a_dataset_folder_must_lie_under_models(tmp_path):
    from pipelines.training.data import dataset_folder, read_dataset

    folder = tmp_path / "models" / "datasets" / "frames"
    folder.mkdir(parents=True)
    for number, image in enumerate(dataset()):
        image.save(folder / f"square_{number}.png")
    (folder / "square_0.txt").write_text("a red square")
    items = read_dataset(dataset_folder("datasets/frames", tmp_path / "models"))
    assert [item.caption for item in items] == ["a red square", "square", "square", "square"]
    with pytest.raises(ValueError, match="outside"):
        dataset_folder("../elsewhere", tmp_path / "models")


def test_bug10_a_link_in_a_dataset_folder_to_a_picture_outside_models_is_refused_unread(tmp_path, monkeypatch):
    """Bug 10: a dataset folder under models/ may hold a link to a file anywhere; the folder was confined,
    its files were not. A link that stays inside models/ is read, as the model picker reads it."""
    from pipelines.training.data import dataset_folder, read_dataset

    models = tmp_path / "models"
    folder = models / "datasets" / "frames"
    folder.mkdir(parents=True)
    dataset()[0].save(folder / "inside.png")
    (models / "shared").mkdir()
    dataset()[1].save(models / "shared" / "kept.png")
    (folder / "kept.png").symlink_to(models / "shared" / "kept.png")
    secret = tmp_path / "private" / "secret.png"
    secret.parent.mkdir()
    dataset()[2].save(secret)
    (folder / "linked.png").symlink_to(secret)
    opened = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: opened.append(path.resolve()) or read_bytes(path))
    with pytest.raises(ValueError, match="outside the app's model folders") as refused:
        read_dataset(dataset_folder("datasets/frames", models))
    assert "linked.png" in str(refused.value) and secret not in opened
    (folder / "linked.png").unlink()
    items = read_dataset(dataset_folder("datasets/frames", models))
    assert [item.name for item in items] == ["inside.png", "kept.png"]


def png_declaring(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG whose header declares width×height RGB pixels (its data is a few zeros)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_bug13_a_dataset_image_declaring_too_many_pixels_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    """Bug 13: a tiny file whose header declares 5000×5000 (25 megapixels, under PIL's own bomb limit) was
    decoded for the dataset; it is refused from its header, naming the file and the cap, nothing decoded."""
    from PIL import ImageFile

    from pipelines.training.data import read_dataset

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(5000, 5000))
    assert bomb.stat().st_size < 200
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or load(image))
    with pytest.raises(ValueError, match=r"`bomb\.png` is 5000×5000 .* at most 16 megapixels"):
        read_dataset([bomb])
    assert decoded == []


@pytest.mark.parametrize("overrides,message", [({"name": "../evil"}, "`name` must be"), ({"images": []}, "at least one"),
                                               ({"captions": ["one"]}, "1 captions for 4 images"),
                                               ({"steps": 0}, "`steps` must be a whole number from 1"),
                                               ({"learning_rate": "0.01"}, "`learning_rate` must be a number"),
                                               ({"flip": 1}, "`flip` must be True or False")])
def test_bad_training_requests_say_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        training(**overrides)


def test_at_step_zero_the_lora_changes_nothing(studio):
    from types import SimpleNamespace

    from pipelines.training.methods import LoraMethod

    pipeline = studio.models.current.pipeline
    unet = pipeline.unet
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = unet(sample, 500, encoder_hidden_states=context).sample
    method = LoraMethod(SimpleNamespace(pipeline=pipeline, request=training(), adapter="test"))
    parameters = method.setup()
    with torch.no_grad():
        after = unet(sample, 500, encoder_hidden_states=context).sample
    ups = [p for name, p in unet.named_parameters() if "lora_B" in name]
    downs = [p for name, p in unet.named_parameters() if "lora_A" in name]
    assert ups and all(float(p.abs().max()) == 0 for p in ups)          # B zero
    assert all(float(p.std()) > 0 for p in downs)                         # A Gaussian
    assert torch.equal(before, after) and all(p.requires_grad for p in parameters)
    assert not any(p.requires_grad for name, p in unet.named_parameters() if "lora" not in name)
    method.teardown()
    assert not any("lora" in name for name, _ in unet.named_parameters())


@pytest.mark.slow
def test_the_forward_process_is_the_model_s_own_whatever_sampler_ran_last(studio, tmp_path):
    """Training noises x_0 with the model's DDPM schedule; the sampler of the last generation (here Euler,
    whose add_noise works in sigmas on its own step grid) must not leak into it."""
    losses = {}
    for sampler in ("Euler", "DDIM"):
        studio.generate(Txt2ImgRequest(prompt="red", steps=2, sampler=sampler))
        job = run(studio, training(name=f"after-{sampler.lower()}", steps=3, learning_rate=1e-7), tmp_path,
                  score=None)
        job.result(timeout=600)
        losses[sampler] = [event.loss for event in job.events() if isinstance(event, LossPoint)]
    assert losses["Euler"] == losses["DDIM"]


@pytest.mark.slow
def test_a_generation_runs_between_training_steps_and_the_training_goes_on(studio, tmp_path):
    baseline = studio.generate(Txt2ImgRequest(prompt="red", steps=3, seed=4)).images[0].image
    job = paused_after_first_step(studio, training(steps=12), tmp_path)
    between = studio.generate(Txt2ImgRequest(prompt="red", steps=3, seed=4))     # runs at its checkpoint
    assert not job.finished
    job.resume()
    result = job.result(timeout=600)
    assert result.steps == 12 and not result.stopped
    steps = [event.step for event in job.events() if isinstance(event, LossPoint)]
    assert steps == list(range(1, 13))
    # the training adapter was off for the generation in between: it is the plain image
    assert np.array_equal(np.asarray(between.images[0].image), np.asarray(baseline))


@pytest.mark.slow
def test_without_an_effect_score_the_result_says_it_measured_no_distance(studio, tmp_path):
    result = run(studio, training(steps=2), tmp_path, score=None).result(timeout=600)
    assert result.feature_distance_before is None and result.feature_distance_after is None
    assert any("No feature distance" in warning for warning in result.warnings)


@pytest.mark.slow
def test_bug9_training_measures_its_effect_with_recipe_absent(studio, tmp_path, monkeypatch):
    """Bug 9: the training imported recipe/evaluate.py for its feature distance, so the app needed the
    recipe to finish a training. With recipe/ unimportable it trains and scores with the shipped judge."""
    import sys

    for name in [name for name in sys.modules if name == "recipe" or name.startswith("recipe.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "recipe", None)          # `import recipe...` raises ImportError
    result = run(studio, training(steps=2), tmp_path).result(timeout=600)
    assert np.isfinite([result.feature_distance_before, result.feature_distance_after]).all()


# -- Bug 1: model actions between two training steps ------------------------------------------------------


def finish_on_the_model_it_started_with(job, studio, model) -> None:
    """The training goes on after the refusal and writes a LoRA recorded against `model`."""
    job.resume()
    result = job.result(timeout=600)
    assert result.steps == 12 and not result.stopped and result.base_model == model.name
    assert studio.models.current is model
    assert_made_on(assert_trained_lora(result.path, model.pipeline.unet), model)


@pytest.mark.slow
def test_bug1_loading_another_model_during_a_training_is_refused_and_the_lora_names_its_model(
        studio, tmp_path, other_model_dir):
    """Bug 1: a load run at a training's checkpoint replaced the base model under it; the file was then
    recorded against the new model. It is refused, naming the training, which goes on."""
    model = studio.models.current
    job = paused_after_first_step(studio, training(), tmp_path)
    with pytest.raises(ValueError, match="load another model now: the LoRA training 'frames' is using"):
        studio.models.load(str(other_model_dir))
    finish_on_the_model_it_started_with(job, studio, model)


@pytest.mark.slow
def test_bug1_changing_the_memory_mode_during_a_training_is_refused(studio, tmp_path):
    """Bug 1: a memory-mode change at a training's checkpoint re-placed (offloaded) the model it trains."""
    model = studio.models.current
    job = paused_after_first_step(studio, training(), tmp_path)
    requested = studio.models.memory.requested_mode
    with pytest.raises(ValueError, match="change the memory mode .* now: the LoRA training 'frames' is using"):
        studio.models.set_memory_mode("low")
    assert studio.models.memory.requested_mode == requested     # the refused choice is not kept for later
    finish_on_the_model_it_started_with(job, studio, model)


@pytest.mark.slow
def test_bug1_unloading_during_a_training_is_refused(studio, tmp_path):
    """Bug 1: an unload at a training's checkpoint took the model its file is recorded against."""
    model = studio.models.current
    job = paused_after_first_step(studio, training(), tmp_path)
    with pytest.raises(ValueError, match="unload the model now: the LoRA training 'frames' is using"):
        studio.models.unload()
    finish_on_the_model_it_started_with(job, studio, model)


@pytest.mark.slow
def test_bug1_in_an_offloading_mode_nothing_placed_at_a_checkpoint_re_hooks_the_model_in_training(
        studio, tmp_path, pretend_cuda, monkeypatch):
    """Bug 1, the placements the memory modes make: in an offloading mode, deriving a task's pipeline (it shares
    the UNet) or adopting a ControlNet that asks for another mode re-placed the base model under the training.
    Both are refused, naming the training, and the base model is not touched."""
    from diffusers import UNet2DConditionModel

    from pipelines.models.memory import MemoryMode
    from pipelines.models.sources import ModelSource
    from recipe.tiny import build_tiny_controlnet

    model = studio.models.current
    controlnet = build_tiny_controlnet(UNet2DConditionModel.from_config(model.pipeline.unet.config))
    job = paused_after_first_step(studio, training(), tmp_path)
    monkeypatch.setattr(studio.models.memory, "mode", MemoryMode.BALANCED)
    pretend_cuda.clear()
    with pytest.raises(ValueError, match="prepare the Inpainting pipeline in memory mode balanced .* now: the LoRA "
                                         "training 'frames' is using"):
        studio.models.worker.call(studio.models.pipeline, "inpaint")
    monkeypatch.setattr(studio.models.memory, "mode_for", lambda *args, **kwargs: MemoryMode.LOW)
    with pytest.raises(ValueError, match="change the memory mode to low now: the LoRA training 'frames' is using"):
        studio.models.adopt(controlnet, ModelSource("folder", "tiny-cn", "tiny-cn"), slot="controlnet:tiny-cn")
    assert "controlnet:tiny-cn" not in studio.models.slots and "inpaint" not in model.derived
    assert [call for call in pretend_cuda if call[1] == id(model.pipeline)] == []      # the base was not re-placed
    monkeypatch.undo()
    finish_on_the_model_it_started_with(job, studio, model)


@pytest.mark.slow
def test_bug1_an_out_of_memory_retry_between_training_steps_is_refused(studio, tmp_path, pretend_cuda, monkeypatch):
    """Bug 1: a generation that runs out of memory between two training steps retries in a lower memory
    mode (`set_memory_mode`), which re-placed the model under the training. The retry is refused, naming
    the training; the generation fails with that message and the training goes on."""
    model = studio.models.current
    unet = model.pipeline.unet
    forward, armed = unet.forward, threading.Event()

    def out_of_memory_once(*args, **kwargs):
        if armed.is_set():
            armed.clear()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)
    monkeypatch.setattr(unet, "forward", out_of_memory_once)
    job = paused_after_first_step(studio, training(), tmp_path)
    armed.set()
    with pytest.raises(ValueError, match="change the memory mode to balanced now: the LoRA training 'frames'"):
        studio.generate(Txt2ImgRequest(prompt="red", steps=2, seed=4))
    assert not armed.is_set()           # the generation did run out of memory, and did try to retry
    finish_on_the_model_it_started_with(job, studio, model)


# -- Bugs 4 and 5: what a run is matched and measured against -----------------------------------------------


@pytest.mark.slow
def test_bug4_a_checkpoint_made_on_another_base_model_is_not_resumed(studio, tmp_path, other_model_dir):
    """Bug 4: the checkpoint was matched by settings and data only, so a run stopped on one model resumed on
    another. It starts at step 0, saying why."""
    assert run(studio, training(), tmp_path, stop_at=7).result(timeout=600).stopped   # checkpoint at step 5
    studio.models.load(str(other_model_dir))
    again = run(studio, training(), tmp_path)
    result = again.result(timeout=600)
    steps = [event.step for event in again.events() if isinstance(event, LossPoint)]
    assert steps == list(range(1, 13)) and result.steps == 12
    assert not any("Resumed" in warning for warning in result.warnings)
    assert any("Started at step 0" in warning and "base model tiny-sd" in warning for warning in result.warnings)
    assert_made_on(read_lora(result.path)[1], studio.models.current)


def make_lora_with_text_encoder_part(model_dir: Path, path: Path) -> Path:
    """A kohya LoRA for the tiny model with random (non-zero) parts on the UNet's attention and on the text
    encoder's (A1111's `lora_unet_…` and `lora_te_…` keys; the text encoder's written out by hand, as
    transformers' own adapter API asks for a newer peft)."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig

    torch.manual_seed(7)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()})
    text = CLIPTextConfig.from_pretrained(model_dir / "text_encoder")
    for layer in range(text.num_hidden_layers):
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            module = f"lora_te_text_model_encoder_layers_{layer}_self_attn_{projection}"
            kohya[f"{module}.lora_down.weight"] = torch.randn(4, text.hidden_size)
            kohya[f"{module}.lora_up.weight"] = torch.randn(text.hidden_size, 4)
            kohya[f"{module}.alpha"] = torch.tensor(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path), metadata={"ss_sd_model_name": "tiny-sd"})
    return path


@pytest.mark.slow
def test_bug5_the_effect_samples_ignore_a_generation_with_another_sampler_and_lora_in_between(
        studio, tmp_path, tiny_model_dir):
    """Bug 5: the weight 0 / weight 1 samples were made with whatever sampler and LoRAs (the text encoder's
    part too) the last generation left on the pipeline. They equal an uninterrupted run's now."""
    make_lora_with_text_encoder_part(tiny_model_dir, studio.models.lora_dir / "inked.safetensors")
    uninterrupted = run(studio, training(steps=4), tmp_path / "alone", score=None).result(timeout=600)
    job = paused_after_first_step(studio, training(steps=4), tmp_path / "interleaved")
    studio.generate(Txt2ImgRequest(prompt="red <lora:inked:1>", sampler="Euler", steps=2, seed=4))
    pipeline, loaded = studio.models.current.pipeline, studio.models.current.loras["inked"]
    assert any(loaded.adapter in getattr(module, "lora_A", {}) for module in pipeline.text_encoder.modules())
    job.resume()
    interleaved = job.result(timeout=600)
    for made, alone in ((interleaved.before, uninterrupted.before), (interleaved.after, uninterrupted.after)):
        assert len(made) == len(alone) == 2
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(made, alone))
    assert interleaved.effect == uninterrupted.effect
