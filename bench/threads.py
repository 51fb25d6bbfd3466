"""Where model work runs, on a CPU: the same diffusers call (embedded model, 64x64, 25 steps,
CFG 7.5) placed three ways, each in a fresh process (a process's OpenMP thread teams outlive the
calls that made them, so placements cannot share one), in alternating rounds:

- main thread:  load and generate on the main thread (a plain script);
- device thread: the studio's way, loading and generating on its one device thread;
- split:        load on the main thread, generate on another thread (the studio before the
                device thread took the loading too).

Prints the median of each and the ratios to the main thread (goal: device / main <= 1.05).

    python -m bench.threads [--rounds 3] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

PLACEMENTS = ("main thread", "device thread", "split")


def _worker(placement: str, runs: int) -> None:
    import torch

    from pipelines.jobs.worker import DeviceWorker
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager

    worker = DeviceWorker()
    if placement == "device thread":
        pipeline = ModelManager(MemoryManager(device="cpu"), worker=worker).load("embedded").pipeline
    else:
        from diffusers import StableDiffusionPipeline

        from pipelines.models.sources import EMBEDDED_MODEL
        pipeline = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL)  # on the main thread
        pipeline.set_progress_bar_config(disable=True)
        pipeline("warm-up", num_inference_steps=2)  # the main thread's OpenMP team now exists

    def call():
        pipeline(prompt="grinning face", num_inference_steps=25, guidance_scale=7.5, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(1234), output_type="pil")

    place = call if placement == "main thread" else (lambda: worker.call(call))
    place()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        place()
        times.append(time.perf_counter() - started)
    print(statistics.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per placement, alternating")
    parser.add_argument("--runs", type=int, default=5, help="timed generations per process")
    parser.add_argument("--worker", choices=PLACEMENTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.runs)
        return
    medians: dict[str, list[float]] = {placement: [] for placement in PLACEMENTS}
    for _ in range(args.rounds):
        for placement in PLACEMENTS:
            output = subprocess.run([sys.executable, "-m", "bench.threads", "--worker", placement,
                                     "--runs", str(args.runs)], capture_output=True, text=True, check=True)
            medians[placement].append(float(output.stdout.strip().splitlines()[-1]))
    result = {placement: statistics.median(values) for placement, values in medians.items()}
    print(f"embedded model · 64x64 · 25 steps · CFG 7.5 · {args.rounds} processes x {args.runs} runs per placement")
    for placement, value in result.items():
        print(f"  {placement:14s} median {value * 1000:7.1f} ms   / main thread = {value / result['main thread']:.3f}")
    print(f"device thread / main thread = {result['device thread'] / result['main thread']:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
