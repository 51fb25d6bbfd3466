"""Export a diffusers Flux.1 transformer as one `.safetensors` file in Black Forest Labs' layout: the layout of
`flux1-dev.safetensors` and of the fine-tunes model sites carry, which hold the transformer alone (the text encoders
and VAE come from the base model's folder).

    python -m recipe.single_file FOLDER OUT.safetensors               # FOLDER: a diffusers Flux.1 folder
    python launch.py --model OUT.safetensors --model-config FOLDER    # load it back in the studio

The layout (diffusers on the right), what `diffusers.loaders.single_file_utils.
convert_flux_transformer_checkpoint_to_diffusers` reads back; that reader splits a single block's `linear1` at the
released width (3,072), so only a full-width transformer's file reads back (bench/flux_single_file.py):

    img_in, txt_in                       x_embedder, context_embedder
    time_in / vector_in / guidance_in    time_text_embed.timestep_embedder / text_embedder / guidance_embedder
    double_blocks.i.{img,txt}_mod.lin    transformer_blocks.i.norm1.linear / norm1_context.linear
    double_blocks.i.img_attn.qkv         attn.to_q, to_k, to_v (stacked); txt_attn.qkv: add_q_proj, add_k_proj, ...
    double_blocks.i.{img,txt}_attn.proj  attn.to_out.0 / attn.to_add_out
    double_blocks.i.{img,txt}_attn.norm.{query,key}_norm.scale    attn.norm_q, norm_k / norm_added_q, norm_added_k
    double_blocks.i.{img,txt}_mlp.0 / .2 ff.net.0.proj, ff.net.2 / ff_context.*
    single_blocks.i.linear1              single_transformer_blocks.i.attn.to_q, to_k, to_v and proj_mlp (stacked)
    single_blocks.i.linear2, modulation.lin, norm.{query,key}_norm.scale    proj_out, norm.linear, attn.norm_q / k
    final_layer.linear, final_layer.adaLN_modulation.1    proj_out, norm_out.linear ((shift, scale) there)

Every tensor must be claimed, so an architecture this mapping does not describe fails here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from recipe.single_file_sd3 import swap_halves

KINDS = ("weight", "bias")
EMBEDDERS = (("x_embedder", "img_in"), ("context_embedder", "txt_in"),
             ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
             ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
             ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
             ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
             ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
             ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
             ("proj_out", "final_layer.linear"))
DOUBLE = (("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
          ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
          ("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
          ("attn.norm_added_q", "txt_attn.norm.query_norm"), ("attn.norm_added_k", "txt_attn.norm.key_norm"),
          ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
          ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"))
SINGLE = (("norm.linear", "modulation.lin"), ("proj_out", "linear2"),
          ("attn.norm_q", "norm.query_norm"), ("attn.norm_k", "norm.key_norm"))
# RMSNorm's weight is BFL's `scale`
RMS_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def mover(state: dict, out: dict) -> Callable[[str, str], None]:
    """`move(ours, theirs)`: a module's weight and bias from `state` (diffusers' names) into `out` under BFL's name
    (an RMSNorm's weight as its `scale`). Flux 2's export (single_file_flux2.py) moves its tensors so too."""
    def move(ours: str, theirs: str) -> None:
        for kind in KINDS:
            if f"{ours}.{kind}" in state:
                name = "scale" if ours.endswith(RMS_NORMS) else kind
                out[f"{theirs}.{name}"] = state.pop(f"{ours}.{kind}")
    return move


def flux_keys(transformer) -> dict[str, torch.Tensor]:
    """A `FluxTransformer2DModel`'s tensors keyed as in Black Forest Labs' checkpoints."""
    if type(transformer).__name__ != "FluxTransformer2DModel":
        raise ValueError(f"Only a FluxTransformer2DModel is exported in Flux's layout, not "
                         f"{type(transformer).__name__}.")
    state = dict(transformer.state_dict())
    out: dict[str, torch.Tensor] = {}
    move = mover(state, out)

    def stack(names: Sequence[str], theirs: str) -> None:
        for kind in KINDS:
            out[f"{theirs}.{kind}"] = torch.cat([state.pop(f"{name}.{kind}") for name in names])

    for ours, theirs in EMBEDDERS:
        move(ours, theirs)
    for kind in KINDS:
        out[f"final_layer.adaLN_modulation.1.{kind}"] = swap_halves(state.pop(f"norm_out.linear.{kind}"))
    for i in range(transformer.config.num_layers):
        ours, theirs = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for mine, bfl in DOUBLE:
            move(ours + mine, theirs + bfl)
        stack([f"{ours}attn.to_{n}" for n in "qkv"], f"{theirs}img_attn.qkv")
        stack([f"{ours}attn.add_{n}_proj" for n in "qkv"], f"{theirs}txt_attn.qkv")
    for i in range(transformer.config.num_single_layers):
        ours, theirs = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for mine, bfl in SINGLE:
            move(ours + mine, theirs + bfl)
        stack([f"{ours}attn.to_{n}" for n in "qkv"] + [f"{ours}proj_mlp"], f"{theirs}linear1")
    if state:
        raise ValueError(f"The transformer has tensors Flux's layout has no place for: {sorted(state)[:8]}.")
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in out.items()}
