"""Single-file checkpoints: the tiny model (and a tiny SDXL) exported in the original SD layout loads through
diffusers' real `from_single_file` path (offline, with `--model-config`) into the very same model.

The config folder handed to the loader has no weights: diffusers quietly takes a component it does
not find in the single file (the text encoder, say) from the config folder, which would make a
broken export look perfect here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.core.paths import ModelLoadError
from pipelines.generation.generator import Generator
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.tasks.txt2img import Txt2ImgRequest
from recipe.single_file import main as export_main
from recipe.single_file import save_single_file

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny_single_file(tiny_model_dir, tmp_path_factory):
    """The tiny model folder exported by the CLI to one .safetensors file."""
    path = tmp_path_factory.mktemp("single") / "tiny-sd.safetensors"
    assert export_main([str(tiny_model_dir), str(path)]) == path
    return path


@pytest.fixture(scope="module")
def config_only_dir(tiny_model_dir, tmp_path_factory):
    """The tiny folder's configs and tokenizer, without its weights: all a `--model-config` may lend."""
    folder = tmp_path_factory.mktemp("config") / "tiny-sd-config"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


@pytest.fixture
def offline_empty_hub(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache, whatever this machine has cached."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))


def manager() -> ModelManager:
    return ModelManager(MemoryManager(device="cpu"))


def test_export_writes_the_original_key_layout(tiny_single_file):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    checkpoint = load_file(tiny_single_file)
    prefixes = {key.split(".")[0] for key in checkpoint}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    # Landmarks of the layout diffusers' reader keys on (tiny UNet: 2 blocks of 1 layer).
    assert checkpoint["model.diffusion_model.input_blocks.2.0.op.weight"].shape == (32, 32, 3, 3)
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in checkpoint      # upsampler, no attention
    assert "model.diffusion_model.output_blocks.3.1.proj_in.weight" in checkpoint   # attention
    assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in checkpoint
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in checkpoint
    assert infer_diffusers_model_type(checkpoint) == "v1"
    assert not list(tiny_single_file.parent.glob("*.partial"))


def test_single_file_loads_the_same_weights_and_images(tiny_model_dir, tiny_single_file, config_only_dir,
                                                       offline_empty_hub):
    from_folder = manager()
    from_folder.load(str(tiny_model_dir))
    from_file = manager()
    loaded = from_file.load(str(tiny_single_file), config=str(config_only_dir))
    assert loaded.source.kind == "file" and loaded.model_hash

    for component in COMPONENTS:
        expected = getattr(from_folder.current.pipeline, component).state_dict()
        actual = getattr(loaded.pipeline, component).state_dict()
        assert actual.keys() == expected.keys(), component
        different = [key for key in expected if not torch.equal(actual[key], expected[key])]
        assert not different, f"{component}: {different[:5]}"

    request = Txt2ImgRequest(prompt="red apple", seed=3, steps=3, width=64, height=64)
    pixels = [np.asarray(Generator(models, None).generate(request).images[0].image)
              for models in (from_folder, from_file)]
    assert pixels[0].shape == (64, 64, 3) and pixels[0].std() > 0   # an image, not a blank
    assert np.array_equal(pixels[0], pixels[1])


def test_single_file_without_config_offline_says_to_pass_model_config(tiny_single_file, offline_empty_hub):
    with pytest.raises(ModelLoadError, match="--model-config"):
        manager().load(str(tiny_single_file))


def test_save_single_file_refuses_a_non_safetensors_name(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_single_file(tiny_model_dir, tmp_path / "tiny.ckpt")
    assert not list(tmp_path.iterdir())


def test_index_arithmetic_follows_the_config(tmp_path):
    """Another shape than the tiny model's: 3 UNet blocks of 2 layers with upsamplers after cross-attention
    (`output_blocks.k.2.conv`), a 2-level VAE with 2 layers; read back by diffusers' own loaders."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from recipe.single_file import UNET_PREFIX, VAE_PREFIX, apply_renames, unet_renames, vae_renames

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, norm_num_groups=4)
    checkpoint = {**apply_renames(unet.state_dict(), unet_renames(unet.config), UNET_PREFIX, "UNet"),
                  **apply_renames(vae.state_dict(), vae_renames(vae.config), VAE_PREFIX, "VAE")}
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in checkpoint
    assert "model.diffusion_model.input_blocks.8.0.in_layers.0.weight" in checkpoint   # last layer, no downsampler
    unet.save_config(tmp_path / "unet")
    vae.save_config(tmp_path / "vae")

    for model, cls in ((unet, UNet2DConditionModel), (vae, AutoencoderKL)):
        subfolder = "unet" if cls is UNet2DConditionModel else "vae"
        loaded = cls.from_single_file(checkpoint, config=str(tmp_path), subfolder=subfolder)
        expected, actual = model.state_dict(), loaded.state_dict()
        assert actual.keys() == expected.keys()
        assert all(torch.equal(actual[key], expected[key]) for key in expected), subfolder


def test_an_architecture_outside_the_layout_is_refused():
    from diffusers import UNet2DConditionModel

    from recipe.single_file import UNET_PREFIX, apply_renames, unet_renames

    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        unet_renames(unet.config)
    state = dict(unet.state_dict(), **{"extra.weight": torch.zeros(1)})
    config = dict(unet.config, class_embed_type=None)
    with pytest.raises(ValueError, match=r"no place in it: \['class_embedding.*'extra.weight'\]"):
        apply_renames(state, unet_renames(config), UNET_PREFIX, "UNet")


def test_an_sdxl_single_file_loads_the_same_weights_and_images(tmp_path, tiny_single_file, offline_empty_hub):
    """A tiny SDXL pipeline exported in Stability's layout (two text encoders, OpenCLIP-G in OpenCLIP's names) loads
    through diffusers' `StableDiffusionXLPipeline.from_single_file` (offline, its configs from a weightless folder)
    into the very same weights, and draws the same image as the folder."""
    from recipe.tiny import build_tiny_sdxl_pipeline

    folder, path, config = tmp_path / "tiny-xl", tmp_path / "tiny-xl.safetensors", tmp_path / "tiny-xl-config"
    build_tiny_sdxl_pipeline(tmp_path / "build", width_2=48).save_pretrained(folder)   # widths differ, as real ones
    save_single_file(folder, path)
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    checkpoint = load_file(path)
    assert {key.split(".")[0] for key in checkpoint} == {"model", "first_stage_model", "conditioner"}
    assert "model.diffusion_model.label_emb.0.0.weight" in checkpoint
    assert checkpoint["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (144, 48)

    from_folder, from_file = manager(), manager()
    from_folder.load(str(folder))
    loaded = from_file.load(str(path), config=str(config))
    assert type(loaded.pipeline).__name__ == "StableDiffusionXLPipeline"
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected = getattr(from_folder.current.pipeline, component).state_dict()
        actual = getattr(loaded.pipeline, component).state_dict()
        different = [key for key in expected if key not in actual or not torch.equal(actual[key], expected[key])]
        assert not different, f"{component}: {different[:5]}"
    request = Txt2ImgRequest(prompt="red apple", seed=3, steps=3, width=64, height=64)
    pixels = [np.asarray(Generator(models, None).generate(request).images[0].image).astype(int)
              for models in (from_folder, from_file)]
    # the weights are equal bit for bit; OpenCLIP's fused q, k and v come back as slices of one tensor, whose place
    # in memory changes the kernels' summation order when torch runs several threads (2e-7 in the encoder's output)
    assert pixels[0].std() > 0 and np.abs(pixels[0] - pixels[1]).max() <= 1
    # a config of another family than the file's is refused, naming both
    with pytest.raises(ModelLoadError, match="tiny-sd.safetensors is a checkpoint of the SD 1.x/2.x family, but "
                                             "--model-config tiny-xl-config is a folder of the SDXL family"):
        manager().load(str(tiny_single_file), config=str(config))
    # and SDXL's two encoders of one width cannot be told apart by diffusers' reader: the export refuses
    with pytest.raises(ValueError, match="Both text encoders are 32 wide"):
        save_single_file(build_tiny_sdxl_pipeline(tmp_path / "build"), tmp_path / "same-widths.safetensors")


def _weightless(folder, copy, components):
    """A copy of `folder` whose `components` keep their configs but not their weights."""
    def ignore(directory, names):
        weights = [name for name in names if name.endswith((".safetensors", ".bin"))]
        return weights if Path(directory).name in components else []
    shutil.copytree(folder, copy, ignore=ignore)
    return copy


@pytest.fixture(scope="module")
def tiny_sd3_folder(tmp_path_factory):
    from recipe.tiny import build_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("sd3")
    build_tiny_sd3_pipeline(root / "build").save_pretrained(root / "tiny-sd3")
    return root / "tiny-sd3"


def _same(pipeline, reference, components):
    for component in components:
        expected, actual = getattr(reference, component).state_dict(), getattr(pipeline, component).state_dict()
        different = [key for key in expected if key not in actual or not torch.equal(actual[key], expected[key])]
        assert not different, f"{component}: {different[:5]}"


def _image(models):
    request = Txt2ImgRequest(prompt="red apple", seed=3, steps=2, width=64, height=64, sampler="Euler")
    return np.asarray(Generator(models, None).generate(request).images[0].image)


def test_an_sd3_single_file_loads_the_same_weights_and_images(tiny_sd3_folder, tmp_path, offline_empty_hub):
    """A tiny SD 3 exported in Stability's layout (the MMDiT under model.diffusion_model., the VAE under
    first_stage_model., no text encoders, as SD 3.5 fine-tunes are shared) loads through diffusers'
    `StableDiffusion3Pipeline.from_single_file` into the folder's very weights, the text encoders read from
    --model-config (diffusers' own reader takes only a diffusers model's weights from there), and draws its image.
    The config folder has no transformer or VAE weights, so those can only have come from the file."""
    path = tmp_path / "tiny-sd3.safetensors"
    assert export_main([str(tiny_sd3_folder), str(path)]) == path
    checkpoint = load_file(path)
    assert {key.split(".")[0] for key in checkpoint} == {"model", "first_stage_model"}
    assert checkpoint["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].shape == (96, 32)
    config = _weightless(tiny_sd3_folder, tmp_path / "tiny-sd3-config", ("transformer", "vae"))

    from_folder, from_file = manager(), manager()
    from_folder.load(str(tiny_sd3_folder))
    loaded = from_file.load(str(path), config=str(config))
    assert type(loaded.pipeline).__name__ == "StableDiffusion3Pipeline"
    _same(loaded.pipeline, from_folder.current.pipeline, ("transformer", "vae", "text_encoder", "text_encoder_2",
                                                          "text_encoder_3"))
    folder_image = _image(from_folder)
    assert folder_image.std() > 0 and np.array_equal(folder_image, _image(from_file))
    # a config that lists what the file holds as absent has no architecture to read it with: refused, saying so
    import json

    index = json.loads((config / "model_index.json").read_text())
    (config / "model_index.json").write_text(json.dumps(index | {"vae": [None, None]}))
    with pytest.raises(ModelLoadError, match="tiny-sd3.safetensors holds a vae, which --model-config tiny-sd3-config "
                                             "lists as absent"):
        manager().load(str(path), config=str(config))


def test_an_sd3_file_of_the_transformer_alone_takes_the_rest_from_the_config(tiny_sd3_folder, tmp_path,
                                                                           offline_empty_hub):
    """A file of the MMDiT alone (as most SD 3 and Flux files are) takes its VAE and text encoders from --model-config;
    without one it is refused naming what it lacks, and a config folder that lacks them too is refused saying so."""
    from safetensors.torch import save_file

    from recipe.single_file_sd3 import mmdit_keys

    path = tmp_path / "sd3-transformer.safetensors"
    reference = manager()
    reference.load(str(tiny_sd3_folder))
    save_file({key: tensor.contiguous() for key, tensor in mmdit_keys(reference.current.pipeline.transformer).items()},
              str(path))
    with pytest.raises(ModelLoadError, match="sd3-transformer.safetensors holds no vae and no text_encoder and no "
                                             "text_encoder_2 and no text_encoder_3. Pass --model-config with a "
                                             "diffusers folder of the SD 3.x model"):
        manager().load(str(path))
    loaded = manager()
    loaded.load(str(path), config=str(_weightless(tiny_sd3_folder, tmp_path / "no-transformer", ("transformer",))))
    _same(loaded.current.pipeline, reference.current.pipeline, ("transformer", "vae", "text_encoder"))
    assert np.array_equal(_image(reference), _image(loaded))
    with pytest.raises(ModelLoadError, match="holds no vae and no text_encoder.*read from --model-config "
                                             "no-weights, which could not give them"):
        manager().load(str(path), config=str(_weightless(tiny_sd3_folder, tmp_path / "no-weights",
                                                         ("transformer", "vae"))))
    # a config saved without its T5 (the studio runs SD 3 so): the file loads without it too
    from diffusers import StableDiffusion3Pipeline

    pipeline = reference.current.pipeline
    StableDiffusion3Pipeline(**pipeline.components | {"text_encoder_3": None, "tokenizer_3": None}).save_pretrained(
        tmp_path / "without-t5")
    without = manager()
    without.load(str(path), config=str(_weightless(tmp_path / "without-t5", tmp_path / "without-t5-config",
                                                   ("transformer",))))
    assert without.current.pipeline.text_encoder_3 is None and _image(without).std() > 0


def test_a_flux_export_is_in_black_forest_labs_layout(tmp_path):
    """The Flux.1 export (recipe/single_file_flux.py) claims every tensor and writes BFL's keys, which diffusers names
    Flux.1 [dev] (its guidance input kept). Reading one back needs the released width: `python -m
    bench.flux_single_file` does that, at the real width, through the studio."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from recipe.tiny import build_tiny_flux_pipeline

    pipeline = build_tiny_flux_pipeline(tmp_path / "build")
    pipeline.save_pretrained(tmp_path / "tiny-flux")
    path = export_main([str(tmp_path / "tiny-flux"), str(tmp_path / "tiny-flux.safetensors")])
    checkpoint = load_file(path)
    assert infer_diffusers_model_type(checkpoint) == "flux-dev"
    width = pipeline.transformer.inner_dim
    assert checkpoint["double_blocks.0.img_attn.qkv.weight"].shape == (3 * width, width)
    assert checkpoint["single_blocks.0.linear1.weight"].shape == (7 * width, width)     # q, k, v and the 4× MLP
    assert sum(tensor.numel() for tensor in checkpoint.values()) == \
        sum(tensor.numel() for tensor in pipeline.transformer.state_dict().values())


