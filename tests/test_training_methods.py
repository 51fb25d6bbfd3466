"""Textual inversion, DreamBooth-LoRA, buckets, repeats, presets and the data-parallel run (pipelines/training/)
on the seeded tiny model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.jobs.worker import Priority
from pipelines.training.loop import train
from pipelines.training.request import LossPoint, TrainingRequest
from tests.test_lora_train import dataset
from tests.test_lora_train import run as run_stopping

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(**overrides) -> TrainingRequest:
    values = dict(name="frames", images=dataset(), captions=["red", "green", "blue", "yellow"], steps=6,
                  batch_size=2, warmup_steps=1, checkpoint_every=3, sample_every=0, sample_steps=6, seed=3)
    return TrainingRequest(**(values | overrides))


def run(studio, training: TrainingRequest, tmp_path: Path):
    job = studio.models.worker.submit(lambda job: train(studio.models, training, job, cache_dir=tmp_path / "runs"),
                                      kind="train", priority=Priority.BACKGROUND)
    return job.result(), [event.loss for event in job.events() if isinstance(event, LossPoint)]


def test_textual_inversion_trains_the_new_token_alone_and_diffusers_loads_its_file(studio, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipeline = studio.models.current.pipeline
    unet_before = {name: value.clone() for name, value in pipeline.unet.state_dict().items()}
    table_before = pipeline.text_encoder.get_input_embeddings().weight.detach().clone()
    result, _ = run(studio, request(method="textual_inversion", name="framed-style", vectors=2, init_word="frame",
                                    learning_rate=5e-2), tmp_path)

    assert result.path == studio.models.embeddings_dir / "framed-style.safetensors"
    vectors = load_file(str(result.path))["emb_params"]
    assert vectors.shape == (2, table_before.shape[1])
    # only the new rows moved: the UNet and every old token's embedding are as they were
    table_after = pipeline.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table_after[:len(table_before)], table_before)
    assert all(torch.equal(value, unet_before[name]) for name, value in pipeline.unet.state_dict().items())
    # no gradient was kept for the frozen model (a loaded model's weights all require one until a training says no)
    assert not any(p.requires_grad or p.grad is not None
                   for module in (pipeline.unet, pipeline.text_encoder) for p in module.parameters())
    # a prompt that names it reads the saved file into those rows
    assert studio.models.use_embeddings("framed-style, red", "")[0] == "<ti:framed-style> <ti:framed-style:1>, red"
    ids = pipeline.tokenizer.convert_tokens_to_ids(["<ti:framed-style>", "<ti:framed-style:1>"])
    table_after = pipeline.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table_after[ids].float(), vectors)
    frame = table_before[pipeline.tokenizer("frame", add_special_tokens=False).input_ids[0]]
    assert not torch.allclose(vectors[0], frame.float())          # it trained away from its init word
    assert result.moved and result.method == "textual_inversion"

    plain = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    plain.load_textual_inversion(str(result.path), token="framed-style")
    plain_ids = plain.tokenizer.convert_tokens_to_ids(["framed-style", "framed-style_1"])
    assert torch.equal(plain.text_encoder.get_input_embeddings().weight[plain_ids].detach(), vectors)


def test_a_stopped_textual_inversion_resumes_from_its_checkpoint(studio, tmp_path):
    from safetensors.torch import load_file

    training = request(method="textual_inversion", name="framed-style", vectors=2, init_word="frame", steps=4,
                       checkpoint_every=2)
    first = run_stopping(studio, training, tmp_path, stop_at=2).result()
    assert first.stopped and first.steps == 2
    stopped_vectors = load_file(str(first.path))["emb_params"]
    second = run_stopping(studio, training, tmp_path).result()
    assert "Resumed at step 2" in " ".join(second.warnings) and second.steps == 4 and not second.stopped
    assert not torch.equal(load_file(str(second.path))["emb_params"], stopped_vectors)


def test_a_stop_before_the_first_step_writes_nothing_over_the_file_there_is(studio, tmp_path):
    """Stop pressed while the data and the first samples are prepared: no step runs and the embedding a user
    already has stays as it was."""
    from pipelines.training.loop import TrainingStopped

    training = request(method="textual_inversion", name="kept-style", vectors=2, init_word="frame", steps=3,
                       sample_every=2)
    path = studio.models.embeddings_dir / "kept-style.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"the user's own file")

    def stopped_at_once(job):
        job.cancel()
        return train(studio.models, training, job, cache_dir=tmp_path / "runs")
    job = studio.models.worker.submit(stopped_at_once, kind="train", priority=Priority.BACKGROUND)
    with pytest.raises(TrainingStopped, match="Stopped before the first step; nothing was written"):
        job.result()
    assert not [event for event in job.events() if isinstance(event, LossPoint)]
    assert path.read_bytes() == b"the user's own file"


def test_dreambooth_draws_its_class_images_once_and_compares_the_identifier_with_the_class(studio, tiny_model_dir,
                                                                                            tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipelines.training.class_images import class_images

    training = request(method="dreambooth", name="sks", trigger="sks frame", class_prompt="frame", class_images=2,
                       steps=3, learning_rate=1e-2)
    result, losses = run(studio, training, tmp_path)
    folders = list((tmp_path / "runs" / "class-images").iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.png"))) == 2
    stamps = {path: path.stat().st_mtime_ns for path in folders[0].glob("*.png")}
    assert set(result.comparison) == {"sks frame, red", "frame"}
    assert all(len(images) == 2 for images in result.comparison.values())
    assert len(losses) == 3 and all(np.isfinite(losses))

    # the same class again: read from the cache, nothing drawn
    model = studio.models.current

    class Refuses:
        scheduler = None

        def __call__(self, *args, **kwargs):
            raise AssertionError("a cached class image was drawn again")
    images = class_images(Refuses(), model.scheduler_config, folder=folders[0], class_prompt="frame", count=2, side=64)
    assert len(images) == 2 and {path: path.stat().st_mtime_ns for path in folders[0].glob("*.png")} == stamps

    plain = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    plain.load_lora_weights(str(result.path))
    assert plain.get_list_adapters()["unet"]


def test_the_prior_loss_is_added_with_its_weight():
    """DreamBooth's loss, eq. 2 of Ruiz et al.: the instance rows' mean error plus λ times the class rows'."""
    from pipelines.training import loop

    errors = [torch.tensor([1.0, 3.0]), torch.tensor([10.0, 30.0])]
    training = request(method="dreambooth", trigger="sks frame", class_prompt="frame", min_snr_gamma=0,
                       prior_loss_weight=0.5)
    parts = [{"x_t": torch.zeros(2), "t": torch.zeros(2, dtype=torch.long), "weight": 1.0},
             {"x_t": torch.zeros(2), "t": torch.zeros(2, dtype=torch.long), "weight": 0.5}]
    loss = loop._weighted(parts, errors, training, alphas_cumprod=None, processes=1)
    assert float(loss) == pytest.approx((1 + 3) / 2 + 0.5 * (10 + 30) / 2)


