"""A generation while a long background job (training-like UNet work) holds the device worker.

The background job runs UNet forward and backward passes, calling `job.checkpoint()` after each, as
LoRA training will. A generation submitted meanwhile runs at the next checkpoint instead of waiting
for the job to end. Prints, side by side in one run, the generation's latency (submit to result)
on an idle worker and during the background job, and how long one background step takes: the
extra latency should be at most about one step.

    python -m bench.jobs
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from pipelines.generation.generator import Generator
from pipelines.jobs.worker import Priority
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.tasks.txt2img import Txt2ImgRequest


def training_like(models: ModelManager, stop: threading.Event, first_step: threading.Event,
                  step_seconds: list[float]):
    """A background job's work: UNet forward + backward on random latents, a checkpoint per step."""
    pipeline = models.current.pipeline
    unet = pipeline.unet
    side = models.current.native_side // pipeline.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, unet.config.in_channels, side, side, generator=generator)
    context = torch.randn(4, 8, unet.config.cross_attention_dim, generator=generator)

    def work(job):
        while not stop.is_set() and not job.stop.is_set():
            started = time.perf_counter()
            loss = unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample.square().mean()
            loss.backward()
            unet.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - started)
            first_step.set()
            job.checkpoint()
        return len(step_seconds)
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    models = ModelManager(MemoryManager(device="cpu"))
    models.load("embedded")
    generator = Generator(models, outputs_dir=None)
    request = Txt2ImgRequest(prompt="grinning face", steps=25, seed=1234)

    def latency() -> float:
        started = time.perf_counter()
        generator.generate(request)
        return time.perf_counter() - started

    latency()  # warm-up
    idle, busy, step_seconds = [], [], []
    for _ in range(args.runs):  # interleaved: idle, then with the background job running
        idle.append(latency())
        stop, first_step = threading.Event(), threading.Event()
        background = models.worker.submit(training_like(models, stop, first_step, step_seconds),
                                          kind="train-like", priority=Priority.BACKGROUND)
        first_step.wait()            # the background job is under way
        busy.append(latency())
        stop.set()
        background.result()
    idle_median, busy_median = statistics.median(idle), statistics.median(busy)
    step_median = statistics.median(step_seconds)
    print(f"model {models.current.name} · 25 steps · {args.runs} interleaved runs")
    print(f"  generation, idle worker          median {idle_median * 1000:8.1f} ms")
    print(f"  generation, during background    median {busy_median * 1000:8.1f} ms")
    print(f"  one background step              median {step_median * 1000:8.1f} ms")
    print(f"during background / idle = {busy_median / idle_median:.3f}; extra latency = "
          f"{(busy_median - idle_median) / step_median:.2f} background steps (expected: at most about one, the step under way)")


if __name__ == "__main__":
    main()
