"""Where model work runs: the same diffusers call on the main thread, on a fresh thread, and on
the studio's device thread (which sets torch's intra-op thread count for itself when it starts).

Same model, prompt, seed and steps, interleaved runs; prints medians and ratios to the main
thread (goal: device thread / main thread <= 1.05).

    python -m bench.threads                 # the embedded model, 64x64, 25 steps, CFG 7.5
"""

from __future__ import annotations

import argparse
import threading

import torch

from bench.timing import interleaved_medians
from pipelines.memory import MemoryManager
from pipelines.models import ModelManager
from pipelines.streaming import stream_events


def _on_fresh_thread(function) -> None:
    thread = threading.Thread(target=function)
    thread.start()
    thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    manager = ModelManager(MemoryManager(device="cpu"))
    model = manager.load(args.model)
    pipeline = model.pipeline
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor

    def call():
        pipeline(prompt="grinning face", num_inference_steps=args.steps, guidance_scale=7.5, width=size,
                 height=size, generator=torch.Generator("cpu").manual_seed(1234), output_type="pil")

    candidates = {"main thread": call,
                  "fresh thread": lambda: _on_fresh_thread(call),
                  "device thread": lambda: list(stream_events(lambda emit: call()))}
    median = interleaved_medians(candidates, args.runs)
    print(f"model {model.name} · {size}x{size} · {args.steps} steps · CFG 7.5 · {torch.get_num_threads()} "
          f"threads · {args.runs} interleaved runs each")
    for name, value in median.items():
        print(f"  {name:14s} median {value * 1000:8.1f} ms   / main thread = {value / median['main thread']:.3f}")
    print(f"device thread / main thread = {median['device thread'] / median['main thread']:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
