"""The studio's inpainting path against diffusers' own inpainting pipeline, same inputs and seed.

Both on the embedded model (shared weights), on the device worker's thread, 64x64, 25 steps, CFG 7.5,
strength 0.75, a square mask; interleaved runs, medians and their ratio (goal: studio / diffusers <= 1.05).
The studio's path adds the latent-grid mask, the paste-back and, for "only masked", the crop.

    python -m bench.inpaint
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from bench.timing import interleaved_medians
from pipelines.generation.generator import Generator
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.tasks.inpaint import InpaintRequest
from pipelines.tasks.txt2img import Txt2ImgRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    models = ModelManager(MemoryManager(device="cpu"))
    models.load("embedded")
    generator = Generator(models, outputs_dir=None)
    image = generator.generate(Txt2ImgRequest(prompt="red apple", seed=1)).images[0].image
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    mask = Image.fromarray(mask)
    request = InpaintRequest(prompt="green apple", init_image=image, mask=mask, strength=0.75, steps=args.steps,
                             sampler="DPM++ 2M", seed=7)
    diffusers_pipeline = models.pipeline("inpaint")      # AutoPipelineForInpainting.from_pipe(base)

    def diffusers_inpaint():
        diffusers_pipeline.scheduler = models.pipeline("txt2img").scheduler.from_config(
            models.current.scheduler_config)
        return diffusers_pipeline("green apple", image=image, mask_image=mask, strength=0.75,
                                  num_inference_steps=args.steps, guidance_scale=7.5,
                                  generator=torch.Generator("cpu").manual_seed(7)).images[0]

    medians = interleaved_medians({"diffusers": lambda: models.worker.call(diffusers_inpaint),
                                   "studio": lambda: generator.generate(request)}, args.runs)
    print(f"model {models.current.name} · 64x64 · {args.steps} steps · strength 0.75 · {args.runs} interleaved runs")
    for name, value in medians.items():
        print(f"  {name:10s} median {value * 1000:8.1f} ms")
    print(f"studio / diffusers = {medians['studio'] / medians['diffusers']:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
