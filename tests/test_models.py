"""Model loading: sources, refusals, offline hub ids, releasing memory on switch, memory modes."""

from __future__ import annotations

import gc
import re
import shutil
import weakref

import numpy as np
import pytest
import torch

from pipelines.core.paths import ModelLoadError
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager, MemoryMode, choose_mode
from pipelines.models.sources import resolve_source

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


def test_a_folder_of_fp16_variant_weights_only_loads_them(tmp_path):
    """A folder downloaded as a variant (`unet/diffusion_pytorch_model.fp16.safetensors`, no plain weights) is read
    as that variant instead of being refused as having no safetensors: the weights are the variant's, cast to the
    studio's dtype."""
    from pipelines.generation.generator import Generator
    from pipelines.tasks.txt2img import Txt2ImgRequest
    from recipe.tiny import build_tiny_pipeline

    built = build_tiny_pipeline(tmp_path / "build")
    built.to(torch.float16).save_pretrained(tmp_path / "models" / "tiny-fp16", variant="fp16")
    assert not list((tmp_path / "models" / "tiny-fp16").rglob("diffusion_pytorch_model.safetensors"))
    models = manager(tmp_path)
    pipeline = models.load(str(tmp_path / "models" / "tiny-fp16")).pipeline
    assert pipeline.unet.dtype == torch.float32
    expected = built.unet.state_dict()
    assert all(torch.equal(tensor, expected[key].float()) for key, tensor in pipeline.unet.state_dict().items())
    done = Generator(models, None).generate(Txt2ImgRequest(prompt="red apple", steps=2, width=64, height=64))
    assert np.asarray(done.images[0].image).std() > 0
    # two variants and no plain weights: which one is meant is not guessed
    shutil.copytree(tmp_path / "models" / "tiny-fp16", tmp_path / "models" / "two-variants")
    for weights in (tmp_path / "models" / "two-variants").rglob("*.fp16.safetensors"):
        shutil.copy(weights, weights.with_name(weights.name.replace(".fp16.", ".bf16.")))
    with pytest.raises(ModelLoadError, match="two-variants holds its weights as several variants \\(bf16, fp16\\)"):
        models.load(str(tmp_path / "models" / "two-variants"))


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
    # a repo cached as a variant's weights only (a `--include "*fp16*"` download) is read as that variant
    from recipe.tiny import build_tiny_pipeline

    variant = cache / "models--studio--tiny-fp16"
    build_tiny_pipeline(tmp_path / "build").to(torch.float16).save_pretrained(
        variant / "snapshots" / ("1" * 40), variant="fp16")
    (variant / "refs").mkdir()
    (variant / "refs" / "main").write_text("1" * 40)
    loaded = manager(tmp_path).load("studio/tiny-fp16")
    assert loaded.source.kind == "hub" and loaded.pipeline.unet.dtype == torch.float32


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


def test_model_offload_counts_the_largest_component_and_the_lone_models_beside_it(studio, tmp_path):
    """What `balanced` and `low` keep on the device: the largest component of the pipeline (one runs at a time),
    plus a ControlNet that runs beside it; a family whose text encoder outweighs its denoiser (SD 3's T5) climbs
    the ladder by that, not by 3/4 of its weights."""
    from pipelines.models.memory import offload_resident_bytes, weights_bytes
    from recipe.tiny import build_tiny_controlnet

    pipeline = studio.models.current.pipeline
    parts = {name: weights_bytes([module]) for name, module in pipeline.components.items()
             if isinstance(module, torch.nn.Module)}
    assert offload_resident_bytes([pipeline]) == max(parts.values()) < weights_bytes([pipeline])
    controlnet = build_tiny_controlnet(pipeline.unet)
    assert offload_resident_bytes([pipeline, controlnet]) == max(parts.values()) + weights_bytes([controlnet])
    cuda, weights = torch.device("cuda"), int(15 * GIB)     # SD 3 medium in bf16: T5 9.5 GB of it, the MMDiT 4
    chosen = [choose_mode(device=cuda, requested="auto", weights_bytes=weights, free_vram_bytes=int(13.5 * GIB),
                          width=1024, height=1024, offload_bytes=offload) for offload in (None, int(9.5 * GIB))]
    # 3/4 of the weights (11.25 GB) and a megapixel's activations would not fit 12.7 GB: sliced; 9.5 GB does
    assert chosen == [MemoryMode.LOW, MemoryMode.BALANCED]


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


