"""Where speculative sampling pays on this machine: the batch-cost curve and side-by-side wall-clock.

Speculative DDPM (pipelines/sampling/speculative.py) trades L sequential target calls for one call on L states.
That saves time only where one batched call costs less than the steps it advances. This prints:

1. the target's batch-cost curve on the embedded model: one guided call (CFG on: 2 x L rows) on L
   states, in ms and relative to L single-state calls, and the draft UNet's single call;
2. for each draft and L, the steps one round advances on average (from real runs) against what its
   call costs, i.e. the predicted time ratio to plain DDPM, and the measured one: plain DDPM and
   speculative on the same prompts and seeds, interleaved, medians.

    python -m bench.speculative                 # 100 steps, 4 prompts, 3 interleaved runs
"""

from __future__ import annotations

import argparse

import torch

from bench.timing import interleaved_medians
from pipelines.core.call import prepare
from pipelines.core.denoiser import Denoiser
from pipelines.generation.generator import Generator
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.tasks.txt2img import Txt2ImgRequest

PROMPTS = ("red apple", "dog face", "rocket", "sun with face")
CONFIGS = (("frozen target", 4), ("frozen target x0", 4), ("frozen target x0", 8), ("draft model", 4),
           ("anchored draft model", 4))


def batch_costs(models: ModelManager, lengths: list[int], runs: int) -> dict[str, float]:
    """Median ms of one guided target call on L states, and of one draft-model call on one state."""
    call = models.worker.call(prepare, models, Txt2ImgRequest(prompt="red apple", seed=1))
    denoiser = models.worker.call(Denoiser, call)
    draft = models.worker.call(models.draft_unet)
    shape = (4, 8, 8)

    def target_on(length: int):
        states, timesteps = torch.randn(length, *shape), torch.randint(0, 1000, (length,))
        rows = torch.zeros(length, dtype=torch.long)
        return lambda: models.worker.call(denoiser.predict_rows, states, timesteps, rows)

    candidates = {f"target L={length}": target_on(length) for length in lengths}
    states, timesteps, rows = torch.randn(1, *shape), torch.randint(0, 1000, (1,)), torch.zeros(1, dtype=torch.long)
    candidates["draft L=1"] = lambda: models.worker.call(denoiser.predict_rows, states, timesteps, rows, unet=draft)

    def repeated(function):       # one timing = 20 calls, so a call's few ms are measurable
        return lambda: [function() for _ in range(20)]

    medians = interleaved_medians({name: repeated(function) for name, function in candidates.items()}, runs)
    return {name: value / 20 * 1000 for name, value in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    models = ModelManager(MemoryManager(device="cpu"))
    models.load("embedded")
    generator = Generator(models, outputs_dir=None)
    lengths = [1, 2, 4, 8, 16]

    costs = batch_costs(models, lengths, args.runs)
    print(f"1. One guided target call (CFG: 2 rows per state), embedded model, 64x64, {torch.get_num_threads()} threads")
    single = costs["target L=1"]
    for length in lengths:
        value = costs[f"target L={length}"]
        print(f"   L={length:2d}: {value:6.1f} ms = {value / single:4.2f} single calls "
              f"({value / (length * single):.2f} of L single calls)")
    print(f"   draft model, one state: {costs['draft L=1']:.1f} ms = {costs['draft L=1'] / single:.2f} target calls")

    def requests(sampler: str, draft: str | None = None, length: int | None = None) -> list[Txt2ImgRequest]:
        extra = {"draft": draft, "draft_length": length} if draft else {}
        return [Txt2ImgRequest(prompt=prompt, sampler=sampler, steps=args.steps, seed=100 + i, **extra)
                for i, prompt in enumerate(PROMPTS)]

    def run_all(batch: list[Txt2ImgRequest]):
        return lambda: [generator.generate(request) for request in batch]

    print(f"\n2. {args.steps} DDPM steps, {len(PROMPTS)} prompts, {args.runs} interleaved runs; "
          "rounds advance a = steps / target calls on average")
    candidates = {"DDPM": run_all(requests("DDPM"))}
    advance = {}
    for draft, length in CONFIGS:
        batch = requests("DDPM speculative", draft, length)
        done = [generator.generate(request) for request in batch]
        calls = [int(item.images[0].infotext.split("Target calls: ")[1].split(",")[0]) for item in done]
        advance[(draft, length)] = args.steps * len(calls) / sum(calls)
        candidates[f"{draft}, L={length}"] = run_all(batch)
    medians = interleaved_medians(candidates, args.runs)
    base = medians["DDPM"]
    print(f"   {'plain DDPM':24s} {base / len(PROMPTS):6.2f} s/image")
    for (draft, length), a in advance.items():
        name = f"{draft}, L={length}"
        per_round = costs[f"target L={length}"] / single + (length * costs["draft L=1"] / single
                                                           if "draft model" in draft else 0.0)
        print(f"   {name:24s} {medians[name] / len(PROMPTS):6.2f} s/image  measured {medians[name] / base:4.2f}x DDPM · "
              f"a = {a:4.2f} steps per round, round costs {per_round:4.2f} single calls → predicted "
              f"{per_round / a:4.2f}x")


if __name__ == "__main__":
    main()