def test_buckets_keep_each_picture_s_shape_and_a_batch_comes_from_one_bucket(studio):
    from pipelines.training.data import bucket_sizes, prepare_data, size_multiple

    pipeline = studio.models.current.pipeline
    wide, tall, square = Image.new("RGB", (120, 60), "red"), Image.new("RGB", (50, 100), "blue"), dataset()[0]
    training = request(images=[wide, tall, square], captions=["wide", "tall", "square"], repeats=[1, 1, 6], steps=3)
    data = prepare_data(pipeline, training, 64)
    sizes = [picture.size for picture in data.pictures]
    multiple = size_multiple(pipeline)
    assert sizes[0][0] > sizes[0][1] and sizes[1][0] < sizes[1][1] and sizes[2] == (64, 64)
    assert all(side % multiple == 0 and side > 0 for size in sizes for side in size)
    assert all(width * height <= 64 * 64 for width, height in bucket_sizes(64, multiple))
    assert {bucket.size for bucket in data.buckets} == set(sizes)
    for bucket in data.buckets:
        assert bucket.latents.shape[-2:] == (bucket.size[1] // pipeline.vae_scale_factor,
                                             bucket.size[0] // pipeline.vae_scale_factor)
    # repeats: the square picture (6 of 8) is drawn about three quarters of the time
    generator = torch.Generator().manual_seed(0)
    draws = [data.draw(1, generator)[0].size for _ in range(800)]
    assert draws.count((64, 64)) / len(draws) == pytest.approx(0.75, abs=0.05)

    # and the training runs on them, each batch one shape
    _, losses = run(studio, training, studio.models.models_dir.parent)
    assert len(losses) == training.steps and all(np.isfinite(losses))


def test_a_preset_round_trips_without_the_data_and_bad_ones_are_refused(tmp_path):
    from pipelines.training.presets import load_preset, preset_names, read_settings, save_preset

    settings = request(method="textual_inversion", vectors=3, init_word="style").settings()
    save_preset(tmp_path, "my style", settings)
    assert preset_names(tmp_path) == ["my style"] and load_preset(tmp_path, "my style") == settings
    assert "images" not in json.loads((tmp_path / "training-presets" / "my style.json").read_text())["settings"]
    with pytest.raises(ValueError, match="preset's name"):
        save_preset(tmp_path, "../escape", settings)
    with pytest.raises(ValueError, match="Not training settings: colour"):
        save_preset(tmp_path, "odd", settings | {"colour": 1})
    with pytest.raises(ValueError, match="not a training settings file"):
        read_settings('{"steps": 3}', source="x.json")
    with pytest.raises(ValueError, match="No training preset 'gone'"):
        load_preset(tmp_path, "gone")


def test_two_processes_under_torchrun_follow_the_one_process_loss_curve_and_write_one_file(studio, tiny_model_dir,
                                                                                           tmp_path):
    """Data-parallel on 2 CPU processes (gloo), the command line's run from an exported settings file: each
    process trains on half of every batch and DDP averages the gradients, so the loss curve is the studio's
    one-process curve (to float rounding), and one file is written."""
    from pipelines.training.data import read_dataset
    from pipelines.training.presets import read_settings, settings_document

    data = tmp_path / "data"
    data.mkdir()
    for image, caption in zip(dataset(), ["red", "green", "blue", "yellow"]):
        image.save(data / f"{caption}.png")
        (data / f"{caption}.txt").write_text(f"{caption} square")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(settings_document(
        {"name": "ddp", "trigger": "framed", "steps": 4, "batch_size": 4, "warmup_steps": 1, "sample_every": 0,
         "sample_steps": 2, "checkpoint_every": 4, "seed": 3, "learning_rate": 1e-2})))
    out = tmp_path / "models-2"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "pipelines.training", "--settings", str(settings), "--data",
                           str(data), "--model", str(tiny_model_dir), "--models-dir", str(out),
                           "--losses", str(tmp_path / "losses.json")],
                          cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    curve = json.loads((tmp_path / "losses.json").read_text())
    assert sorted(path.name for path in (out / "lora").iterdir() if path.is_file()) == ["ddp.safetensors"]

    items = read_dataset(sorted(data.iterdir()))
    alone = TrainingRequest(**read_settings(settings.read_text(), source="settings"),
                            images=[item.image for item in items], captions=[item.caption for item in items])
    _, losses = run(studio, alone, tmp_path)
    assert curve["processes"] == 2 and len(curve["losses"]) == 4
    assert np.allclose(curve["losses"], losses, rtol=1e-4, atol=1e-6)
