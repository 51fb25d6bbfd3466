"""DreamBooth's class images: pictures of the class ("dog") drawn by the loaded model itself before training,
so that the prior-preservation loss keeps what the model already draws for the class while the identifier
("sks dog") learns the instance (Ruiz et al. 2023, sec. 3.3).

They are cached under `<cache_dir>/class-images/<key>/`, the key naming the base model (name and hash), the
class prompt and the size, so a second run with the same class reuses them and draws only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from PIL import Image

from pipelines.core.images import to_pil
from pipelines.core.samplers import make_scheduler, model_default_sampler
from pipelines.core.transformers import default_transformer_sampler, is_transformer, make_transformer_scheduler
from pipelines.core.vae import decode
from pipelines.training.request import TrainingStopped

CLASS_IMAGE_STEPS = 25
CLASS_IMAGE_SEED = 1_000_000          # the class images' seeds: this plus their number (apart from the samples')


def class_image_folder(cache_dir: Path, base_model: dict, class_prompt: str, side: int) -> Path:
    key = json.dumps({"model": base_model, "prompt": class_prompt, "side": side}, sort_keys=True)
    return cache_dir / "class-images" / hashlib.sha256(key.encode()).hexdigest()[:16]


@torch.no_grad()
def class_images(pipeline, scheduler_config: dict, *, folder: Path, class_prompt: str, count: int, side: int,
                 report=None, arguments: dict | None = None) -> list[Image.Image]:
    """`count` images of `class_prompt` at side×side, from the cache or drawn now with the model's own sampler
    (each written whole: a stopped run leaves no half-written picture). `report(done, count)` is called after
    each image, outside the pipeline's call (a training lets other jobs in there, and stops there). The
    pipeline must have no adapter on; its sampler is put back as it was. `arguments`: what else the family's
    pipeline is called with (Flux: CFG off)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.txt").write_text(class_prompt + "\n")
    last_sampler, images = pipeline.scheduler, []
    try:
        for number in range(count):
            path = folder / f"{number:04d}.png"
            if not path.exists():
                partial = path.with_suffix(".partial.png")
                draw_image(pipeline, scheduler_config, class_prompt, side=side, seed=CLASS_IMAGE_SEED + number,
                           arguments=arguments or {}).save(partial)
                os.replace(partial, path)
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
            if report is not None:
                report(number + 1, count)
    finally:
        pipeline.scheduler = last_sampler
    return images


def draw_image(pipeline, scheduler_config: dict, prompt: str, *, side: int, seed: int, arguments: dict,
               steps: int = CLASS_IMAGE_STEPS) -> Image.Image:
    """One picture of `prompt` with the model's own sampler, made afresh (a multistep sampler keeps state from the
    previous image), from `seed`'s CPU generator. The caller puts the pipeline's sampler back."""
    generator = torch.Generator().manual_seed(seed)
    if is_transformer(pipeline):         # its pipeline decodes (Flux's latents are packed, Flux 2's normalised)
        pipeline.scheduler = make_transformer_scheduler(default_transformer_sampler(scheduler_config),
                                                        scheduler_config)
        return pipeline(prompt=prompt, num_inference_steps=steps, height=side, width=side, generator=generator,
                        **arguments).images[0]
    pipeline.scheduler = make_scheduler(model_default_sampler(scheduler_config), scheduler_config)
    latents = pipeline(prompt, num_inference_steps=steps, height=side, width=side, output_type="latent",
                       generator=generator, **arguments).images
    return to_pil(decode(pipeline.vae, latents)[0])[0]


def report_and_yield(job, models):
    """The `report` a training gives `class_images`: progress, queued generations let in between two images (a
    generation may switch a LoRA on: switched off again), and Stop, which keeps what is drawn for the next run."""
    def drawn(done: int, count: int) -> None:
        job.report(done, count, f"class images: {done} of {count}")
        if job.checkpoint():
            models.use_loras([])
        if job.stop.is_set():
            raise TrainingStopped(f"Stopped while drawing the class images ({done} of {count} are cached for the "
                                  "next run); nothing was trained.")
    return drawn
