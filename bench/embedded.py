"""Time for one image from the embedded model at the studio's defaults (64x64, 25 steps, CFG 7.5).

Goal on a 2-core CPU: <= 1.0 s. Prints the median of several runs through the studio's own
generation service, and the model's share (UNet evaluations) against the VAE decode.

    python -m bench.embedded [--runs 10] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipelines.core.samplers import model_default_sampler
from pipelines.generation.generator import Generator
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.tasks.txt2img import Txt2ImgRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    manager = ModelManager(MemoryManager(device="cpu"))
    model = manager.load("embedded")
    generator = Generator(manager, outputs_dir=None)
    request = Txt2ImgRequest(prompt="grinning face", sampler=model_default_sampler(model.scheduler_config),
                             steps=25, guidance_scale=7.5, width=64, height=64, seed=0)
    unet_seconds = []
    started_at = {}
    unet = model.pipeline.unet
    unet.register_forward_pre_hook(lambda module, args: started_at.__setitem__("t", time.perf_counter()))
    unet.register_forward_hook(lambda module, args, output: unet_seconds.append(time.perf_counter() - started_at["t"]))
    generator.generate(request)  # warm-up
    times = []
    unet_seconds.clear()
    for _ in range(args.runs):
        started = time.perf_counter()
        generator.generate(request)
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    unet_share = sum(unet_seconds) / sum(times)
    print(f"embedded model · 64x64 · 25 steps · {request.sampler} · CFG 7.5 · {torch.get_num_threads()} threads · "
          f"{args.runs} runs")
    print(f"one image: median {median:.3f} s (goal <= 1.0 s); UNet share of the time {unet_share:.0%}")


if __name__ == "__main__":
    main()
