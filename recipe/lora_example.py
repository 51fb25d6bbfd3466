"""The example LoRA dataset and its measured style shift (issue 11's demonstration).

`python -m recipe.lora_example` does three things, seeded:

1. Makes the dataset: twelve emoji drawn by the embedded model itself, turned into charcoal drawings by
   a transform written here (greys, raised contrast, thick dark outlines), a style the embedded model
   cannot draw. Written to assets/lora-example/ with a caption file each; trigger word "charcoal". They
   are the embedded model's own output, under the project's licence.
2. Trains a LoRA on them with the studio's defaults (pipelines/training/loop.py), timing it.
3. Measures the style on eight prompts that are not in the training set, at LoRA weight 0 and 1: the
   mean chroma (charcoal is grey: near 0) and the share of near-white pixels, and writes a
   grid (assets/lora-example-grid.png) and the figures (assets/lora-example.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "assets" / "lora-example"
GRID = ROOT / "assets" / "lora-example-grid.png"
REPORT = ROOT / "assets" / "lora-example.json"
TRIGGER = "charcoal"
TRAINING_PROMPTS = ["red apple", "grinning face", "cat face", "dog face", "blue car", "sun", "house", "tree",
                    "rocket", "guitar", "pizza", "star"]
HELD_OUT_PROMPTS = ["banana", "smiling face with sunglasses", "bicycle", "fish", "flower", "umbrella", "cake",
                    "moon"]


def charcoal(image: Image.Image) -> Image.Image:
    """Charcoal drawing: the picture in greys, contrast raised, its outlines drawn thick and dark (thick
    enough to survive the VAE's 8x downsampling, which thin pencil lines do not)."""
    grey = ImageOps.autocontrast(ImageOps.grayscale(image), cutoff=2)
    edges = grey.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(3))
    strokes = np.clip(np.asarray(edges, dtype=np.float32) * 2.0, 0, 255)
    drawing = np.clip(np.asarray(grey, dtype=np.float32) * 0.9 + 25 - strokes, 0, 255)
    return Image.fromarray(drawing.astype(np.uint8)).convert("RGB")


def style_figures(images: list[Image.Image]) -> dict:
    """Charcoal's own statistics: colourfulness (mean chroma, max - min of R, G, B, over 255: 0 for greys)
    and the share of near-white pixels."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]
    chroma = float(np.mean([(array.max(axis=2) - array.min(axis=2)).mean() for array in arrays]) / 255)
    paper = float(np.mean([(np.asarray(image.convert("L")) > 230).mean() for image in images]))
    return {"mean_chroma": round(chroma, 4), "white_share": round(paper, 4)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the studio's default)")
    args = parser.parse_args(argv)

    from pipelines.generation.generator import Generator
    from pipelines.jobs.worker import DeviceWorker, Priority
    from pipelines.lora.judge import feature_distances
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from pipelines.tasks.txt2img import Txt2ImgRequest
    from pipelines.training.loop import train
    from pipelines.training.request import LossPoint, TrainingRequest

    models = ModelManager(MemoryManager(device="cpu"), worker=DeviceWorker(), models_dir=ROOT / ".cache" / "lora-example")
    models.load("embedded")
    generator = Generator(models, outputs_dir=None)

    # 1. The dataset (its README.md, with the licence, stays)
    DATASET.mkdir(parents=True, exist_ok=True)
    images = []
    for number, prompt in enumerate(TRAINING_PROMPTS):
        drawn = generator.generate(Txt2ImgRequest(prompt=prompt, seed=100 + number)).images[0].image
        sketch = charcoal(drawn)
        name = prompt.replace(" ", "-")
        sketch.save(DATASET / f"{name}.png")
        (DATASET / f"{name}.txt").write_text(prompt + "\n")
        images.append(sketch)

    # 2. Training, with the studio's defaults
    extra = {"steps": args.steps} if args.steps else {}
    request = TrainingRequest(name="charcoal", images=images, captions=TRAINING_PROMPTS, trigger=TRIGGER,
                                  sample_every=0, **extra)
    started = time.perf_counter()
    job = models.worker.submit(lambda job: train(models, request, job, cache_dir=models.lora_dir / ".runs",
                                                       score=feature_distances),
                               kind="train-lora", priority=Priority.BACKGROUND)
    result = job.result()
    losses = [event.loss for event in job.events() if isinstance(event, LossPoint)]
    seconds = time.perf_counter() - started

    # 3. The style on held-out prompts, at weight 0 and 1
    rows = []
    for number, prompt in enumerate(HELD_OUT_PROMPTS):
        pair = [generator.generate(Txt2ImgRequest(prompt=f"{TRIGGER}, {prompt} <lora:charcoal:{weight}>",
                                                  seed=500 + number)).images[0].image for weight in (0, 1)]
        rows.append(pair)
    plain, styled = style_figures([row[0] for row in rows]), style_figures([row[1] for row in rows])
    sheet = Image.new("RGB", (64 * len(rows), 128), "white")   # a column per held-out prompt: weight 0, then 1
    for x, (plain_image, styled_image) in enumerate(rows):
        sheet.paste(plain_image, (64 * x, 0))
        sheet.paste(styled_image, (64 * x, 64))
    sheet = sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST)
    sheet.save(GRID)
    report = {"training": {"images": len(images), "steps": result.steps, "seconds": round(seconds, 1),
                           "loss_first_20": round(float(np.mean(losses[:20])), 4),
                           "loss_last_20": round(float(np.mean(losses[-20:])), 4),
                           "effect_on_samples": round(result.effect, 2),
                           "feature_distance_to_training": [round(result.feature_distance_before, 3),
                                                            round(result.feature_distance_after, 3)],
                           "settings": request.settings()},
              "held_out_prompts": HELD_OUT_PROMPTS, "weight_0": plain, "weight_1": styled,
              "training_images": style_figures(images)}
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
