"""The reverse process of a flow-matching transformer (SD 3.x, Flux, Flux 2, Sana), recorded for the Diffusion
Explorer.

The family's own pipeline runs the generation (pipelines/core/transformer_call.py); the recorder listens to its
sampler: every `scheduler.step(v, t, x_t)` hands over the state x_t and the guided prediction, which for these
models is a velocity v = ε − x_0 (flow matching: x_t = (1 − t)·x_0 + t·ε, t = σ in (0, 1]). From the model's own
parameterisation the step's guesses follow exactly:

    x̂_0 = x_t − t·v          ε̂ = x_t + (1 − t)·v

A trace's x̂_0 frames are those guesses decoded; its noise maps show ε̂. The pipeline hands its sampler only the
guided velocity, so the trace has no separate ε_u and ε_c.

A branch continues a trace from its recorded x_t at step k with other settings: the family's pipeline runs the
same schedule's remaining steps from that state, its sampler starting afresh there (a first-order one, Euler,
continues exactly: a branch that changes nothing ends on the trace's own image).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch

from pipelines.core.call import prepare
from pipelines.core.families import family_of_pipeline
from pipelines.core.transformers import is_flow, make_transformer_scheduler, starting_at_step
from pipelines.explorer.trace import Trace, TraceStep
from pipelines.tasks.txt2img import Txt2ImgRequest

FLOW_NOTE = ("Flow matching: x_t = (1 − t)·x_0 + t·ε and the model predicts the velocity v = ε − x_0, so "
             "x̂_0 = x_t − t·v and ε̂ = x_t + (1 − t)·v. The pipeline gives its sampler the guided v only: ε_u and "
             "ε_c are not recorded separately.")


def record_flow_trace(models, request: Txt2ImgRequest, *, stop: threading.Event | None = None,
                      on_step: Callable[[int, int], None] | None = None, before: list[TraceStep] = (),
                      state: torch.Tensor | None = None) -> Trace:
    """Generate `request` as the generator does on a flow-matching transformer, recording every sampler step; with
    `before` (a trace's first k steps) and `state` (its x_t at step k), the steps from k on, from that state."""
    model = models.require()
    if not is_flow(model.scheduler_config):
        raise ValueError(f"The Diffusion Explorer's trace of a transformer follows flow matching; {model.name} "
                         f"({family_of_pipeline(model.pipeline)}) is a DDPM model whose trace is not built yet.")
    call = prepare(models, request)
    start = None
    if before:          # the same schedule from step k on, from the state the trace recorded there
        call.pipeline.scheduler = starting_at_step(call.pipeline.scheduler, len(before))
        start = call.packed(state)
    scheduler = call.pipeline.scheduler
    original, steps = scheduler.step, list(before)
    total = scheduler.config.get("num_train_timesteps", 1000)

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        t = float(timestep.flatten()[0] if torch.is_tensor(timestep) else timestep) / total
        x_t = call.spatial(sample.detach().float())[:1].cpu()       # (Flux 2's un-normalised in float32)
        velocity = call.spatial(model_output.detach().float(), difference=True)[:1].cpu()
        signal, noise = 1.0 - t, t
        steps.append(TraceStep(timestep=t * total, latents=x_t, input_scale=1.0,
                               alpha_cumprod=signal ** 2 / (signal ** 2 + noise ** 2),   # DDPM's ᾱ of the same SNR
                               x0_pred=x_t - t * velocity, eps_cond=x_t + signal * velocity, eps_uncond=None,
                               eps_guided=x_t + signal * velocity, flow_time=t))
        if on_step is not None:
            on_step(len(steps), request.steps)
        return original(model_output, timestep, sample, *args, **kwargs)

    def step_end(pipe, index, timestep, tensors):
        if stop is not None and stop.is_set():
            pipe._interrupt = True
        return {}

    scheduler.step = recording_step
    try:
        latents = call(0, callback=step_end, latents=start)
    finally:
        del scheduler.step
        if before:      # the shared pipeline's sampler as a plain one again (the next call sets its own anyway)
            call.pipeline.scheduler = make_transformer_scheduler(call.request.sampler, model.scheduler_config)
    stopped = bool(getattr(call.pipeline, "_interrupt", False))
    notes = [*call.notes, FLOW_NOTE] + ([f"Stopped after {len(steps)} step(s); the final image is the unfinished "
                                        "latent decoded."] if stopped else [])
    return Trace(request=call.request, steps=steps, final_latents=call.spatial(latents).detach().cpu(),
                 final_image=call.decode(latents)[0], prediction_type="flow", vae=weakref.ref(call.pipeline.vae),
                 stopped=stopped, notes=notes, settings=[(0, call.request)], replayable=False)


def branch_flow_trace(models, trace: Trace, request: Txt2ImgRequest, at_step: int, details: dict, *,
                      stop: threading.Event | None = None, on_step: Callable[[int, int], None] | None = None) -> Trace:
    """`trace` continued from its x_t at step `at_step` with `request`'s settings (reverse.py's `branch` checked
    them): the trace's first steps, then the family's pipeline on the remaining steps of the same schedule. At
    step 0 it is a new recording from the seed (another sampler too); later, the sampler stays, since another one
    builds another schedule, on which the recorded x_t would not sit."""
    if at_step == 0:
        result = record_flow_trace(models, request, stop=stop, on_step=on_step)
    else:
        sampler = trace.request.sampler
        if request.sampler != sampler:
            raise ValueError(f"On a flow-matching model a branch at step {at_step} keeps the sampler ({sampler}): "
                             "another sampler builds another schedule, on which the recorded x_t would not sit. "
                             "Branch at step 0 to change the sampler.")
        if make_transformer_scheduler(sampler, models.require().scheduler_config).order > 1:
            raise ValueError(f"{sampler} calls the model twice a step, and its trace has a frame per call: branch it "
                             "at step 0, or record with Euler to branch mid-way.")
        result = record_flow_trace(models, request, stop=stop, on_step=on_step, before=trace.steps[:at_step],
                                   state=trace.steps[at_step].latents)
        if sampler != "Euler":
            result.notes.append(f"{sampler} starts afresh at step {at_step} from the recorded x_t (a multistep "
                                "sampler warms up again with lower-order steps; a stochastic one draws its noise "
                                "from the seed restarted there); Euler continues exactly.")
    result.branched_at, result.changes, result.settings = at_step, details["changes"], details["settings"]
    return result
