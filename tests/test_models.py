"""Model loading: sources, refusals, offline hub ids, releasing memory on switch, memory modes."""

from __future__ import annotations

import gc
import shutil
import weakref

import pytest
import torch

from pipelines.memory import MemoryManager, MemoryMode, choose_mode
from pipelines.models import ModelLoadError, ModelManager, resolve_source

GIB = 1024 ** 3


def manager(tmp_path, **kwargs) -> ModelManager:
    return ModelManager(MemoryManager(device="cpu"), models_dir=tmp_path / "models", **kwargs)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickled_checkpoints_are_refused_unless_allowed(tmp_path, suffix):
    checkpoint = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {}}, checkpoint)
    with pytest.raises(ModelLoadError, match="pickled checkpoint.*--allow-pickle"):
        manager(tmp_path).load(str(checkpoint))
    assert resolve_source(str(checkpoint), allow_pickle=True).kind == "file"


def test_folder_with_only_pickled_weights_is_refused(tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled-sd"
    shutil.copytree(tiny_model_dir, pickled)
    for weights in pickled.rglob("*.safetensors"):
        state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(weights)
        torch.save(state, weights.with_name(weights.name.replace(".safetensors", ".bin")))
        weights.unlink()
    with pytest.raises(ModelLoadError, match="no .safetensors weights.*--allow-pickle"):
        manager(tmp_path).load(str(pickled))


def test_uncached_hub_id_offline_names_the_model_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ModelLoadError) as error:
        manager(tmp_path).load("someone/not-cached-model")
    message = str(error.value)
    assert "someone/not-cached-model" in message and "huggingface-cli download" in message


def test_hub_id_loads_from_the_local_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    """A hub id resolves through the normal HF cache layout (models--owner--name/snapshots/<rev>)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--studio--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--studio--tiny-sd" / "refs").mkdir()
    (cache / "models--studio--tiny-sd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = manager(tmp_path).load("studio/tiny-sd")
    assert loaded.source.kind == "hub" and loaded.pipeline.unet is not None


def test_missing_paths_and_non_models_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        resolve_source(str(tmp_path / "empty"))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model checkpoint"):
        resolve_source(str(notes))
    with pytest.raises(ModelLoadError, match="neither an existing path nor a hub id"):
        resolve_source("not a model id")


def test_ui_requests_cannot_load_from_outside_the_app_folders(tiny_model_dir, tmp_path):
    models = manager(tmp_path)
    with pytest.raises(ModelLoadError, match="outside the app's model folders"):
        models.load(str(tiny_model_dir), from_ui=True)
    inside = models.models_dir / "tiny"
    shutil.copytree(tiny_model_dir, inside)
    assert models.load(str(inside), from_ui=True).name == "tiny"
    with pytest.raises(ModelLoadError, match="outside"):
        models.load(str(inside / ".." / ".." / "elsewhere"), from_ui=True)


def test_switching_models_releases_the_old_one(tiny_model_dir, tmp_path):
    models = manager(tmp_path)
    first = models.load(str(tiny_model_dir))
    models.pipeline("img2img")  # a derived pipeline holds references too
    old_unet = weakref.ref(first.pipeline.unet)
    old_vae = weakref.ref(first.pipeline.vae)
    del first
    second_dir = tmp_path / "models" / "second"
    shutil.copytree(tiny_model_dir, second_dir)
    models.load(str(second_dir))
    gc.collect()
    assert old_unet() is None and old_vae() is None
    assert models.current.name == "second"
    models.unload()
    assert models.current is None
    with pytest.raises(ValueError, match="No model is loaded"):
        models.require()


def test_memory_ladder_and_auto_choice():
    assert [MemoryMode.HIGH.lower(), MemoryMode.BALANCED.lower(), MemoryMode.LOW.lower(),
            MemoryMode.SEQUENTIAL.lower()] == [MemoryMode.BALANCED, MemoryMode.LOW, MemoryMode.SEQUENTIAL, None]
    cuda = torch.device("cuda")
    weights = int(2.0 * GIB)  # SD 1.5 in fp16
    assert choose_mode(device=cuda, requested="auto", weights_bytes=weights, free_vram_bytes=24 * GIB) is MemoryMode.HIGH
    assert choose_mode(device=cuda, requested="auto", weights_bytes=weights, free_vram_bytes=int(4.0 * GIB),
                       width=768, height=768) is MemoryMode.BALANCED
    assert choose_mode(device=cuda, requested="auto", weights_bytes=weights, free_vram_bytes=int(3.0 * GIB),
                       width=1024, height=1024) is MemoryMode.LOW
    assert choose_mode(device=cuda, requested="auto", weights_bytes=weights, free_vram_bytes=1 * GIB) \
        is MemoryMode.SEQUENTIAL
    assert choose_mode(device=cuda, requested="low", weights_bytes=weights, free_vram_bytes=80 * GIB) is MemoryMode.LOW
    assert choose_mode(device=torch.device("cpu"), requested="high", weights_bytes=weights,
                       free_vram_bytes=None) is MemoryMode.CPU


def test_device_and_dtype_choices_are_validated():
    with pytest.raises(ValueError, match="fp16 is not supported for CPU"):
        MemoryManager(device="cpu", dtype="fp16")
    with pytest.raises(ValueError, match="memory"):
        MemoryManager(device="cpu", memory="tiny")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            MemoryManager(device="cuda")
    stats = MemoryManager(device="cpu").stats()
    assert stats.device == "cpu" and stats.dtype == "fp32" and stats.ram_used_gib > 0
