"""LoRAs in prompts (pipelines/lora/adapters.py): kohya files made in-process for the tiny model, applied as
adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core.prompts import LoraUse, split_lora_tags
from pipelines.io.metadata import parse_infotext
from pipelines.tasks.txt2img import Txt2ImgRequest


def make_kohya_lora(unet_folder: Path, path: Path, *, seed: int = 0, base: str = "tiny-sd", **unet_overrides) -> Path:
    """A random (non-zero) LoRA on the attention of the UNet in `unet_folder`, saved as kohya/A1111 keys."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    if unet_overrides:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_folder) | unet_overrides)
    else:
        unet = UNet2DConditionModel.from_pretrained(unet_folder)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path), metadata={"ss_sd_model_name": base})
    return path


@pytest.fixture
def with_lora(studio, tiny_model_dir):
    make_kohya_lora(tiny_model_dir / "unet", studio.models.lora_dir / "style.safetensors")
    return studio


def request(prompt: str, **overrides) -> Txt2ImgRequest:
    return Txt2ImgRequest(**(dict(prompt=prompt, steps=4, seed=21, width=64, height=64) | overrides))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_lora_tags_are_taken_out_of_the_prompt_with_their_weights():
    text, uses = split_lora_tags("red apple, <lora:style:0.6> noto style <lora:Pixel Art> <lora:style:.8>")
    assert text == "red apple, noto style"
    assert uses == [LoraUse("style", 0.8), LoraUse("Pixel Art", 1.0)]
    with pytest.raises(ValueError, match="must be a number from -4 to 4 but is 9"):
        split_lora_tags("<lora:style:9>")
    with pytest.raises(ValueError, match="<lora:style:abc> is not a LoRA tag"):
        split_lora_tags("red apple <lora:style:abc>")
    assert split_lora_tags("red apple,  ") == ("red apple,  ", [])      # no tag: the prompt as it was


def test_a_lora_moves_the_image_and_weight_zero_or_no_tag_gives_the_plain_image_bit_for_bit(with_lora):
    plain = pixels(with_lora.generate(request("red apple")).images[0].image)
    styled = with_lora.generate(request("red apple <lora:style:1>"))
    assert np.abs(pixels(styled.images[0].image) - plain).mean() > 1
    assert any(message == "LoRA style: weight 1, 32 modules patched." for message in styled.messages)
    assert np.array_equal(pixels(with_lora.generate(request("red apple <lora:style:0>")).images[0].image), plain)
    assert np.array_equal(pixels(with_lora.generate(request("red apple")).images[0].image), plain)  # switched off
    half = pixels(with_lora.generate(request("red apple <lora:style:0.5>")).images[0].image)
    assert 0 < np.abs(half - plain).mean() < np.abs(pixels(styled.images[0].image) - plain).mean()


def test_the_infotext_keeps_the_tag_and_adds_a1111_s_lora_hashes(with_lora):
    from pipelines.lora.adapters import short_hash

    done = with_lora.generate(request("red apple <lora:style:0.7>"))
    prompt, _, parameters = parse_infotext(done.images[0].infotext)
    assert prompt == "red apple <lora:style:0.7>"
    assert parameters["Lora hashes"] == f"style: {short_hash(with_lora.models.lora_dir / 'style.safetensors')}"
    replay = with_lora.generate(request(prompt))
    assert np.array_equal(pixels(replay.images[0].image), pixels(done.images[0].image))


def test_a_file_that_plain_diffusers_loads_changes_its_output_the_same_way(with_lora):
    from diffusers import StableDiffusionPipeline

    folder = Path(with_lora.models.current.source.location)
    plain = StableDiffusionPipeline.from_pretrained(folder)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(with_lora.models.lora_dir), weight_name="style.safetensors", adapter_name="style")
    studio_unet = with_lora.models.current.pipeline.unet
    with_lora.generate(request("x <lora:style:1>"))       # loads the adapter in the studio
    ours = dict(studio_unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    theirs = dict(plain.unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    from pipelines.lora.adapters import adapter_name

    torch.testing.assert_close(ours.lora_B[adapter_name("style")].weight, theirs.lora_B["style"].weight)


def test_a_lora_for_another_model_or_an_unknown_name_is_a_clear_error(with_lora, tiny_model_dir):
    make_kohya_lora(tiny_model_dir / "unet", with_lora.models.lora_dir / "wide.safetensors", base="wide-sd",
                    cross_attention_dim=48)
    with pytest.raises(ValueError, match="LoRA 'wide' does not fit the loaded model.*made for wide-sd"):
        with_lora.generate(request("red apple <lora:wide:1>"))
    with pytest.raises(ValueError, match="No LoRA named 'nope'.*available: emoji-ldm-lcm, style, wide"):
        with_lora.generate(request("red apple <lora:nope:1>"))
    assert with_lora.generate(request("red apple <lora:style:1>")).images    # still serving, adapter intact


def test_a_replaced_lora_file_is_loaded_again(with_lora, tiny_model_dir):
    first = with_lora.generate(request("red apple <lora:style:1>"))
    make_kohya_lora(tiny_model_dir / "unet", with_lora.models.lora_dir / "style.safetensors", seed=7)  # retrained
    second = with_lora.generate(request("red apple <lora:style:1>"))
    assert not np.array_equal(pixels(first.images[0].image), pixels(second.images[0].image))
    assert parse_infotext(first.images[0].infotext)[2]["Lora hashes"] != \
        parse_infotext(second.images[0].infotext)[2]["Lora hashes"]


def test_bug10_a_lora_linked_from_outside_models_is_neither_listed_nor_loaded(with_lora, tiny_model_dir, tmp_path):
    """Bug 10: a link inside models/lora/, to a file or to a folder, that leads outside models/ is not listed and
    not loaded: links are resolved before the path is confined, as the model picker does. A link that stays
    inside models/ is a LoRA like any other."""
    from pipelines.lora.adapters import lora_files

    models = with_lora.models
    outside = tmp_path / "elsewhere"
    make_kohya_lora(tiny_model_dir / "unet", outside / "stolen.safetensors", seed=3)
    make_kohya_lora(tiny_model_dir / "unet", outside / "folder" / "pytorch_lora_weights.safetensors", seed=4)
    make_kohya_lora(tiny_model_dir / "unet", models.models_dir / "kept" / "inside.safetensors", seed=5)
    (models.lora_dir / "linked.safetensors").symlink_to(outside / "stolen.safetensors")
    (models.lora_dir / "linked-folder").symlink_to(outside / "folder", target_is_directory=True)
    (models.lora_dir / "inside-link.safetensors").symlink_to(models.models_dir / "kept" / "inside.safetensors")

    assert set(lora_files(models.lora_dir)) == {"style", "inside-link", "emoji-ldm-lcm"}   # and the shipped one
    plain = pixels(with_lora.generate(request("red apple")).images[0].image)
    for name in ("linked", "linked-folder"):
        with pytest.raises(ValueError, match=rf"LoRA '{name}'.* is {outside}.*, outside the app's model folders"):
            with_lora.generate(request(f"red apple <lora:{name}:1>"))
        assert name not in models.current.loras
    assert np.array_equal(pixels(with_lora.generate(request("red apple")).images[0].image), plain)
    linked_inside = with_lora.generate(request("red apple <lora:inside-link:1>"))
    assert np.abs(pixels(linked_inside.images[0].image) - plain).mean() > 1
