"""The reverse (denoising) process recorded step by step, and branched, for the Diffusion Explorer tab.

`record_trace` runs the loaded text-to-image pipeline exactly as `Generator` does (the same sampler
from the model's scheduler config, the same CPU-seeded noise, the same prompt handling, the same
decode) and listens in at every step with two of diffusers' own hooks:

    a forward hook on the UNet   what the model was shown (x_t, scaled by the sampler) and what it
                                 predicted: eps_u and eps_c from one batched call when CFG is on,
                                 eps_c alone when it is off
    callback_on_step_end         the guided eps the sampler used (`noise_pred`, which we expose by
                                 extending the pipeline's `_callback_tensor_inputs` for the call) and
                                 the latents the step produced, i.e. x_t of the next step

What a step keeps, and the two parametrisations of x_t samplers use, are in trace.py. We tell the two
apart by whether the UNet's input differs from x_t, and read sigma off that scale, so no per-scheduler
table is needed. For variance-preserving samplers, abar_t is the model's `alphas_cumprod` at the timestep
the UNet was told (DPM++ Karras steps at sigmas between training timesteps and tells the UNet the rounded
t, so there x0_pred is the one that rounded t implies).

`branch` continues a trace from step k with another CFG scale, prompt or sampler. (comparison.py runs one
seed over several samplers; animation.py exports a trace's frames.)
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipelines.core.call import PreparedCall, encoder_texts, prepare
from pipelines.core.denoiser import Denoiser, encoded_prompts, size_ids
from pipelines.core.guidance import uses_cfg
from pipelines.core.loop import run_steps
from pipelines.core.samplers import STOCHASTIC, edm_refusal, is_edm
from pipelines.core.transformers import check_unet_model, is_transformer
from pipelines.explorer.flow_trace import branch_flow_trace, record_flow_trace
from pipelines.explorer.trace import Trace, TraceStep, predicted_x0
from pipelines.models.manager import ModelManager
from pipelines.tasks.txt2img import Txt2ImgRequest

# What a branch may change. Size, seed and step count stay: the branch continues the same latents.
BRANCH_FIELDS: tuple[str, ...] = ("prompt", "negative_prompt", "sampler", "guidance_scale", "guidance_rescale")
# Samplers that cannot take over mid-schedule: PNDM's PLMS warm-up assumes the start of the schedule.
NOT_RESTARTABLE = frozenset({"PNDM"})


# ----------------------------------------------------------------------------- recording


def record_trace(models: ModelManager, request: Txt2ImgRequest, *, stop: threading.Event | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> Trace:
    """Generate `request` as Generator does, recording every step. `on_step(done, total)` reports progress;
    a set `stop` ends the run at the next step (the trace is then partial and `stopped`). A flow-matching
    transformer's run is recorded from its own pipeline (flow_trace.py)."""
    if models.current is not None and is_transformer(models.current.pipeline):
        check_one_image(request)
        return record_flow_trace(models, request, stop=stop, on_step=on_step)
    run = prepare_one_image(models, request)
    return _record(run, stop=stop, on_step=on_step)


def prepare_one_image(models: ModelManager, request: Txt2ImgRequest) -> PreparedCall:
    """Generator's preparation (`prepare`, pipelines/core/call.py), checked for the one image a trace records."""
    check_one_image(request)
    check_unet_model(models.current, "The Diffusion Explorer's step-by-step trace")
    if models.current is not None and is_edm(models.current.scheduler_config):
        raise ValueError(edm_refusal("The Diffusion Explorer's step-by-step trace (x̂_0 from ᾱ_t)",
                                     "compare its samplers below, or generate in Text-to-Image"))
    return prepare(models, request)


def check_one_image(request: Txt2ImgRequest) -> None:
    if not isinstance(request, Txt2ImgRequest):
        raise ValueError(f"The explorer records text-to-image runs (a Txt2ImgRequest) but received "
                         f"{type(request).__name__}.")
    if request.speculative:
        raise ValueError("The step-by-step trace records one model call per step, and DDPM speculative verifies "
                         "several steps per call: follow it round by round in the \"Speculative sampling\" panel "
                         "below, or record with DDPM (the same law, one call per step).")
    if request.batch_size != 1 or request.batch_count != 1:
        raise ValueError(f"The explorer records one image at a time, but batch_size is {request.batch_size} "
                         f"and batch_count is {request.batch_count}; set both to 1.")


