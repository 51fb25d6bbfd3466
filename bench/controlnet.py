"""The studio's ControlNet path against diffusers' StableDiffusionControlNetPipeline, same inputs and seed, and
what one unit costs over plain Text-to-Image.

All on the embedded model with the shipped canny ControlNet, on the device worker's thread, 64x64, 25 steps, CFG 7.5; interleaved runs, medians and their ratios
(goal: studio / diffusers <= 1.05). The studio's path adds the preprocessor (canny on the control image), the
unit's bookkeeping and the saved PNG's infotext; both run the ControlNet once per step on both CFG branches.

    python -m bench.controlnet
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image, ImageDraw

from bench.timing import interleaved_medians
from pipelines.generation.generator import Generator
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.tasks.control_units import DEFAULT_CONTROLNET
from pipelines.tasks.controlnet import ControlNetRequest
from pipelines.tasks.preprocessors import canny
from pipelines.tasks.txt2img import Txt2ImgRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    models = ModelManager(MemoryManager(device="cpu"))
    models.load("embedded")
    generator = Generator(models, outputs_dir=None)
    drawing = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(drawing).ellipse((12, 12, 52, 52), outline="black", width=3)
    settings = dict(prompt="red apple", steps=args.steps, sampler="DPM++ 2M", seed=7, guidance_scale=7.5)
    request = ControlNetRequest(**settings, control_image=drawing, preprocessor="canny", model=DEFAULT_CONTROLNET)
    controlnet = models.worker.call(models.controlnet, DEFAULT_CONTROLNET)

    def diffusers_controlnet():
        from diffusers import StableDiffusionControlNetPipeline
        pipeline = StableDiffusionControlNetPipeline.from_pipe(models.pipeline("txt2img"), controlnet=controlnet)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.scheduler = pipeline.scheduler.from_config(models.current.scheduler_config)
        return pipeline("red apple", image=canny(drawing), num_inference_steps=args.steps, guidance_scale=7.5,
                        generator=torch.Generator("cpu").manual_seed(7)).images[0]

    medians = interleaved_medians({
        "diffusers": lambda: models.worker.call(diffusers_controlnet),
        "studio": lambda: generator.generate(request),
        "txt2img": lambda: generator.generate(Txt2ImgRequest(**settings))}, args.runs)
    print(f"model {models.current.name} + {DEFAULT_CONTROLNET} · 64x64 · {args.steps} steps · {args.runs} "
          "interleaved runs")
    for name, value in medians.items():
        print(f"  {name:10s} median {value * 1000:8.1f} ms")
    print(f"studio / diffusers = {medians['studio'] / medians['diffusers']:.3f}  (goal <= 1.05)")
    print(f"one unit / Text-to-Image = {medians['studio'] / medians['txt2img']:.3f}")


if __name__ == "__main__":
    main()
