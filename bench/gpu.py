"""The studio against plain diffusers on random-weight pipelines of real shapes, per memory mode: images per
second and peak VRAM, side by side in one run, as ratios.

For each family and mode the studio loads the pipeline, places it in the mode (pipelines/models/memory.py), and
generates; "diffusers" is the same pipeline, so placed, called directly with the same prompt, seed and steps.
The ratio is the studio's own cost on top of diffusers' (goal: <= 1.03).

    python -m bench.gpu                     # on a GPU: SD 1.5-shaped at 512², SDXL-shaped at 1024², fp16
    python -m bench.gpu --family flux       # Flux.1 dev-shaped (12B transformer) at 1024², bf16, where it fits
    python -m bench.gpu --tiny              # anywhere: the tiny SD and SDXL at 64² (CI keeps this running)
    python -m bench.gpu --family sdxl --modes high,low --steps 20

Random weights make pictures of noise, but the same work as trained ones. The text encoders keep their real
widths with two layers each (their cost is a small part of an image). Flux runs at CFG 1 with its distilled
guidance 3.5 on both sides (pipelines/core/transformers.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODES = ("high", "balanced", "low", "sequential")


def real_sd15():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)     # SD 1.5's shape
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=2, num_attention_heads=12))
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False), 512


def real_sdxl():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(      # SDXL base's shape
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=1024, force_upcast=False)
    small = dict(vocab_size=len(tokenizer), num_hidden_layers=2)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, **small))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                        num_attention_heads=20, projection_dim=1280, **small))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler()), 1024


def real_flux():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = _tokenizer()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)       # 12B parameters: built in bf16, as they run
    try:
        transformer = FluxTransformer2DModel(guidance_embeds=True)      # Flux.1 dev's shape
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=16,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.1159, scaling_factor=0.3611)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=2, num_attention_heads=12))
        text_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240,
                                         num_layers=2, num_heads=64))
    finally:
        torch.set_default_dtype(default)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tokenizer, text_encoder_2=text_2,
                        tokenizer_2=tokenizer, transformer=transformer), 1024


def _tokenizer():
    from recipe.architecture import build_tokenizer
    from recipe.tiny import PHRASES

    tokenizer = build_tokenizer(PHRASES, Path(tempfile.mkdtemp()), merges=200)
    tokenizer.model_max_length = 77
    return tokenizer


def tiny(family: str):
    from recipe.tiny import build_tiny_flux_pipeline, build_tiny_pipeline, build_tiny_sdxl_pipeline

    build = {"sdxl": build_tiny_sdxl_pipeline, "flux": build_tiny_flux_pipeline}.get(family, build_tiny_pipeline)
    return build(Path(tempfile.mkdtemp())), 64


def measure(family: str, pipeline, size: int, modes: list[str], steps: int, runs: int, device: str) -> list[dict]:
    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from pipelines.models.sources import ModelSource
    from pipelines.tasks.txt2img import Txt2ImgRequest

    models = ModelManager(MemoryManager(device=device))
    models.adopt(pipeline, ModelSource("folder", tempfile.mkdtemp(), f"random-{family}"))
    generator = Generator(models, outputs_dir=None)
    flux = family == "flux"      # CFG 1 and the distilled guidance on both sides
    request = Txt2ImgRequest(prompt="red apple", sampler="Euler", steps=steps, width=size, height=size, seed=1,
                             guidance_scale=1.0 if flux else 7.0)
    rows = []
    for mode in modes:
        if mode != "cpu":          # on a CPU the pipeline is simply there
            models.set_memory_mode(mode)

        def studio():
            generator.generate(request)

        def diffusers():
            models.worker.call(lambda: pipeline(prompt="red apple", num_inference_steps=steps,
                                                guidance_scale=3.5 if flux else 7.0, width=size, height=size,
                                                generator=torch.Generator().manual_seed(1)))
        timing = {name: _median_and_peak(function, runs) for name, function in
                  (("studio", studio), ("diffusers", diffusers))}
        rows.append({"family": family, "size": size, "mode": mode}
                    | {f"{name}_{key}": value for name, measured in timing.items() for key, value in measured.items()})
    models.unload()
    return rows


def _median_and_peak(function, runs: int) -> dict:
    function()                                    # warm-up
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    return {"s": statistics.median(seconds), "peak_gib": peak}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny models at 64² (CPU: CI runs this)")
    parser.add_argument("--family", action="append", choices=["sd15", "sdxl", "flux"],
                        help="default: sd15 and sdxl (and flux on a card of 40 GB or more; tiny: all three)")
    parser.add_argument("--modes", default=None, help=f"comma-separated, of {', '.join(MODES)} (default: all on a "
                                                      "GPU; on a CPU the CPU alone)")
    parser.add_argument("--steps", type=int, default=None, help="default: 20 (tiny: 4)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = args.modes.split(",") if args.modes else (list(MODES) if device == "cuda" else ["cpu"])
    steps = args.steps or (4 if args.tiny else 20)
    rows = []
    big_card = device == "cuda" and torch.cuda.get_device_properties(0).total_memory >= 40 * 2 ** 30
    for family in args.family or ["sd15", "sdxl", *(["flux"] if args.tiny or big_card else [])]:
        if args.tiny:
            pipeline, size = tiny(family)
        else:
            with torch.device("cpu"):
                pipeline, size = {"sd15": real_sd15, "sdxl": real_sdxl, "flux": real_flux}[family]()
            if device == "cuda" and family != "flux":
                pipeline = pipeline.to(torch.float16)
        pipeline.set_progress_bar_config(disable=True)
        rows += measure(family, pipeline, size, modes, steps, args.runs, device)
    print(f"{device} · {steps} steps · median of {args.runs} runs · studio / diffusers (goal <= 1.03)")
    print(f"{'family':<6} {'size':>5} {'mode':<10} {'studio s':>9} {'diffusers s':>12} {'ratio':>6} "
          f"{'studio GiB':>11} {'diffusers GiB':>14}")
    for row in rows:
        print(f"{row['family']:<6} {row['size']:>5} {row['mode']:<10} {row['studio_s']:9.3f} "
              f"{row['diffusers_s']:12.3f} {row['studio_s'] / row['diffusers_s']:6.3f} {row['studio_peak_gib']:11.2f} "
              f"{row['diffusers_peak_gib']:14.2f}")
    return rows


if __name__ == "__main__":
    main()