def initial_noise(run: PreparedCall) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The pipeline's own initial noise (prepare_latents' randn_tensor call) from Generator's CPU generator.

    We draw it here and pass it as `latents=` so the recorder knows x_T; the generator, advanced by the
    same draw, goes on to the pipeline for stochastic samplers, exactly as in Generator.
    """
    generators = run.generators(0)
    return run.initial_noise(generators), generators


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


class _Recorder:
    """Listens to one denoising run and builds a TraceStep per loop iteration.

    The UNet hook fires inside an iteration, the step-end callback at its end; the latents that
    callback receives are x_t of the next iteration.
    """

    def __init__(self, *, first_latents: Callable[[], torch.Tensor], alphas_cumprod: torch.Tensor,
                 prediction_type: str, stop: threading.Event | None, on_step, total: int | None = None,
                 offset: int = 0):
        self.steps: list[TraceStep] = []
        self.stopped = False
        self.unet_calls = 0
        self.evaluations = 0          # UNet calls times their batch: a batched CFG call is 2 evaluations
        self._first_latents = first_latents
        self._alphas_cumprod = alphas_cumprod.detach().cpu().double()
        self._prediction_type = prediction_type
        self._stop, self._on_step, self._total, self._offset = stop, on_step, total, offset
        self._latents: torch.Tensor | None = None
        self._seen: tuple | None = None

    @contextmanager
    def listening(self, unet):
        handle = unet.register_forward_hook(self._unet_hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def _unet_hook(self, module, args, kwargs, output):
        if self._latents is None:
            self._latents = _cpu(self._first_latents())
        model_input = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        prediction = output[0] if isinstance(output, tuple) else output.sample
        # With CFG the batch is [uncond, cond] of the same x_t: keep the first copy of the input
        self._seen = (_cpu(model_input[:1]), float(timestep), _cpu(prediction))
        self.unet_calls += 1
        self.evaluations += prediction.shape[0]

    def step_end(self, pipe, index: int, timestep, tensors: dict) -> dict:
        model_input, unet_timestep, prediction = self._seen
        self.steps.append(self._make_step(model_input, unet_timestep, prediction, _cpu(tensors["noise_pred"])))
        self._latents = _cpu(tensors["latents"])
        if self._on_step is not None:
            self._on_step(self._offset + len(self.steps), self._total or self._offset + pipe.num_timesteps)
        if self._stop is not None and self._stop.is_set():
            self.stopped = True
            pipe._interrupt = True
        return {}

    def _make_step(self, model_input, timestep: float, prediction, guided) -> TraceStep:
        x_t = self._latents
        if torch.equal(model_input, x_t):
            # variance preserving: the UNet sees x_t itself, at the abar of its timestep
            input_scale = 1.0
            alpha_cumprod = float(self._alphas_cumprod[round(timestep)])
        else:
            # sigma samplers: the UNet sees x / sqrt(sigma^2 + 1); that scale is sqrt(abar)
            x64 = x_t.double()
            input_scale = float((model_input.double() * x64).sum() / x64.square().sum())
            alpha_cumprod = input_scale ** 2
        uncond, cond = prediction.chunk(2) if prediction.shape[0] == 2 else (None, prediction)
        x0 = predicted_x0(x_t.float() * input_scale, guided, alpha_cumprod=alpha_cumprod,
                          prediction_type=self._prediction_type)
        return TraceStep(timestep=timestep, latents=x_t, input_scale=input_scale, alpha_cumprod=alpha_cumprod,
                         x0_pred=x0, eps_cond=cond, eps_uncond=uncond, eps_guided=guided)


def _recorder_for(run: PreparedCall, *, first_latents, stop, on_step, total=None, offset=0) -> _Recorder:
    scheduler = run.pipeline.scheduler
    return _Recorder(first_latents=first_latents, alphas_cumprod=scheduler.alphas_cumprod,
                     prediction_type=scheduler.config.get("prediction_type", "epsilon"), stop=stop,
                     on_step=on_step, total=total, offset=offset)


def _record(run: PreparedCall, *, stop, on_step, switches: dict[int, Callable] | None = None) -> Trace:
    """Run the pipeline with the recorder attached; `switches[k](pipe)` runs before iteration k."""
    pipeline = run.pipeline
    noise, generators = initial_noise(run)
    # x_T as prepare_latents makes it from the noise we pass
    recorder = _recorder_for(run, first_latents=lambda: noise.to(run.device) * pipeline.scheduler.init_noise_sigma,
                             stop=stop, on_step=on_step)

    def step_end(pipe, index, timestep, tensors):
        outputs = recorder.step_end(pipe, index, timestep, tensors)
        if switches and index + 1 in switches:
            outputs.update(switches[index + 1](pipe))
        return outputs

    with recorder.listening(pipeline.unet):
        latents = run(0, generators=generators, latents=noise, callback=step_end, expose=("noise_pred",))
    return _finish(run, recorder.steps, latents, stopped=recorder.stopped)


def _finish(run: PreparedCall, steps: list[TraceStep], latents: torch.Tensor, *, stopped: bool, **extra) -> Trace:
    pipeline = run.pipeline
    final_image = run.decode(latents)[0]
    notes = list(run.notes)
    if stopped:
        notes.append(f"Stopped after {len(steps)} step(s); the final image is the unfinished latent decoded.")
    extra.setdefault("settings", [(0, run.request)])
    return Trace(request=run.request, steps=steps, final_latents=_cpu(latents), final_image=final_image,
                 prediction_type=pipeline.scheduler.config.get("prediction_type", "epsilon"),
                 vae=weakref.ref(pipeline.vae), stopped=stopped, notes=notes, **extra)


# ----------------------------------------------------------------------------- branching


def branch(models: ModelManager, trace: Trace, at_step: int, changes: dict, *,
           stop: threading.Event | None = None, on_step: Callable[[int, int], None] | None = None) -> Trace:
    """Continue `trace` from its x_t at step `at_step` with changed settings (keys in BRANCH_FIELDS).

    Same sampler (CFG, prompt, negative prompt, guidance rescale changed): the run is replayed from the
    seed with the trace's settings (a branch's too, switch by switch) and switched at step `at_step`
    inside diffusers' loop, through callback_on_step_end (new `_guidance_scale`, new `prompt_embeds`).
    Replaying rebuilds the sampler's history (DPM++ and UniPC are multistep), so a branch without
    changes reproduces the trace bit for bit.

    Other sampler (or a trace in which another sampler already took over): the new sampler takes over
    from the recorded x_t at its own step nearest to that noise level, starting fresh (multistep
    samplers warm up again with lower-order steps); x_t is carried over in the variance-preserving
    frame. A stochastic new sampler draws its noise from the seed restarted at the branch.

    A flow-matching transformer's trace is continued by its family's own pipeline (flow_trace.py).
    """
    # 1. Check inputs
    unknown = sorted(set(changes) - set(BRANCH_FIELDS))
    if unknown:
        raise ValueError(f"A branch can change {', '.join(BRANCH_FIELDS)} but received {', '.join(unknown)}.")
    if isinstance(at_step, bool) or not isinstance(at_step, (int, np.integer)) or not 0 <= at_step < trace.num_steps:
        raise ValueError(f"`at_step` has to be a whole number from 0 to {trace.num_steps - 1} (a step this trace "
                         f"recorded) but is {at_step!r}.")
    at_step = int(at_step)
    request = replace(trace.request, **changes)          # validates the new values
    changed = {key: value for key, value in changes.items() if getattr(trace.request, key) != value}
    replay = request.sampler == trace.request.sampler and trace.replayable
    if request.sampler in NOT_RESTARTABLE and not replay and at_step > 0:
        raise ValueError(f"{request.sampler} cannot take over mid-way: its warm-up assumes the start of the "
                         "schedule. Branch to another sampler, or branch at step 0.")
    current_vae = models.pipeline("txt2img").vae if models.current is not None else None
    if trace.vae is None or trace.vae() is None or trace.vae() is not current_vae:
        raise ValueError("The model has changed since this trace was recorded; record again to branch it.")
    details = {"branched_at": at_step, "changes": changed,
               "settings": [(k, settings) for k, settings in trace.settings if k < at_step] + [(at_step, request)]}

    if is_transformer(models.current.pipeline):          # flow matching: the family's own pipeline continues it
        return branch_flow_trace(models, trace, request, at_step, details, stop=stop, on_step=on_step)
    # 2. Before the first step a branch is a new recording from the same seed
    if at_step == 0:
        result = _record(prepare_one_image(models, request), stop=stop, on_step=on_step)
        result.branched_at, result.changes = at_step, changed
        return result
    if replay:
        return _replay(models, request, details, stop=stop, on_step=on_step)
    return _take_over(models, trace, request, at_step, details, stop=stop, on_step=on_step)


def _switch(models: ModelManager, run: PreparedCall, before: Txt2ImgRequest,
            after: Txt2ImgRequest) -> Callable[[Any], dict]:
    """A step-end action that turns the running loop from `before`'s settings to `after`'s."""
    pipeline = run.pipeline
    old_cfg, new_cfg = uses_cfg(pipeline, before.guidance_scale), uses_cfg(pipeline, after.guidance_scale)
    replaced = {}
    if (after.prompt, after.negative_prompt) != (before.prompt, before.negative_prompt) or old_cfg != new_cfg:
        texts = encoder_texts(models, after)[0]   # the embeddings the new prompt names, loaded and expanded
        embeddings, pooled, note = encoded_prompts(pipeline, after, run.device, cfg=new_cfg, texts=texts)
        replaced["prompt_embeds"] = embeddings
        if pooled is not None:     # SDXL: its pooled text too, and the size ids in as many rows
            replaced |= {"add_text_embeds": pooled,
                         "add_time_ids": size_ids(pipeline.unet, pooled, after.height, after.width)}
        if note:
            run.notes.append(note)

    def switch(pipe) -> dict:
        # The loop reads these through do_classifier_free_guidance / guidance_scale / guidance_rescale
        pipe._guidance_scale = after.guidance_scale
        pipe._guidance_rescale = after.guidance_rescale
        return dict(replaced)

    return switch


def _replay(models, request: Txt2ImgRequest, details: dict, *, stop, on_step) -> Trace:
    """Rerun from the seed with the first settings, switching at every later step the plan names."""
    plan = details["settings"]
    run = prepare_one_image(models, plan[0][1])
    switches = {step: _switch(models, run, before, after) for (_, before), (step, after) in zip(plan, plan[1:])}
    result = _record(run, stop=stop, on_step=on_step, switches=switches)
    result.request, result.settings = request, plan
    result.branched_at, result.changes = details["branched_at"], details["changes"]
    return result


def _take_over(models, trace: Trace, request: Txt2ImgRequest, at_step: int, details: dict, *,
               stop, on_step) -> Trace:
    """The new sampler continues from trace.steps[at_step] with our own short loop (diffusers' loop, step 7)."""
    run = prepare_one_image(models, request)
    pipeline, scheduler, device = run.pipeline, run.pipeline.scheduler, run.device
    origin = trace.steps[at_step]

    # 1. The new sampler's schedule, entered at its first-order step nearest to the recorded timestep
    scheduler.set_timesteps(request.steps, device=device)
    timesteps = scheduler.timesteps
    candidates = range(0, len(timesteps), scheduler.order)
    start = min(candidates, key=lambda i: (abs(float(timesteps[i]) - origin.timestep), -i))
    if abs(float(timesteps[start]) - origin.timestep) > 1.0:
        run.notes.append(f"{request.sampler}'s nearest step is at t = {float(timesteps[start]):.1f}, not at "
                         f"t = {origin.timestep:.1f}: its schedule differs, so it takes over there.")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    if request.sampler in STOCHASTIC:
        run.notes.append(f"{request.sampler} draws fresh noise from seed {request.seed} restarted at the branch.")

    # 2. Carry x_t over in the variance-preserving frame: the new sampler's input scale undoes its own frame
    model_input = origin.model_input.to(device=device, dtype=pipeline.unet.dtype)
    with torch.no_grad():
        scale = scheduler.scale_model_input(torch.ones_like(model_input), timesteps[start])
    latents = model_input / scale

    # 3. Prompts, guidance and the step's extra arguments, as the pipeline prepares them
    denoiser = Denoiser(run)

    # 4. Denoising loop over the remaining timesteps, one explicit step at a time; the recorder's step end
    #    stops it at the next step when `stop` is set, as it stops diffusers' loop in `_record`
    remaining = timesteps[start:]
    start_latents = latents
    recorder = _recorder_for(run, first_latents=lambda: start_latents, stop=stop, on_step=on_step,
                             total=at_step + len(remaining), offset=at_step)

    def step(index, t, latents):
        result = denoiser.step(latents, t)
        return result.latents, {"noise_pred": result.prediction.eps_guided}

    def step_end(pipe, index, t, tensors):
        return recorder.step_end(pipe, start + index, t, tensors)

    with recorder.listening(pipeline.unet):
        latents = run_steps(run, remaining, start_latents, step, callback=step_end)
    return _finish(run, trace.steps[:at_step] + recorder.steps, latents, stopped=recorder.stopped,
                   replayable=False, **details)
