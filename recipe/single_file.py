"""Export a diffusers Stable Diffusion (1.x/2.x or SDXL) pipeline as one `.safetensors` checkpoint in the original
(CompVis LDM / Stability / A1111) key layout: the kind of file model sites distribute. (SD 3.x: single_file_sd3.py;
Flux.1: single_file_flux.py; Flux 2: single_file_flux2.py.)

    python -m recipe.single_file FOLDER OUT.safetensors
    python launch.py --model OUT.safetensors --model-config FOLDER     # load it back in the studio

The studio loads such files through diffusers' `StableDiffusionPipeline.from_single_file`
(`ModelManager.load(path, config=FOLDER)`); this exporter lets the tests exercise that real path
on the seeded tiny model, offline. The mapping is this project's own, written from the module
structure of the two layouts; `diffusers.loaders.single_file_utils.convert_ldm_*_checkpoint` is
the forward direction it has to agree with.

The layouts, for a UNet with N blocks of L layers (diffusers on the right):

    model.diffusion_model.
        input_blocks.0.0                 conv_in
        input_blocks.k.0 / .k.1          down_blocks.b.resnets.j / .attentions.j    (k counts on: L layers,
        input_blocks.k.0.op              down_blocks.b.downsamplers.0.conv           then the downsampler)
        middle_block.0 / .1 / .2         mid_block.resnets.0 / .attentions.0 / .resnets.1
        output_blocks.k.0 / .k.1         up_blocks.b.resnets.j / .attentions.j      (L + 1 layers per block)
        output_blocks.k.{1|2}.conv       up_blocks.b.upsamplers.0.conv              (after the attention, if any)
        time_embed.0 / .2, out.0 / .2    time_embedding.linear_1 / _2, conv_norm_out / conv_out
    first_stage_model.                   the VAE: encoder.down.i.block.j, decoder.up.(N-1-i).block.j, ...
    cond_stage_model.transformer.        the CLIP text encoder in Hugging Face's own key names (SD 2.x's OpenCLIP
                                         too, which diffusers reads there; A1111 wants it as cond_stage_model.model.)

SDXL files (Stability's layout) add the UNet's `label_emb.0.0 / .0.2` (add_embedding.linear_1 / _2: the pooled
text and size ids) and hold two text encoders: CLIP-L under `conditioner.embedders.0.transformer.`, as above, and
OpenCLIP-G under `conditioner.embedders.1.model.` in OpenCLIP's own names (q, k and v fused into `in_proj_weight`,
`text_projection` stored transposed).

Every UNet and VAE tensor must be claimed by a rule its config implies, and every rule must claim a
tensor, so an architecture this mapping does not describe fails here, loudly, instead of producing
a file that diffusers half-loads.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# OpenCLIP's names inside one residual block of its text transformer, for Hugging Face CLIP's
OPEN_CLIP_LAYER_NAMES = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))

# Leaf names inside one residual block: LDM's ResBlock keeps its layers in nn.Sequentials.
UNET_RESNET_NAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                     ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
VAE_RESNET_NAMES = (("conv_shortcut", "nin_shortcut"),)
# LDM's VAE AttnBlock: 1x1 convolutions where diffusers' Attention has linear layers.
VAE_ATTENTION_NAMES = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


@dataclass(frozen=True)
class Rename:
    """Every tensor under `source` (a diffusers module path) goes under `target` (its LDM path)."""
    source: str
    target: str
    leaf_names: tuple[tuple[str, str], ...] = ()   # (diffusers, LDM) names of sub-modules inside it
    linear_to_conv: bool = False                   # store 2-d weights as 1x1 conv kernels


# -- the three models ----------------------------------------------------------------------
def unet_renames(config) -> list[Rename]:
    """The UNet's module paths, diffusers -> LDM, derived from its config."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"The original layout has one `layers_per_block` for every block, but this UNet has "
                         f"{layers!r}.")
    if config["mid_block_type"] != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"The original layout has a cross-attention middle block, but this UNet's is "
                         f"{config['mid_block_type']!r}.")
    for name in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type"):
        if config.get(name) is not None and (name, config[name]) != ("addition_embed_type", "text_time"):
            raise ValueError(f"Only SD 1.x/2.x- and SDXL-shaped UNets can be exported; this one has "
                             f"{name}={config[name]!r}.")

    resnet = UNET_RESNET_NAMES
    rules = [Rename("conv_in", "input_blocks.0.0"),
             Rename("time_embedding.linear_1", "time_embed.0"), Rename("time_embedding.linear_2", "time_embed.2"),
             Rename("conv_norm_out", "out.0"), Rename("conv_out", "out.2")]
    if config.get("addition_embed_type") == "text_time":      # SDXL: the pooled text and size ids
        rules += [Rename("add_embedding.linear_1", "label_emb.0.0"), Rename("add_embedding.linear_2", "label_emb.0.2")]

    # Down path: one input block per layer, then one for the downsampler (all blocks but the last).
    block_count = len(config["down_block_types"])
    index = 1
    for block, block_type in enumerate(config["down_block_types"]):
        for layer in range(layers):
            rules.append(Rename(f"down_blocks.{block}.resnets.{layer}", f"input_blocks.{index}.0", resnet))
            if "CrossAttn" in block_type:
                rules.append(Rename(f"down_blocks.{block}.attentions.{layer}", f"input_blocks.{index}.1"))
            index += 1
        if block < block_count - 1:
            rules.append(Rename(f"down_blocks.{block}.downsamplers.0.conv", f"input_blocks.{index}.0.op"))
            index += 1

    rules += [Rename("mid_block.resnets.0", "middle_block.0", resnet),
              Rename("mid_block.attentions.0", "middle_block.1"),
              Rename("mid_block.resnets.1", "middle_block.2", resnet)]

    # Up path: L + 1 layers per block (one more, for the skip from the downsampler); the upsampler
    # rides in the block's last output block, after its attention when it has one.
    index = 0
    for block, block_type in enumerate(config["up_block_types"]):
        has_attention = "CrossAttn" in block_type
        for layer in range(layers + 1):
            rules.append(Rename(f"up_blocks.{block}.resnets.{layer}", f"output_blocks.{index}.0", resnet))
            if has_attention:
                rules.append(Rename(f"up_blocks.{block}.attentions.{layer}", f"output_blocks.{index}.1"))
            if layer == layers and block < block_count - 1:
                slot = 2 if has_attention else 1
                rules.append(Rename(f"up_blocks.{block}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv"))
            index += 1
    return rules


