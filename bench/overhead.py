"""The studio's generate path against calling the diffusers pipeline directly.

Same model, prompt, seed, sampler and steps, in one process, interleaved runs; prints medians
and ratios (goals: studio / diffusers <= 1.03; previews every step / none <= 1.10).

    python -m bench.overhead                       # the embedded model (tiny model if absent)
    python -m bench.overhead --tiny sdxl           # a seeded tiny SDXL-layout model built in-process
    python -m bench.overhead --tiny flux           # ... or sd, sd3, pixart, sana (Euler, Flux at CFG 1)
    python -m bench.overhead --model PATH --size 512 --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from bench.timing import interleaved_medians
from pipelines.core.samplers import make_scheduler
from pipelines.core.transformers import is_flow, is_transformer, make_transformer_scheduler
from pipelines.generation.generator import Generator
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.models.sources import EMBEDDED_MODEL
from pipelines.tasks.txt2img import Txt2ImgRequest

TINY = {"sd": "build_tiny_pipeline", "sdxl": "build_tiny_sdxl_pipeline", "sd3": "build_tiny_sd3_pipeline",
        "flux": "build_tiny_flux_pipeline", "pixart": "build_tiny_pixart_pipeline", "sana": "build_tiny_sana_pipeline"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model to use (default: the embedded model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--sampler", default=None, help="default: DPM++ 2M, Euler for flow-matching models")
    parser.add_argument("--tiny", choices=list(TINY), default=None,
                        help="a seeded tiny model of that family, built in-process (recipe/tiny.py)")
    args = parser.parse_args()

    manager = ModelManager(MemoryManager(device=args.device))
    if args.tiny or (args.model is None and not (EMBEDDED_MODEL / "model_index.json").exists()):
        import recipe.tiny
        from pipelines.models.sources import ModelSource
        folder = Path(tempfile.mkdtemp())
        build = getattr(recipe.tiny, TINY[args.tiny or "sd"])
        manager.adopt(build(folder), ModelSource("folder", str(folder), f"tiny-{args.tiny or 'sd'}"))
    else:
        manager.load(args.model or "embedded")
    model = manager.current
    pipeline = model.pipeline
    size = args.size or max(64, min(model.native_side or 512, 512))
    transformer = is_transformer(pipeline)
    sampler = args.sampler or ("Euler" if is_flow(model.scheduler_config) else "DPM++ 2M")
    # the family's own call: Flux at CFG 1 with its distilled guidance, PixArt and Sana at the size asked for
    name = type(pipeline).__name__
    cfg = 1.0 if name.startswith("Flux") else 7.5
    own = {"FluxPipeline": {"guidance_scale": 3.5, "true_cfg_scale": 1.0, "negative_prompt": ""},
           "PixArtSigmaPipeline": {"use_resolution_binning": False, "clean_caption": False, "guidance_scale": cfg},
           "SanaPipeline": {"use_resolution_binning": False, "guidance_scale": cfg}}.get(name, {"guidance_scale": cfg})
    generator = Generator(manager, outputs_dir=None)
    request = Txt2ImgRequest(prompt="grinning face", negative_prompt="", sampler=sampler, steps=args.steps,
                             guidance_scale=cfg, width=size, height=size, seed=1234)
    with_previews = replace(request, preview_every=1)

    def raw_diffusers():
        # on the same device thread the studio uses, so both run with the same OpenMP thread team
        manager.worker.call(raw_call)

    def raw_call():
        make = make_transformer_scheduler if transformer else make_scheduler
        pipeline.scheduler = make(sampler, model.scheduler_config)
        pipeline(prompt="grinning face", num_inference_steps=args.steps, width=size, height=size,
                 generator=[torch.Generator("cpu").manual_seed(1234)], output_type="pil", **own)

    candidates = {"diffusers": raw_diffusers, "studio": lambda: generator.generate(request),
                  "studio+previews": lambda: generator.generate(with_previews)}
    median = interleaved_medians(candidates, args.runs)
    print(f"model {model.name} · {size}x{size} · {args.steps} steps · {sampler} · device "
          f"{manager.memory.device} · {args.runs} interleaved runs each")
    for name, value in median.items():
        print(f"  {name:16s} median {value * 1000:8.1f} ms")
    print(f"studio / diffusers          = {median['studio'] / median['diffusers']:.3f}  (goal <= 1.03)")
    print(f"previews every step / none  = {median['studio+previews'] / median['studio']:.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