# ----------------------------------------------------------------------------- slots, placement, failures


def test_a_failed_load_keeps_the_model_that_was_loaded(studio, tmp_path):
    models = studio.models
    before = models.current
    broken = models.models_dir / "broken-model"
    broken.mkdir(parents=True)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="broken-model"):
        models.load(str(broken), from_ui=True)
    assert models.current is before
    assert studio.generate(_request()).images[0].image.size == (64, 64)  # and it still generates


def test_slots_hold_several_models_and_unload_one_at_a_time(studio, tiny_model_dir):
    models = studio.models
    base = models.current
    draft = models.load(str(tiny_model_dir), slot="draft")
    assert models.current is base and models.slots["draft"] is draft
    # the draft slot takes a diffusers model folder's UNet (speculative sampling's draft), read afresh
    assert type(draft.pipeline).__name__ == "UNet2DConditionModel" and draft.pipeline is not base.pipeline.unet
    with pytest.raises(ValueError, match="Unknown model slot 'lora'"):
        models.load(str(tiny_model_dir), slot="lora")
    models.unload("draft")
    assert set(models.slots) == {"base"} and models.current is base


def test_changing_the_memory_mode_places_every_pipeline_on_the_device_thread(studio, pretend_cuda, monkeypatch):
    import threading

    models = studio.models
    derived = models.pipeline("img2img")
    placed_on = []
    place = models.memory.place
    monkeypatch.setattr(models.memory, "place",
                        lambda pipeline, **kw: placed_on.append(threading.get_ident()) or place(pipeline, **kw))
    assert models.set_memory_mode("balanced") is MemoryMode.BALANCED
    offloaded = {pipeline for name, pipeline in pretend_cuda if name == "enable_model_cpu_offload"}
    assert offloaded == {id(models.current.pipeline), id(derived)}   # the derived img2img pipeline too
    assert set(placed_on) == {models.worker.call(threading.get_ident)}
    assert models.memory.requested_mode == "balanced"
    with pytest.raises(ValueError, match="Unknown memory mode 'fast'"):
        models.set_memory_mode("fast")


def test_auto_memory_mode_is_chosen_for_each_request_s_size(studio, pretend_cuda, monkeypatch):
    models = studio.models
    monkeypatch.setattr(models.memory, "free_vram", lambda: 2 * GIB)  # 1.2 GiB after the context reserve
    assert models.fit(_request(width=1024, height=1024)) is MemoryMode.LOW   # 1 MP of activations: offload + slicing
    assert ("enable_attention_slicing", id(models.current.pipeline)) in pretend_cuda
    pretend_cuda.clear()
    studio.generate(_request())                                           # 64 px fits whole
    assert models.memory.mode is MemoryMode.HIGH
    assert ("to", id(models.current.pipeline)) in pretend_cuda
    pretend_cuda.clear()
    studio.generate(_request(seed=2))
    assert pretend_cuda == []                                             # same mode: nothing moves


def test_switching_models_frees_the_old_vae_even_after_live_previews(studio, tiny_model_dir):
    models = studio.models
    studio.generate(_request(preview_every=1, preview_mode="linear"))
    old_vae = weakref.ref(models.current.pipeline.vae)
    models.load(str(tiny_model_dir))
    gc.collect()
    assert old_vae() is None


def _request(**overrides):
    from pipelines.tasks.txt2img import Txt2ImgRequest
    return Txt2ImgRequest(**(dict(prompt="red apple", steps=2, width=64, height=64, seed=1) | overrides))


def test_an_uncached_hub_id_fails_at_once_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    from pipelines.models import checkpoints as models_module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    probes = []
    monkeypatch.setattr(models_module, "_hub_reachable", lambda: probes.append(1) or False)
    with pytest.raises(ModelLoadError, match="'someone/not-a-model' is not in the local Hugging Face cache"):
        manager(tmp_path).load("someone/not-a-model")
    assert probes == [1]      # asked once whether the hub answers, and never tried to download


# ----------------------------------------------------------------------------- a placement the device refuses