def vae_renames(config) -> list[Rename]:
    """The VAE's module paths, diffusers -> LDM, derived from its config."""
    layers = config["layers_per_block"]
    block_count = len(config["down_block_types"])
    if len(config["up_block_types"]) != block_count:
        raise ValueError(f"The original VAE layout mirrors the encoder in the decoder, but this VAE has "
                         f"{block_count} down and {len(config['up_block_types'])} up blocks.")
    resnet = VAE_RESNET_NAMES
    rules = [Rename(name, name) for name in ("quant_conv", "post_quant_conv")    # SD 3's and Flux's VAEs have none
             if config.get(f"use_{name}", True)]
    for part in ("encoder", "decoder"):
        rules += [Rename(f"{part}.conv_in", f"{part}.conv_in"),
                  Rename(f"{part}.conv_norm_out", f"{part}.norm_out"),
                  Rename(f"{part}.conv_out", f"{part}.conv_out"),
                  Rename(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", resnet),
                  Rename(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", resnet)]
        if config.get("mid_block_add_attention", True):
            rules.append(Rename(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION_NAMES,
                                linear_to_conv=True))

    for block in range(block_count):
        for layer in range(layers):
            rules.append(Rename(f"encoder.down_blocks.{block}.resnets.{layer}", f"encoder.down.{block}.block.{layer}",
                                resnet))
        if block < block_count - 1:
            rules.append(Rename(f"encoder.down_blocks.{block}.downsamplers.0.conv",
                                f"encoder.down.{block}.downsample.conv"))

    # LDM numbers the decoder's levels by resolution (0 = full size), diffusers by order of use.
    for block in range(block_count):
        level = block_count - 1 - block
        for layer in range(layers + 1):
            rules.append(Rename(f"decoder.up_blocks.{block}.resnets.{layer}", f"decoder.up.{level}.block.{layer}",
                                resnet))
        if block < block_count - 1:
            rules.append(Rename(f"decoder.up_blocks.{block}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv"))
    return rules


def text_encoder_keys(text_encoder, prefix: str = TEXT_ENCODER_PREFIX) -> dict[str, torch.Tensor]:
    """The CLIP text encoder under `<prefix>text_model.*`, as SD 1.x (and SDXL's first encoder) files hold it.

    transformers >= 5.6 drops the `text_model.` level from `CLIPTextModel`'s own state dict; the
    files (and diffusers' reader) keep it.
    """
    if type(text_encoder).__name__ != "CLIPTextModel":
        raise ValueError(f"Only a CLIPTextModel text encoder can be exported, not {type(text_encoder).__name__}.")
    return {prefix + "text_model." + key.removeprefix("text_model."): tensor
            for key, tensor in text_encoder.state_dict().items()}


def open_clip_keys(text_encoder, prefix: str = SDXL_OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder (a CLIPTextModelWithProjection) in OpenCLIP's layout under `prefix`: what
    diffusers' `convert_open_clip_checkpoint` reads back."""
    if type(text_encoder).__name__ != "CLIPTextModelWithProjection":
        raise ValueError(f"SDXL's second text encoder is exported from a CLIPTextModelWithProjection, not "
                         f"{type(text_encoder).__name__}.")
    state = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.state_dict().items()}
    keys = {prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
            prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
            prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
            prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
            prefix + "text_projection": state.pop("text_projection.weight").T}
    state.pop("embeddings.position_ids", None)
    for layer in range(text_encoder.config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            keys[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{ours}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")])
            for old, new in OPEN_CLIP_LAYER_NAMES:
                keys[f"{theirs}{new}.{kind}"] = state.pop(f"{ours}{old}.{kind}")
    if state:
        raise ValueError(f"The second text encoder has tensors OpenCLIP's layout has no place for: "
                         f"{sorted(state)[:8]}.")
    return keys


def apply_renames(state_dict: dict[str, torch.Tensor], rules: Sequence[Rename], prefix: str,
                  what: str) -> dict[str, torch.Tensor]:
    """Rename every tensor by the one rule whose `source` module contains it; refuse leftovers either way."""
    by_source = {rule.source + ".": rule for rule in rules}
    unused = set(by_source)
    renamed: dict[str, torch.Tensor] = {}
    unclaimed: list[str] = []
    for key, tensor in state_dict.items():
        # The module path is some leading run of the key's dotted parts; try the longest first.
        parts = key.split(".")
        rule = next((by_source[head] for cut in range(len(parts) - 1, 0, -1)
                     if (head := ".".join(parts[:cut]) + ".") in by_source), None)
        if rule is None:
            unclaimed.append(key)
            continue
        unused.discard(rule.source + ".")
        leaf = key[len(rule.source) + 1:]
        for old, new in rule.leaf_names:
            if leaf.startswith(old + "."):
                leaf = new + leaf[len(old):]
                break
        if rule.linear_to_conv and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]   # (out, in) -> (out, in, 1, 1)
        renamed[f"{prefix}{rule.target}.{leaf}"] = tensor
    if unclaimed or unused:
        raise ValueError(f"The {what} does not have the SD layout this exporter writes: "
                         f"tensors with no place in it: {sorted(unclaimed)[:8]}; "
                         f"expected modules that are missing: {sorted(unused)[:8]}.")
    return renamed


def to_original_layout(pipeline) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoder(s) of a diffusers SD or SDXL pipeline, keyed as in an original checkpoint."""
    for name in ("unet", "vae", "text_encoder"):
        if getattr(pipeline, name, None) is None:
            raise ValueError(f"The pipeline has no `{name}`; a single-file SD checkpoint needs all three models.")
    unet, vae = pipeline.unet, pipeline.vae
    if getattr(pipeline, "text_encoder_2", None) is not None:      # SDXL
        widths = (pipeline.text_encoder.config.hidden_size, pipeline.text_encoder_2.config.hidden_size)
        if widths[0] == widths[1]:
            raise ValueError(f"Both text encoders are {widths[0]} wide; diffusers' single-file reader tells SDXL's "
                             "two apart by their widths (768 and 1280), so it would read the first into both.")
        text = {**text_encoder_keys(pipeline.text_encoder, SDXL_TEXT_ENCODER_PREFIX),
                **open_clip_keys(pipeline.text_encoder_2)}
    else:
        text = text_encoder_keys(pipeline.text_encoder)
    checkpoint = {**apply_renames(unet.state_dict(), unet_renames(unet.config), UNET_PREFIX, "UNet"),
                  **apply_renames(vae.state_dict(), vae_renames(vae.config), VAE_PREFIX, "VAE"), **text}
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in checkpoint.items()}


def save_single_file(pipeline_or_folder, path: str | Path) -> Path:
    """Write `pipeline_or_folder` (a pipeline, or a diffusers folder) to `path` as one .safetensors file.

    Written to `path.partial` and renamed, so a reader never sees half a file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"The single file is written as safetensors, so its name must end in .safetensors, "
                         f"but is {path.name!r}.")
    pipeline = pipeline_or_folder
    if isinstance(pipeline_or_folder, (str, Path)):
        import json

        from diffusers import DiffusionPipeline

        index = json.loads((Path(pipeline_or_folder) / "model_index.json").read_text())
        no_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        pipeline = DiffusionPipeline.from_pretrained(str(pipeline_or_folder), use_safetensors=True, **no_checker)
    if type(pipeline).__name__.startswith("StableDiffusion3"):      # the transformer and VAE, in Stability's layout
        from recipe.single_file_sd3 import to_sd3_layout
        tensors = to_sd3_layout(pipeline)
    elif type(pipeline).__name__.startswith("Flux2"):
        from recipe.single_file_flux2 import flux2_keys  # the transformer alone, in BFL's Flux 2 layout
        tensors = flux2_keys(pipeline.transformer)
    elif type(pipeline).__name__.startswith("Flux"):
        from recipe.single_file_flux import flux_keys  # the transformer alone, in BFL's layout
        tensors = flux_keys(pipeline.transformer)
    else:
        tensors = to_original_layout(pipeline)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path,
                        help="a diffusers SD 1.x/2.x, SDXL, SD 3.x, Flux.1 or Flux 2 folder (with model_index.json)")
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    if not (args.folder / "model_index.json").exists():
        parser.error(f"{args.folder} is not a diffusers model folder (it has no model_index.json).")
    path = save_single_file(args.folder, args.out)
    print(f"Wrote {path} ({path.stat().st_size / 2**20:.1f} MiB). Load it with "
          f"`--model {path} --model-config {args.folder}`.")
    return path


if __name__ == "__main__":
    main()
