"""Fast (the embedded model's LCM-LoRA, LCM sampler, CFG 1) against the studio's 25-step default, side by side.

One process, interleaved runs, the studio's own Generator for every row; prints medians and ratios
(goal: 4 steps <= 0.15 × 25 steps). The diffusers row runs the same LCM-LoRA at 4 steps through plain
diffusers (`load_lora_weights`, LCMScheduler, the LoRA left unmerged, as diffusers runs it), for scale.

    python -m bench.fast                 # the embedded model on this machine's CPU
    python -m bench.fast --runs 15 --threads 1
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.timing import interleaved_medians
from pipelines.generation.generator import Generator
from pipelines.lora.adapters import FOLDER_WEIGHTS, SHIPPED_LORAS
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.models.sources import EMBEDDED_MODEL
from pipelines.tasks.txt2img import Txt2ImgRequest

PROMPT = "grinning face"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manager = ModelManager(MemoryManager(device="cpu"))
    manager.load("embedded")
    generator = Generator(manager, outputs_dir=None)
    request = lambda **settings: Txt2ImgRequest(prompt=PROMPT, seed=1234, preview_every=0, **settings)  # noqa: E731

    from diffusers import LCMScheduler, StableDiffusionPipeline
    plain = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL)
    plain.load_lora_weights(str(SHIPPED_LORAS["emoji-ldm-lcm"]), weight_name=FOLDER_WEIGHTS)
    plain.scheduler = LCMScheduler.from_config(plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)

    def diffusers_fast():
        manager.worker.call(lambda: plain(PROMPT, num_inference_steps=4, guidance_scale=1.0,
                                          generator=torch.Generator().manual_seed(1234)))

    rows = {"studio, 25 steps (DPM++ 2M, CFG 7.5)": lambda: generator.generate(request()),
            "studio, Fast 4 steps": lambda: generator.generate(request(steps=4, fast=True)),
            "studio, Fast 2 steps": lambda: generator.generate(request(steps=2, fast=True)),
            "diffusers, LCM-LoRA 4 steps": diffusers_fast}
    median = interleaved_medians(rows, args.runs)
    print(f"embedded model · 64x64 · CPU, {torch.get_num_threads()} thread(s) · {args.runs} interleaved runs each")
    for name, value in median.items():
        print(f"  {name:38s} median {value * 1000:7.1f} ms")
    base = median["studio, 25 steps (DPM++ 2M, CFG 7.5)"]
    print(f"Fast 4 steps / 25 steps          = {median['studio, Fast 4 steps'] / base:.3f}  (goal <= 0.15)")
    print(f"Fast 2 steps / 25 steps          = {median['studio, Fast 2 steps'] / base:.3f}")
    print(f"studio / diffusers, LCM 4 steps  = {median['studio, Fast 4 steps'] / median['diffusers, LCM-LoRA 4 steps']:.3f}")


if __name__ == "__main__":
    main()
