"""Training steps per second, each method against a minimal diffusers + peft loop on the same data.

Same embedded model, the same 12 example images (assets/lora-example/), batch 4, AdamW, min-SNR, on the device
worker's thread, one after the other, steps timed after a warm-up:

- LoRA: rank 8 on the UNet's transformer layers; the minimal loop is diffusers' train_text_to_image_lora in a nutshell
  (cached latents and text embeddings).
- DreamBooth: the same LoRA plus as many class images per step (prior preservation); the minimal loop is
  train_dreambooth_lora's: instance and class rows in one UNet call, loss + prior loss.
- Textual inversion: 8 vectors (the default); the minimal loop is diffusers' textual_inversion.py: the text
  encoder's whole token-embedding table trains and every row but the new tokens' is put back after each step.

Prints steps/s for each and their ratio (goal: studio / minimal >= 0.95).

    python -m bench.training_speed [--steps 60] [--method lora]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from pipelines.jobs.worker import Priority
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.training.loop import train
from pipelines.training.request import LossPoint, TrainingRequest

DATASET = Path(__file__).resolve().parent.parent / "assets" / "lora-example"
WARM_UP = 5
METHODS = {"lora": {"trigger": "charcoal"},
           "dreambooth": {"trigger": "sks charcoal", "class_prompt": "emoji", "class_images": 8},
           "textual_inversion": {"name": "charcoal-style", "init_word": "charcoal"}}


def minimal_loop(models: ModelManager, request: TrainingRequest, class_latents, steps: int) -> float:
    """The minimal loop of `request.method` (the module's docstring): steps per second."""
    from diffusers import DDPMScheduler

    from pipelines.core.images import image_to_tensor
    from pipelines.core.vae import encode
    from pipelines.training.methods import LoraMethod

    pipeline = models.current.pipeline
    unet, encoder, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    scheduler = DDPMScheduler.from_config(models.current.scheduler_config)
    alphas_cumprod = scheduler.alphas_cumprod
    with torch.no_grad():
        latents = torch.cat([encode(pipeline.vae, image_to_tensor(image)) for image in request.images])
    prompts = request.prompts()
    method = None
    if request.method == "textual_inversion":
        tokenizer.add_tokens([f"bench{number}" for number in range(request.vectors)])
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = encoder.get_input_embeddings().weight
        new_ids = tokenizer.convert_tokens_to_ids([f"bench{number}" for number in range(request.vectors)])
        original = table.detach().clone()
        encoder.get_input_embeddings().requires_grad_(True)
        parameters = [table]
        prompts = [" ".join(f"bench{number}" for number in range(request.vectors)) + ", " + caption
                   for caption in request.captions]
        keep = torch.ones(len(tokenizer), dtype=torch.bool)
        keep[new_ids] = False
    else:
        method = LoraMethod(SimpleNamespace(pipeline=pipeline, request=request, adapter="bench"))
        parameters = method.setup()
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        context = encoder(ids)[0]
        class_context = encoder(tokenizer([request.class_prompt] * len(class_latents), padding="max_length",
                                          max_length=tokenizer.model_max_length, return_tensors="pt").input_ids)[0] \
            if class_latents is not None else None
    optimizer = torch.optim.AdamW(parameters, lr=request.learning_rate)
    generator = torch.Generator().manual_seed(0)
    for step in range(WARM_UP + steps):
        if step == WARM_UP:
            started = time.perf_counter()
        index = torch.randint(0, len(latents), (request.batch_size,), generator=generator)
        x0, hidden = latents[index], (encoder(ids[index])[0] if method is None else context[index])
        if class_latents is not None:
            chosen = torch.randint(0, len(class_latents), (request.batch_size,), generator=generator)
            x0, hidden = torch.cat([x0, class_latents[chosen]]), torch.cat([hidden, class_context[chosen]])
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        prediction = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        errors = (prediction - noise).square().mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0) / snr
        loss = errors[:request.batch_size].mean() + (errors[request.batch_size:].mean() if class_latents is not None
                                                     else 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if method is None:            # textual_inversion.py: every row but the new tokens' back as it was
            with torch.no_grad():
                table[keep] = original[keep]
    rate = steps / (time.perf_counter() - started)
    if method is not None:
        method.teardown()
    else:
        encoder.get_input_embeddings().requires_grad_(False)
    return rate


def studio_job(models: ModelManager, request: TrainingRequest) -> float:
    job = models.worker.submit(lambda job: train(models, request, job, cache_dir=Path("/tmp/bench-training-runs")),
                               kind="train", priority=Priority.BACKGROUND)
    job.result()
    points = [event for event in job.events() if isinstance(event, LossPoint)]
    return (len(points) - WARM_UP) / (points[-1].seconds - points[WARM_UP - 1].seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--method", action="append", choices=list(METHODS))
    args = parser.parse_args()
    models = ModelManager(MemoryManager(device="cpu"), models_dir=Path("/tmp/bench-training-models"))
    models.load("embedded")
    files = sorted(DATASET.glob("*.png"))
    images = [Image.open(path).convert("RGB") for path in files]
    captions = [path.with_suffix(".txt").read_text().strip() for path in files]
    print(f"embedded model · {len(files)} images · batch 4 · {args.steps} timed steps each")
    for method in args.method or list(METHODS):
        request = TrainingRequest(**{"name": "bench"} | METHODS[method], method=method, images=images,
                                  captions=captions, steps=WARM_UP + args.steps, sample_every=0,
                                  checkpoint_every=10_000, warmup_steps=0, caption_dropout=0.0, flip=False,
                                  bucketing=False)
        studio = studio_job(models, request)
        class_latents = None
        if method == "dreambooth":     # the class images the studio drew (and cached), as latents
            from pipelines.core.images import image_to_tensor
            from pipelines.core.vae import encode
            folder = next(Path("/tmp/bench-training-runs/class-images").iterdir())
            with torch.no_grad():
                class_latents = torch.cat([encode(models.current.pipeline.vae, image_to_tensor(Image.open(path)))
                                           for path in sorted(folder.glob("*.png"))])
        minimal = models.worker.call(minimal_loop, models, request, class_latents, args.steps)
        print(f"{method:<18} studio {studio:6.2f} steps/s · minimal {minimal:6.2f} steps/s · "
              f"studio / minimal = {studio / minimal:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
