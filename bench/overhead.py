"""The studio's generate path against calling the diffusers pipeline directly.

Same model, prompt, seed, sampler and steps, in one process, interleaved runs; prints medians
and ratios (goals: studio / diffusers <= 1.03; previews every step / none <= 1.10).

    python -m bench.overhead                       # the embedded model (tiny model if absent)
    python -m bench.overhead --tiny sdxl           # a seeded tiny SDXL-layout model built in-process (or: sd)
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
from pipelines.generation.generator import Generator
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.models.sources import EMBEDDED_MODEL
from pipelines.tasks.txt2img import Txt2ImgRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model to use (default: the embedded model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--sampler", default="DPM++ 2M")
    parser.add_argument("--tiny", choices=["sd", "sdxl"], default=None,
                        help="a seeded tiny model of that family, built in-process (recipe/tiny.py)")
    args = parser.parse_args()

    manager = ModelManager(MemoryManager(device=args.device))
    if args.tiny or (args.model is None and not (EMBEDDED_MODEL / "model_index.json").exists()):
        from pipelines.models.sources import ModelSource
        from recipe.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
        folder = Path(tempfile.mkdtemp())
        build = build_tiny_sdxl_pipeline if args.tiny == "sdxl" else build_tiny_pipeline
        manager.adopt(build(folder), ModelSource("folder", str(folder), f"tiny-{args.tiny or 'sd'}"))
    else:
        manager.load(args.model or "embedded")
    model = manager.current
    pipeline = model.pipeline
    size = args.size or model.native_side
    generator = Generator(manager, outputs_dir=None)
    request = Txt2ImgRequest(prompt="grinning face", negative_prompt="", sampler=args.sampler, steps=args.steps,
                             guidance_scale=7.5, width=size, height=size, seed=1234)
    with_previews = replace(request, preview_every=1)

    def raw_diffusers():
        # on the same device thread the studio uses, so both run with the same OpenMP thread team
        manager.worker.call(raw_call)

    def raw_call():
        pipeline.scheduler = make_scheduler(args.sampler, model.scheduler_config)
        pipeline(prompt="grinning face", num_inference_steps=args.steps, guidance_scale=7.5, width=size,
                 height=size, generator=[torch.Generator("cpu").manual_seed(1234)], output_type="pil")

    candidates = {"diffusers": raw_diffusers, "studio": lambda: generator.generate(request),
                  "studio+previews": lambda: generator.generate(with_previews)}
    median = interleaved_medians(candidates, args.runs)
    print(f"model {model.name} · {size}x{size} · {args.steps} steps · {args.sampler} · device "
          f"{manager.memory.device} · {args.runs} interleaved runs each")
    for name, value in median.items():
        print(f"  {name:16s} median {value * 1000:8.1f} ms")
    print(f"studio / diffusers          = {median['studio'] / median['diffusers']:.3f}  (goal <= 1.03)")
    print(f"previews every step / none  = {median['studio+previews'] / median['studio']:.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