@pytest.mark.parametrize("variant", ["dev", "klein"])
def test_a_flux_2_file_of_the_transformer_alone_loads_into_its_configs_pipeline(variant, tmp_path, offline_empty_hub):
    """A Flux 2 file holds the transformer alone in Black Forest Labs' layout (recipe/single_file_flux2.py writes it,
    diffusers reads it back at any width, naming every such file [dev]). With --model-config of a [dev] or [klein]
    folder whose transformer has no weights, it loads as that folder's pipeline with the file's very weights and
    draws the folder's image; so does the same file under ComfyUI's `model.diffusion_model.` names. Without a config
    it is refused saying what to pass, and a file holding more than the transformer is refused saying to load the
    folder."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import save_file

    from recipe.tiny import build_tiny_flux2_klein_pipeline, build_tiny_flux2_pipeline

    build = build_tiny_flux2_pipeline if variant == "dev" else build_tiny_flux2_klein_pipeline
    build(tmp_path / "build").save_pretrained(tmp_path / "tiny-flux2")
    path = export_main([str(tmp_path / "tiny-flux2"), str(tmp_path / "tiny-flux2.safetensors")])
    checkpoint = load_file(path)
    assert infer_diffusers_model_type(checkpoint) == "flux-2-dev"
    reference = manager()
    reference.load(str(tmp_path / "tiny-flux2"))
    transformer = reference.current.pipeline.transformer
    width = transformer.inner_dim
    assert checkpoint["double_blocks.0.img_attn.qkv.weight"].shape == (3 * width, width)
    assert sum(tensor.numel() for tensor in checkpoint.values()) == \
        sum(tensor.numel() for tensor in transformer.state_dict().values())
    config = _weightless(tmp_path / "tiny-flux2", tmp_path / "tiny-flux2-config", ("transformer",))
    comfy = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{key}": tensor for key, tensor in checkpoint.items()}, str(comfy))
    for file in (path, comfy):
        loaded = manager()
        loaded.load(str(file), config=str(config))
        assert type(loaded.current.pipeline) is type(reference.current.pipeline)
        _same(loaded.current.pipeline, reference.current.pipeline, ("transformer", "vae", "text_encoder"))
    image = _image(reference)
    assert image.std() > 0 and np.array_equal(image, _image(loaded))
    with pytest.raises(ModelLoadError, match="tiny-flux2.safetensors is Flux 2's transformer alone. Pass "
                                             r"--model-config with a diffusers folder of the Flux 2 model"):
        manager().load(str(path))
    whole = tmp_path / "whole.safetensors"
    save_file(checkpoint | {"vae.decoder.conv_in.weight": torch.zeros(1)}, str(whole))
    with pytest.raises(ModelLoadError, match=r"whole.safetensors holds more than Flux 2's transformer \(vae\).*Load "
                                             "the diffusers folder"):
        manager().load(str(whole), config=str(config))
    scaled = tmp_path / "scaled-fp8.safetensors"        # ComfyUI's scaled fp8: each weight's scale beside it
    save_file(checkpoint | {"scaled_fp8": torch.zeros(0), "double_blocks.0.img_attn.qkv.scale_weight": torch.ones(1)},
              str(scaled))
    with pytest.raises(ModelLoadError, match=r"scaled-fp8.safetensors holds quantized weights with their scales "
                                             r"\(scale_weight, scaled_fp8: ComfyUI's scaled fp8 layout\)"):
        manager().load(str(scaled), config=str(config))
