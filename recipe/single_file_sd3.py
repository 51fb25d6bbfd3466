"""Export a diffusers SD 3.x pipeline's MMDiT (and VAE) as one `.safetensors` file in Stability's layout: the kind
of file model sites distribute for SD 3 and SD 3.5 fine-tunes, which hold the transformer (often the VAE too) and
leave the text encoders to the base model's folder.

    python -m recipe.single_file FOLDER OUT.safetensors              # an SD 3.x folder writes this layout
    python launch.py --model OUT.safetensors --model-config FOLDER   # load it back in the studio

The layout (diffusers on the right), what `diffusers.loaders.single_file_utils.
convert_sd3_transformer_checkpoint_to_diffusers` reads back:

    model.diffusion_model.
        pos_embed, x_embedder.proj                 pos_embed.pos_embed, pos_embed.proj
        t_embedder.mlp.0 / .2                      time_text_embed.timestep_embedder.linear_1 / _2
        y_embedder.mlp.0 / .2                      time_text_embed.text_embedder.linear_1 / _2
        context_embedder                           context_embedder
        joint_blocks.i.x_block.attn.qkv            transformer_blocks.i.attn.to_q, to_k, to_v (stacked)
        joint_blocks.i.context_block.attn.qkv      transformer_blocks.i.attn.add_q_proj, add_k_proj, add_v_proj
        joint_blocks.i.{x,context}_block.attn.proj attn.to_out.0 / attn.to_add_out
        joint_blocks.i.{x,context}_block.attn.ln_q / ln_k     attn.norm_q / norm_k, norm_added_q / norm_added_k
        joint_blocks.i.x_block.attn2.*             attn2.* (SD 3.5's dual-attention blocks)
        joint_blocks.i.{x,context}_block.adaLN_modulation.1   norm1.linear / norm1_context.linear
        joint_blocks.i.{x,context}_block.mlp.fc1 / fc2        ff.net.0.proj, ff.net.2 / ff_context.*
        final_layer.linear, final_layer.adaLN_modulation.1    proj_out, norm_out.linear
    first_stage_model.                             the VAE, as in SD files (single_file.vae_renames)

The last block's context stream and the final layer keep (shift, scale) where diffusers keeps (scale, shift).
Every transformer tensor must be claimed, so an architecture this mapping does not describe fails here.
"""

from __future__ import annotations

import torch

from recipe.single_file import UNET_PREFIX, VAE_PREFIX, apply_renames, vae_renames

LINEAR = ("weight", "bias")


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale): the original AdaLayerNormContinuous's order against diffusers'."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def mmdit_keys(transformer, prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """An `SD3Transformer2DModel`'s tensors keyed as in Stability's SD 3 checkpoints, under `prefix`."""
    if type(transformer).__name__ != "SD3Transformer2DModel":
        raise ValueError(f"Only an SD3Transformer2DModel is exported in SD 3's layout, not "
                         f"{type(transformer).__name__}.")
    state = dict(transformer.state_dict())
    out: dict[str, torch.Tensor] = {}

    def move(ours: str, theirs: str, *, swap: bool = False) -> None:
        for kind in LINEAR:
            if f"{ours}.{kind}" in state:
                tensor = state.pop(f"{ours}.{kind}")
                out[f"{theirs}.{kind}"] = swap_halves(tensor) if swap else tensor

    def stack(names: tuple[str, ...], theirs: str) -> None:
        for kind in LINEAR:
            out[f"{theirs}.{kind}"] = torch.cat([state.pop(f"{name}.{kind}") for name in names])

    out["pos_embed"] = state.pop("pos_embed.pos_embed")
    move("pos_embed.proj", "x_embedder.proj")
    move("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    move("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    move("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    move("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    move("context_embedder", "context_embedder")
    last = transformer.config.num_layers - 1
    for i in range(transformer.config.num_layers):
        ours, x, context = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        stack(tuple(f"{ours}attn.to_{n}" for n in "qkv"), f"{x}attn.qkv")
        stack(tuple(f"{ours}attn.add_{n}_proj" for n in "qkv"), f"{context}attn.qkv")
        if f"{ours}attn2.to_q.weight" in state:                      # SD 3.5's dual-attention blocks
            stack(tuple(f"{ours}attn2.to_{n}" for n in "qkv"), f"{x}attn2.qkv")
        for norm, theirs in (("attn.norm_q", f"{x}attn.ln_q"), ("attn.norm_k", f"{x}attn.ln_k"),
                             ("attn.norm_added_q", f"{context}attn.ln_q"), ("attn.norm_added_k", f"{context}attn.ln_k"),
                             ("attn2.norm_q", f"{x}attn2.ln_q"), ("attn2.norm_k", f"{x}attn2.ln_k")):
            move(ours + norm, theirs)
        move(f"{ours}attn.to_out.0", f"{x}attn.proj")
        move(f"{ours}attn.to_add_out", f"{context}attn.proj")
        move(f"{ours}attn2.to_out.0", f"{x}attn2.proj")
        move(f"{ours}norm1.linear", f"{x}adaLN_modulation.1")
        move(f"{ours}norm1_context.linear", f"{context}adaLN_modulation.1", swap=i == last)
        move(f"{ours}ff.net.0.proj", f"{x}mlp.fc1")
        move(f"{ours}ff.net.2", f"{x}mlp.fc2")
        move(f"{ours}ff_context.net.0.proj", f"{context}mlp.fc1")
        move(f"{ours}ff_context.net.2", f"{context}mlp.fc2")
    move("proj_out", "final_layer.linear")
    move("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    if state:
        raise ValueError(f"The transformer has tensors SD 3's layout has no place for: {sorted(state)[:8]}.")
    return {prefix + key: tensor for key, tensor in out.items()}


def to_sd3_layout(pipeline, *, vae: bool = True) -> dict[str, torch.Tensor]:
    """An SD 3.x pipeline's transformer (and, with `vae`, its VAE) keyed as in Stability's single files. The text
    encoders stay out, as in the files model sites carry: the loader takes them from `--model-config`."""
    checkpoint = mmdit_keys(pipeline.transformer)
    if vae:
        checkpoint.update(apply_renames(pipeline.vae.state_dict(), vae_renames(pipeline.vae.config), VAE_PREFIX,
                                        "VAE"))
    return checkpoint
