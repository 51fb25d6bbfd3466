"""A seeded tiny Stable Diffusion pipeline with random weights, built in-process.

Used by the tests and benchmarks: the SD 1.x layout (VAE, CLIP text encoder with our own BPE
tokenizer, cross-attention UNet) at toy size, so every code path runs in seconds with no download.
"""

from __future__ import annotations

from pathlib import Path

import torch

PHRASES = ["red apple", "green apple", "a cat", "a dog", "smiling face", "blue sky", "noto style",
           "twemoji style", "a photo of an astronaut riding a horse", "blurry", "low quality"]


def build_tiny_pipeline(folder: Path, seed: int = 0):
    """A 64x64 SD-layout pipeline (VAE f=4, 2-layer CLIP, small UNet) with seeded random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from recipe.architecture import build_tokenizer

    tokenizer = build_tokenizer(PHRASES, folder / "tokenizer_src", merges=200)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_controlnet(unet, seed: int = 0):
    """A ControlNet for the tiny pipeline (its control image read at the VAE's 1/4 scale), with its
    zero-initialised output convolutions given seeded random weights, so that it visibly steers."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32))
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.3)
    return controlnet


def build_tiny_sdxl_pipeline(folder: Path, seed: int = 0, width_2: int = 32):
    """A 64x64 SDXL-layout pipeline: two CLIP text encoders (the second with a projection: SDXL's pooled
    embedding), a UNet with `text_time` added conditioning (pooled text + size and crop ids), our BPE tokenizer
    for both; seeded random weights, as diffusers' own SDXL tests build theirs (`get_dummy_components`).
    `width_2`: the second encoder's width (the real ones differ, 768 and 1280, which is how diffusers' single-file
    reader tells them apart)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from recipe.architecture import build_tokenizer

    tokenizer = build_tokenizer(PHRASES, folder / "tokenizer_src", merges=200)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=8 * 6 + 32,   # six size/crop ids of 8 each, and the pooled text
        cross_attention_dim=32 + width_2, norm_num_groups=8)   # both encoders' states, concatenated
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=64)
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config | {"hidden_size": width_2},
                                                                projection_dim=32))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_playground_pipeline(folder: Path, seed: int = 0):
    """The tiny SDXL in Playground v2.5's layout: its UNet trained in the EDM formulation (diffusers'
    EDMDPMSolverMultistepScheduler with Playground's settings: σ from 0.002 to 80, σ_data 0.5) and its VAE's latents
    normalised per channel (`latents_mean`, `latents_std` and scaling factor 0.5: Playground's values)."""
    from diffusers import AutoencoderKL, EDMDPMSolverMultistepScheduler

    pipeline = build_tiny_sdxl_pipeline(folder, seed)
    pipeline.scheduler = EDMDPMSolverMultistepScheduler(
        sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, solver_order=2, prediction_type="epsilon",
        algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero", lower_order_final=True)
    vae = AutoencoderKL.from_config(pipeline.vae.config, scaling_factor=0.5,
                                    latents_mean=[-1.6574, 1.886, -1.383, 2.5155],
                                    latents_std=[8.4927, 5.9022, 6.5498, 5.2299])
    vae.load_state_dict(pipeline.vae.state_dict())
    pipeline.vae = vae
    return pipeline


def _near_deterministic(vae):
    """A trained VAE's posterior is nearly a point (the embedded one's std is about 0.007): random weights give a
    wide one, whose samples (diffusers' image-to-image pipelines sample it) would hide where a run starts."""
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels:] = -20.0
    return vae


def _t5(tokenizer):
    """A tiny T5 encoder reading the tiny BPE tokenizer's ids (the transformer families' long-text encoder)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=0))


def _clip_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **extra)


def build_tiny_flux_pipeline(folder: Path, seed: int = 0, guidance_embeds: bool = True):
    """A Flux-layout pipeline (a flow-matching diffusion transformer, CLIP + T5 text encoders, 2×2-packed latents),
    seeded random weights at diffusers' own test size (`FluxPipelineFastTests.get_dummy_components`); the tiny
    BPE tokenizer serves both encoders, since T5's would come from the hub. `guidance_embeds=False`: Flux.1 [schnell]'s
    layout (step-distilled, no distilled-guidance input)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from recipe.architecture import build_tokenizer

    tokenizer = build_tokenizer(PHRASES, folder / "tokenizer_src", merges=200)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipeline = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_near_deterministic(vae),
                            text_encoder=CLIPTextModel(_clip_config(tokenizer)), tokenizer=tokenizer,
                            text_encoder_2=_t5(tokenizer), tokenizer_2=tokenizer, transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_sd3_pipeline(folder: Path, seed: int = 0, sd35: bool = False):
    """An SD 3-layout pipeline (MMDiT with flow matching; two CLIP encoders with projections and T5), seeded random
    weights at diffusers' own test size (`StableDiffusion3PipelineFastTests.get_dummy_components`). `sd35`: SD 3.5
    Medium's layout (RMS-normed q and k, a second self-attention in the first block)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from recipe.architecture import build_tokenizer

    tokenizer = build_tokenizer(PHRASES, folder / "tokenizer_src", merges=200)
    torch.manual_seed(seed)
    # 16 latent channels, as SD 3's VAE has (its inpainting pipeline checks); 2×2 patches, as SD 3's transformer reads
    transformer = SD3Transformer2DModel(sample_size=64, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=16,
                                        **({"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}))
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=16, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    clip = _clip_config(tokenizer, projection_dim=32)
    pipeline = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_near_deterministic(vae), transformer=transformer,
        text_encoder=CLIPTextModelWithProjection(clip), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=tokenizer,
        text_encoder_3=_t5(tokenizer), tokenizer_3=tokenizer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_pixart_pipeline(folder: Path, seed: int = 0):
    """A PixArt-Σ-layout pipeline (a DiT with adaLN-single, T5 text encoder, learned variance: 8 output channels;
    ε-prediction on a DDPM schedule), seeded random weights at about diffusers' own test size
    (`PixArtSigmaPipelineFastTests.get_dummy_components`)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from recipe.architecture import build_tokenizer

    tokenizer = build_tokenizer(PHRASES, folder / "tokenizer_src", merges=200)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, sample_size=64)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    pipeline = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=_t5(tokenizer), vae=_near_deterministic(vae),
                                   transformer=transformer, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_sana_pipeline(folder: Path, seed: int = 0):
    """A Sana-layout pipeline (a linear-attention DiT with flow matching, a Gemma 2 text encoder, the deep
    compression autoencoder DC-AE), seeded random weights at diffusers' own test size
    (`SanaPipelineFastTests.get_dummy_components`) but two blocks (a ControlNet's residuals join from the second);
    the tiny BPE tokenizer stands in for Gemma's."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from recipe.architecture import build_tokenizer

    tokenizer = build_tokenizer(PHRASES, folder / "tokenizer_src", merges=200)
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407)
    text_encoder = Gemma2Model(Gemma2Config(
        head_dim=16, hidden_size=8, initializer_range=0.02, intermediate_size=64, max_position_embeddings=8192,
        num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id, attn_implementation="eager"))
    pipeline = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_transformer_controlnet(pipeline, seed: int = 0):
    """A ControlNet for the tiny Flux, SD 3 or Sana pipeline (diffusers' FluxControlNetModel / SD3ControlNetModel /
    SanaControlNetModel, one block, at the transformer's widths), its zero-initialised input and output projections
    given seeded random weights, so that it visibly steers."""
    from diffusers import FluxControlNetModel, SanaControlNetModel, SD3ControlNetModel

    torch.manual_seed(seed)
    config = pipeline.transformer.config
    if type(pipeline).__name__.startswith("Sana"):
        controlnet = SanaControlNetModel(
            in_channels=config.in_channels, out_channels=config.out_channels, num_layers=1,
            num_attention_heads=config.num_attention_heads, attention_head_dim=config.attention_head_dim,
            num_cross_attention_heads=config.num_cross_attention_heads,
            cross_attention_head_dim=config.cross_attention_head_dim, cross_attention_dim=config.cross_attention_dim,
            caption_channels=config.caption_channels, sample_size=config.sample_size, patch_size=config.patch_size)
        zeroed = [controlnet.input_block, *controlnet.controlnet_blocks]
    elif type(pipeline).__name__.startswith("Flux"):
        controlnet = FluxControlNetModel(
            patch_size=1, in_channels=config.in_channels, num_layers=1, num_single_layers=1,
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads,
            joint_attention_dim=config.joint_attention_dim, pooled_projection_dim=config.pooled_projection_dim,
            guidance_embeds=config.guidance_embeds, axes_dims_rope=list(config.axes_dims_rope))
        zeroed = [controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks]
    else:
        controlnet = SD3ControlNetModel(
            sample_size=config.sample_size, patch_size=config.patch_size, in_channels=config.in_channels, num_layers=1,
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads,
            joint_attention_dim=config.joint_attention_dim, caption_projection_dim=config.caption_projection_dim,
            pooled_projection_dim=config.pooled_projection_dim, out_channels=config.out_channels)
        zeroed = [controlnet.pos_embed_input.proj, *controlnet.controlnet_blocks]
    with torch.no_grad():
        for layer in zeroed:
            layer.weight.normal_(0, 0.3)
    return controlnet


def build_tiny_pixart_alpha_pipeline(folder: Path, seed: int = 0):
    """The tiny PixArt-Σ's components in PixArt-α's pipeline (the same DiT and T5; α's call differs, e.g. it sets
    its scheduler's begin index itself)."""
    from diffusers import PixArtAlphaPipeline

    pipeline = PixArtAlphaPipeline(**build_tiny_pixart_pipeline(folder, seed).components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# A chat template as Qwen's and Mistral's tokenizers carry one (Flux 2's pipelines format the prompt as a chat turn):
# each message's text, its content a string or a list of {"type": "text"} parts
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
                 "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
                 "{% endif %}{% endfor %}{% endif %} {% endfor %}")


def _flux2_parts(tokenizer, seed: int, guidance_embeds: bool):
    """Flux 2's transformer and VAE (its latents batch-normalised and 2×2-patchified) at diffusers' own test size
    (`Flux2KleinPipelineFastTests.get_dummy_components`)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=guidance_embeds)
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                             latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():        # a trained VAE's batch-norm statistics, not the fresh ones (0 and 1)
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return transformer, _near_deterministic(vae)


def build_tiny_flux2_klein_pipeline(folder: Path, seed: int = 0, distilled: bool = False):
    """A Flux 2 [klein]-layout pipeline (Flux 2's transformer with a Qwen 3 text encoder, CFG as two passes; a
    `distilled` one takes none), seeded random weights; the tiny BPE tokenizer with a chat template stands in for
    Qwen's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from recipe.architecture import build_tokenizer

    tokenizer = build_tokenizer(PHRASES, folder / "tokenizer_src", merges=200)
    transformer, vae = _flux2_parts(tokenizer, seed, guidance_embeds=False)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        intermediate_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id))
    pipeline = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                                  tokenizer=tokenizer, transformer=transformer, is_distilled=distilled)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_flux2_pipeline(folder: Path, seed: int = 0):
    """A Flux 2 [dev]-layout pipeline (Flux 2's transformer taking its guidance as an input, a Mistral 3 text
    encoder behind a Pixtral processor), seeded random weights at diffusers' own test size."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor, PixtralProcessor

    from recipe.architecture import build_tokenizer

    tokenizer = build_tokenizer(PHRASES, folder / "tokenizer_src", merges=200)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]})  # Pixtral's
    transformer, vae = _flux2_parts(tokenizer, seed, guidance_embeds=True)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": 16,
                     "intermediate_size": 37, "max_position_embeddings": 512, "num_attention_heads": 4,
                     "num_hidden_layers": 1, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
                     "rope_theta": 1000000000.0, "sliding_window": None, **ids},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "intermediate_size": 37, "image_size": 30, "patch_size": 6, "num_channels": 3},
        image_seq_length=4, vision_feature_layer=-1, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        **ids))
    processor = PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tokenizer, patch_size=6,
                                 chat_template=CHAT_TEMPLATE)
    pipeline = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=processor, transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