@pytest.fixture
def other_model(tmp_path):
    """A second tiny model under models/, with other seeded weights than the studio's: its images differ."""
    from recipe.tiny import build_tiny_pipeline

    folder = tmp_path / "models" / "other-sd"
    build_tiny_pipeline(tmp_path / "other-build", seed=5).save_pretrained(folder, safe_serialization=True)
    return folder


def refuse_new_pipelines(models, monkeypatch, error: Exception) -> list:
    """`memory.place` raises `error` for any pipeline but the loaded model's (as a device that refuses the new
    weights would); returns the weak references of the pipelines it refused."""
    old = {id(pipeline) for pipeline in models.current.pipelines}
    place = models.memory.place
    refused = []

    def refusing(pipeline, **kwargs):
        if id(pipeline) not in old:
            refused.append(weakref.ref(pipeline))
            raise type(error)(*error.args)    # a fresh one: a raised error's traceback holds the pipeline
        return place(pipeline, **kwargs)

    monkeypatch.setattr(models.memory, "place", refusing)
    return refused


@pytest.mark.slow
@pytest.mark.parametrize("refusal", [RuntimeError("CUDA error: out of memory"),
                                     OSError("the device refused the weights")], ids=["out-of-memory", "os-error"])
def test_bug7_a_failed_placement_keeps_the_old_model_serving_and_lets_the_new_one_go(studio, other_model,
                                                                                    monkeypatch, refusal):
    """Bug 7: placing a model that was read fine fails (the device runs out of memory, or refuses): the model that
    was loaded stays loaded and generates as before, the error names the model and the failure, the new one is
    let go; and the same model loads once the device takes it."""
    models = studio.models
    before = models.current
    plain = np.asarray(studio.generate(_request()).images[0].image)
    refused = refuse_new_pipelines(models, monkeypatch, refusal)
    named = re.escape(f"{type(refusal).__name__}: {refusal}")
    with pytest.raises(ModelLoadError, match=rf"Could not place other-sd .*{named}.*tiny-sd is still loaded") \
            as failure:
        models.load(str(other_model), from_ui=True)
    assert refused, "the new model was never placed"
    assert models.current is before and set(models.slots) == {"base"}
    again = np.asarray(studio.generate(_request()).images[0].image)
    assert np.array_equal(again, plain)                    # the old model, bit for bit
    del failure
    gc.collect()
    assert all(pipeline() is None for pipeline in refused)  # nothing holds the refused model any more

    monkeypatch.undo()
    assert models.load(str(other_model), from_ui=True).name == "other-sd"
    assert not np.array_equal(np.asarray(studio.generate(_request()).images[0].image), plain)   # another model


def test_bug7_on_a_gpu_the_old_model_leaves_the_device_for_the_new_one_and_comes_back(studio, other_model,
                                                                                   pretend_cuda, monkeypatch):
    """Bug 7, the memory side: the device may not hold both models, so the old one moves to the CPU while the new
    one is placed, and back onto the device, in the mode it ran in, when the new one is refused."""
    models = studio.models
    before = models.current
    moves = []
    monkeypatch.setattr(before.pipeline, "to", lambda device, *a, **k: moves.append(str(device)))
    refuse_new_pipelines(models, monkeypatch, RuntimeError("CUDA error: out of memory"))
    with pytest.raises(ModelLoadError, match="Could not place other-sd.*tiny-sd is still loaded.*lower memory mode"):
        models.load(str(other_model), from_ui=True)
    assert moves == ["cpu", "cuda"]
    assert models.current is before and models.memory.mode is MemoryMode.HIGH


def test_bug10_the_model_picker_lists_no_link_that_leads_out_of_models(tmp_path, tiny_model_dir):
    """Bug 10, the model picker: a link under models/ to a model outside it is not offered (loading it is refused),
    while a link that stays inside models/ still is."""
    from types import SimpleNamespace

    from studio.tabs.models import local_choices

    models = tmp_path / "models"
    models.mkdir()
    (models / "escape").symlink_to(tiny_model_dir, target_is_directory=True)
    (models / "inside").mkdir()
    (models / "inside" / "model_index.json").write_text("{}")
    (models / "alias").symlink_to(models / "inside", target_is_directory=True)
    choices = local_choices(SimpleNamespace(models=SimpleNamespace(models_dir=models)))
    assert choices == ["embedded", str(models / "alias"), str(models / "inside")]
