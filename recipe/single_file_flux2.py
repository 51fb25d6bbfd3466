"""Export a diffusers Flux 2 transformer ([dev] or [klein]) as one `.safetensors` file in Black Forest Labs' layout:
the layout of `flux2-dev.safetensors` and of the [klein] files, which hold the transformer alone (the text encoder
and VAE come from the base model's folder).

    python -m recipe.single_file FOLDER OUT.safetensors               # FOLDER: a diffusers Flux 2 folder
    python launch.py --model OUT.safetensors --model-config FOLDER    # load it back in the studio

The layout (diffusers on the right), what `diffusers.loaders.single_file_utils.
convert_flux2_transformer_checkpoint_to_diffusers` reads back at any width:

    img_in, txt_in, final_layer.linear   x_embedder, context_embedder, proj_out
    time_in / guidance_in .in_layer, .out_layer    time_guidance_embed.timestep_embedder / guidance_embedder
    double_stream_modulation_{img,txt}.lin, single_stream_modulation.lin    the same, .linear
    double_blocks.i.img_attn.qkv         attn.to_q, to_k, to_v (stacked); txt_attn.qkv: add_q_proj, add_k_proj, ...
    double_blocks.i.{img,txt}_attn.proj  attn.to_out.0 / attn.to_add_out
    double_blocks.i.{img,txt}_attn.norm.{query,key}_norm.scale    attn.norm_q, norm_k / norm_added_q, norm_added_k
    double_blocks.i.{img,txt}_mlp.0 / .2 ff.linear_in, ff.linear_out / ff_context.*
    single_blocks.i.linear1, linear2     attn.to_qkv_mlp_proj, attn.to_out (already fused in diffusers)
    single_blocks.i.norm.{query,key}_norm.scale    attn.norm_q, norm_k
    final_layer.adaLN_modulation.1       norm_out.linear ((shift, scale) there)

Every tensor must be claimed, so an architecture this mapping does not describe fails here.
"""

from __future__ import annotations

import torch

from recipe.single_file_flux import KINDS, mover
from recipe.single_file_sd3 import swap_halves

TOP = (("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear"),
       ("time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer"),
       ("time_guidance_embed.timestep_embedder.linear_2", "time_in.out_layer"),
       ("time_guidance_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
       ("time_guidance_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
       ("double_stream_modulation_img.linear", "double_stream_modulation_img.lin"),
       ("double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin"),
       ("single_stream_modulation.linear", "single_stream_modulation.lin"))
DOUBLE = (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
          ("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
          ("attn.norm_added_q", "txt_attn.norm.query_norm"), ("attn.norm_added_k", "txt_attn.norm.key_norm"),
          ("ff.linear_in", "img_mlp.0"), ("ff.linear_out", "img_mlp.2"),
          ("ff_context.linear_in", "txt_mlp.0"), ("ff_context.linear_out", "txt_mlp.2"))
SINGLE = (("attn.to_qkv_mlp_proj", "linear1"), ("attn.to_out", "linear2"),
          ("attn.norm_q", "norm.query_norm"), ("attn.norm_k", "norm.key_norm"))


def flux2_keys(transformer) -> dict[str, torch.Tensor]:
    """A `Flux2Transformer2DModel`'s tensors keyed as in Black Forest Labs' Flux 2 checkpoints."""
    if type(transformer).__name__ != "Flux2Transformer2DModel":
        raise ValueError(f"Only a Flux2Transformer2DModel is exported in Flux 2's layout, not "
                         f"{type(transformer).__name__}.")
    state = dict(transformer.state_dict())
    out: dict[str, torch.Tensor] = {}
    move = mover(state, out)

    for ours, theirs in TOP:
        move(ours, theirs)
    for kind in KINDS:
        if f"norm_out.linear.{kind}" in state:
            out[f"final_layer.adaLN_modulation.1.{kind}"] = swap_halves(state.pop(f"norm_out.linear.{kind}"))
    for i in range(transformer.config.num_layers):
        ours, theirs = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for mine, bfl in DOUBLE:
            move(ours + mine, theirs + bfl)
        for names, fused in ((("to_q", "to_k", "to_v"), "img_attn.qkv"),
                             (("add_q_proj", "add_k_proj", "add_v_proj"), "txt_attn.qkv")):
            for kind in KINDS:
                if f"{ours}attn.{names[0]}.{kind}" in state:
                    out[f"{theirs}{fused}.{kind}"] = torch.cat([state.pop(f"{ours}attn.{name}.{kind}")
                                                                for name in names])
    for i in range(transformer.config.num_single_layers):
        for mine, bfl in SINGLE:
            move(f"single_transformer_blocks.{i}.{mine}", f"single_blocks.{i}.{bfl}")
    if state:
        raise ValueError(f"The transformer has tensors Flux 2's layout has no place for: {sorted(state)[:8]}.")
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in out.items()}
