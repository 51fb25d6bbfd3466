"""LoRA training steps per second: the studio's job against a minimal peft + diffusers loop.

Same embedded model, the same 12 example images (assets/lora-example/), the same LoRA (rank 8 on the
attention), batch 4, AdamW, min-SNR; both on the device worker's thread, one after the other, steps
timed after a warm-up. Prints steps/s for each, their ratio (goal: studio / minimal >= 0.95) and the
process's peak RAM.

    python -m bench.lora_train
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from pipelines.jobs.worker import Priority
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.training.loop import train
from pipelines.training.methods import LoraMethod
from pipelines.training.request import LossPoint, TrainingRequest

DATASET = Path(__file__).resolve().parent.parent / "assets" / "lora-example"
WARM_UP = 5


def minimal_loop(models: ModelManager, request: TrainingRequest, steps: int) -> float:
    """diffusers' train_text_to_image_lora in a nutshell, on cached latents: steps per second."""
    from diffusers import DDPMScheduler

    from pipelines.core.denoiser import prompt_embeddings
    from pipelines.core.images import image_to_tensor
    from pipelines.core.vae import encode
    from pipelines.tasks.txt2img import Txt2ImgRequest

    pipeline = models.current.pipeline
    unet, scheduler = pipeline.unet, DDPMScheduler.from_config(models.current.scheduler_config)
    with torch.no_grad():
        latents = torch.cat([encode(pipeline.vae, image_to_tensor(image)) for image in request.images])
        context = torch.cat([prompt_embeddings(pipeline, Txt2ImgRequest(prompt=text, guidance_scale=1), "cpu",
                                               cfg=False)[0] for text in request.prompts()])
    method = LoraMethod(SimpleNamespace(pipeline=pipeline, request=request, adapter="bench"))
    parameters = method.setup()
    optimizer = torch.optim.AdamW(parameters, lr=request.learning_rate)
    generator = torch.Generator().manual_seed(0)
    alphas_cumprod = scheduler.alphas_cumprod
    for step in range(WARM_UP + steps):
        if step == WARM_UP:
            started = time.perf_counter()
        index = torch.randint(0, len(latents), (request.batch_size,), generator=generator)
        x0, noise = latents[index], torch.randn(latents[index].shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (request.batch_size,), generator=generator)
        prediction = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=context[index]).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        loss = ((prediction - noise).square().mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0) / snr).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    rate = steps / (time.perf_counter() - started)
    method.teardown()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    models = ModelManager(MemoryManager(device="cpu"), models_dir=Path("/tmp/bench-lora-models"))
    models.load("embedded")
    files = sorted(DATASET.glob("*.png"))
    request = TrainingRequest(name="bench", images=[Image.open(path).convert("RGB") for path in files],
                                  captions=[path.with_suffix(".txt").read_text().strip() for path in files],
                                  trigger="charcoal", steps=WARM_UP + args.steps, sample_every=0,
                                  checkpoint_every=10_000, warmup_steps=0)
    job = models.worker.submit(lambda job: train(models, request, job, cache_dir=Path("/tmp/bench-lora-runs")),
                               kind="train-lora", priority=Priority.BACKGROUND)
    job.result()
    points = [event for event in job.events() if isinstance(event, LossPoint)]
    studio = (len(points) - WARM_UP) / (points[-1].seconds - points[WARM_UP - 1].seconds)
    minimal = models.worker.call(minimal_loop, models, request, args.steps)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f"embedded model · {len(files)} images · batch {request.batch_size} · rank {request.rank} · "
          f"{args.steps} timed steps each")
    print(f"  studio job     {studio:6.2f} steps/s")
    print(f"  minimal loop   {minimal:6.2f} steps/s")
    print(f"studio / minimal = {studio / minimal:.3f}  (goal >= 0.95) · peak RAM {peak_gib:.2f} GiB")


if __name__ == "__main__":
    main()
