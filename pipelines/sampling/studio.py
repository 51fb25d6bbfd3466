"""The speculative sampler in the studio: a prepared Text-to-Image call run as speculative DDPM chains
(the algorithm is pipelines/sampling/speculative.py), registered as the "DDPM speculative" sampler's
own loop, with the check of what it runs and the note on what it cost."""

from __future__ import annotations

import torch

from pipelines.core.denoiser import Denoiser
from pipelines.core.loop import begin
from pipelines.core.registry import TASKS
from pipelines.core.samplers import (ANCHORED_DRAFT, FROZEN_X0_DRAFT, MODEL_DRAFTS, SPECULATIVE_SAMPLER, SamplerLoop,
                                     register_sampler_loop)
from pipelines.sampling.speculative import ChainStats, DDPMTransitions, SpeculativeDDPM


def run_speculative(call, batch_index: int, *, generators=None, latents=None, callback=None, expose=()) -> torch.Tensor:
    """`PreparedCall.__call__` for the "DDPM speculative" sampler: one batch of Text-to-Image. Image i starts
    from the same noise as DDPM's image i for that seed (drawn the same way) and continues its own chain
    from the same CPU generator, so a seed gives the same image twice; the statistics go to
    `call.speculative` (one ChainStats per image) and the notes. `callback` is called after every round
    with the least advanced image's step, as diffusers' loop calls it after every step."""
    request, pipeline = call.request, call.pipeline
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(request.steps)
    transitions = DDPMTransitions.from_scheduler(scheduler)
    generators = generators or call.generators(batch_index)
    denoiser = Denoiser(call, generators=generators)
    if latents is None:   # DDPM's own x_T for these seeds; the chains run on the CPU
        latents = call.initial_noise(generators, device=torch.device("cpu"))
    timesteps = torch.tensor(transitions.timesteps)

    def target(states, positions, chains):
        return denoiser.predict_rows(states, timesteps[positions], chains).float()

    def draft_model(states, positions, chains):
        return denoiser.predict_rows(states, timesteps[positions], chains, unet=call.draft).float()

    sampler = SpeculativeDDPM(transitions, target, draft=draft_model if request.draft in MODEL_DRAFTS else None, draft_length=request.draft_length,
                              frozen="x0" if request.draft == FROZEN_X0_DRAFT else "eps",
                              anchored=request.draft == ANCHORED_DRAFT)
    begin(pipeline, len(transitions))

    def on_round(states, positions) -> bool:
        if callback is not None:
            step = min(positions) - 1
            callback(pipeline, step, timesteps[min(step + 1, len(timesteps) - 1)], {"latents": states})
        return not pipeline._interrupt

    final, stats = sampler.sample(latents.float(), generators, on_round=on_round)
    call.speculative.extend(stats)
    return final.to(latents.dtype)


def check_supported(task, pipeline, model_name: str) -> None:
    """Refuse, before anything is loaded, what the speculative sampler does not run."""
    if not task.supports(SPECULATIVE_SAMPLER):
        runs = ", ".join(t.label for t in TASKS.values() if t.supports(SPECULATIVE_SAMPLER))
        raise ValueError(f"The {SPECULATIVE_SAMPLER} sampler runs {runs} only; use DDPM for {task.label}.")


def speculative_note(request, stats: list[ChainStats]) -> str:
    """One line on what the run cost: target calls per image against DDPM's, and the acceptance rate."""
    calls = sum(s.target_calls for s in stats) / len(stats)
    proposed = sum(s.proposed for s in stats)
    rate = sum(s.accepted for s in stats) / proposed if proposed else 0.0
    draft = f"{request.draft}, L = {request.draft_length}"
    extra = ""
    if request.draft in MODEL_DRAFTS:
        extra = f", {sum(s.draft_calls for s in stats) / len(stats):.0f} draft calls"
    return (f"{SPECULATIVE_SAMPLER} ({draft}): {request.steps} steps in {calls:.1f} target calls per image "
            f"(plain DDPM: {request.steps}, {1 - calls / request.steps:.0%} fewer){extra}; {rate:.0%} of drafted "
            "steps accepted.")

register_sampler_loop(SPECULATIVE_SAMPLER, SamplerLoop(run=run_speculative, check=check_supported))
