"""The training loop: LoRA, DreamBooth-LoRA and textual inversion on the loaded model, one process (a job on
the studio's device worker) or several (data-parallel under Hugging Face accelerate, pipelines/training/
__main__.py). Read top to bottom in `train`; it is diffusers' `train_text_to_image_lora.py`,
`train_dreambooth_lora.py` and `textual_inversion.py` in substance:

1. Data (data.py): the images in aspect-ratio buckets; each caption prefixed with the trigger word (textual
   inversion: the embedding's name). Latents (the VAE's posterior mean, and its mirror image for flips) and
   text embeddings are computed once: the VAE is frozen, and so is the text encoder unless it trains.
   DreamBooth adds its class images (class_images.py), drawn by the model itself and cached.
2. What trains (methods.py): a LoRA (B zero, A Gaussian: at step 0 the model is unchanged), or new token
   vectors started from a word's embedding.
3. Each step: a batch of latents x_0, noise eps (plus an optional noise offset), t uniform; the forward
   process x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; the UNet's eps-prediction (or, for a v-prediction
   model such as SD 2.x 768, v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0); the loss || eps - eps_theta ||^2,
   weighted by min-SNR (Hang et al. 2023): min(SNR_t, gamma) / SNR_t (over SNR_t + 1 for v); DreamBooth adds
   the class rows' loss times `prior_loss_weight`. AdamW with a linear warm-up, then cosine decay; captions
   dropped (to "") at a rate, for CFG. Under several processes every process draws the same global batch
   from the seed and trains on its own share of its rows, so the gradient DDP averages is the one-process
   gradient, and the loss curve is the one-process curve.
4. NaN guard: a non-finite loss or gradient skips the step and halves the learning rate; a third in a
   row rolls back to the last checkpoint. A file with a non-finite tensor is never written.
5. Every `checkpoint_every` steps a checkpoint (checkpoint.py), so a restarted studio resumes the same run
   (same settings, data and base model); every `sample_every` steps, images at the sample prompts and fixed
   seeds; between steps, `job.checkpoint()` lets a generation in, and a paused training waits there.
6. The file: a LoRA in `models/lora/<name>.safetensors` (kohya / A1111 keys), or an embedding in
   `models/embeddings/<name>.safetensors`; then its effect: the same prompts and seeds before (weight 0, or
   the initial vectors) and after, with the model's own sampler, so that the training is the only
   difference; and, when the caller gives an `EffectScore` (the studio: the emoji judge, judge.py), how far
   each set is from the images. DreamBooth also draws the identifier's prompt beside the class prompt.

The whole run holds the base model (`ModelManager.hold`): loading another model, unloading it or changing
the memory mode, which would otherwise run at its checkpoints, are refused while it trains, naming it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.core.images import to_pil
from pipelines.core.prompts import prompt_arguments
from pipelines.core.samplers import make_scheduler, model_default_sampler
from pipelines.core.transformers import is_transformer
from pipelines.core.vae import decode
from pipelines.training.checkpoint import base_model_identity, fingerprint, remove_checkpoint, resume, save_checkpoint
from pipelines.training.checks import check_model
from pipelines.training.class_images import class_image_folder, class_images, report_and_yield
from pipelines.training.data import TrainingData, prepare_data
from pipelines.training.edm import MIN_SNR_NOTE, edm_batch, is_edm_schedule, training_schedule
from pipelines.training.flow import train_transformer_lora
from pipelines.training.methods import make_method
from pipelines.training.request import (
    EFFECT_THRESHOLD,
    METHOD_NAMES,
    EffectScore,
    LossPoint,
    Samples,
    TrainingRequest,
    TrainingResult,
    TrainingStopped,
    TrainingWarning,
)

NAN_STRIKES_BEFORE_ROLLBACK = 3
MAX_ROLLBACKS = 5


@dataclass
class _Run:
    """What one run keeps fixed from start to end: the model it holds, where its files go, its processes."""
    request: TrainingRequest
    job: object
    models: object               # the ModelManager (its folders)
    model: object                # the LoadedModel held for the whole run
    adapter: str                 # the peft adapter's name (LoRA and DreamBooth)
    run_dir: Path                # its checkpoints
    fingerprint: dict            # what a checkpoint must match to be resumed (checkpoint.py)
    accelerator: object          # accelerate's Accelerator: one process, or this one of several

    @property
    def pipeline(self):
        return self.model.pipeline

    @property
    def main(self) -> bool:
        """Whether this process writes files and draws samples (the only one, or the first of several)."""
        return self.accelerator.is_main_process


def make_accelerator():
    """accelerate's Accelerator for this process: DDP when launched as several (`accelerate launch`,
    `torchrun`), nothing in between when alone. The studio places its models itself, and a LoRA's frozen
    modules get no gradient, which DDP must be told (`find_unused_parameters`). accelerate's mixed precision
    stays off whatever `accelerate config` set: the trained parameters are fp32 and the frozen model runs in
    the dtype it was loaded in (fp16 on a GPU), with no loss scaler (the NaN guard answers an overflow)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    return Accelerator(device_placement=False, mixed_precision="no",
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def train(models, request: TrainingRequest, job, *, cache_dir: Path, score: EffectScore | None = None,
          accelerator=None) -> TrainingResult:
    """Run (or resume) the training described by `request`, as job `job`, on the device thread; `score`
    measures the samples against the training images at the end (None: not measured, and the result says so)."""
    what = f"the {METHOD_NAMES[request.method]} training {request.name!r}"
    with models.hold(what) as model:
        check_model(models, model, request)
        models.use_loras([])      # no other LoRA may shape the cached embeddings or the "before" samples
        if is_transformer(model.pipeline):      # SD 3.x, Flux: flow matching on their transformer (flow.py)
            return train_transformer_lora(models, model, request, job, cache_dir=cache_dir)
        run = _Run(request=request, job=job, models=models, model=model,
                   adapter="training_" + re.sub(r"\W", "_", request.name), run_dir=cache_dir / request.name,
                   fingerprint=fingerprint(request, base_model_identity(model)),   # before any adapter is added
                   accelerator=accelerator or make_accelerator())
        side = model.native_side or 512

        method = make_method(run)
        try:
            # 1. Data, cached once (textual inversion's tokens first, so the captions read them; DreamBooth's class
            # images drawn with no adapter on)
            method.install()
            data = prepare_data(model.pipeline, request, side, prompts=[method.expand(p) for p in request.prompts()])
            prior = _prior_data(run, cache_dir, side) if request.method == "dreambooth" else None

            # 2. What trains: a LoRA, or the new token's vectors (removed, or kept as trained, however the run ends)
            parameters = method.setup()
            return _train(run, method, parameters, data, prior, score)
        finally:
            method.teardown()


def _prior_data(run: _Run, cache_dir: Path, side: int) -> TrainingData:
    request, model = run.request, run.model
    folder = class_image_folder(cache_dir, run.fingerprint["base_model"], request.class_prompt, side)
    if run.main:               # a generation may run between two, and Stop stops
        class_images(model.pipeline, model.scheduler_config, folder=folder, class_prompt=request.class_prompt,
                     count=request.class_images, side=side, report=report_and_yield(run.job, run.models))
    run.accelerator.wait_for_everyone()           # the other processes read what the first one drew
    pictures = class_images(model.pipeline, model.scheduler_config, folder=folder,
                            class_prompt=request.class_prompt, count=request.class_images, side=side)
    return prepare_data(model.pipeline, request, side, images=pictures, prompts=[request.class_prompt] * len(pictures),
                        repeats=[1] * len(pictures))


def _train(run: _Run, method, parameters: list, data: TrainingData, prior: TrainingData | None,
           score: EffectScore | None) -> TrainingResult:
    """Steps 3 to 6 of the module's docstring."""
    request, job, accelerator = run.request, run.job, run.accelerator
    # the training schedule itself (not the sampler the last generation used): q(x_t | x_0) at any t (an EDM
    # model's: x_σ at its σ levels, edm.py)
    scheduler = training_schedule(run.model.scheduler_config)
    # where the batches are (the execution device: with model offload the UNet waits on the CPU between calls)
    alphas_cumprod = None if is_edm_schedule(scheduler) else scheduler.alphas_cumprod.to(run.pipeline._execution_device)
    generator = torch.Generator().manual_seed(request.seed)
    optimizer = torch.optim.AdamW(parameters, lr=request.learning_rate, weight_decay=1e-2)
    objective = accelerator.prepare(method.objective())
    warnings: list[str] = []
    if alphas_cumprod is None and request.min_snr_gamma:
        warnings.append(MIN_SNR_NOTE)
        job.emit(TrainingWarning(0, MIN_SNR_NOTE))
    start, note = resume(run.run_dir, run.fingerprint, request.steps, method, optimizer)
    if note:
        warnings.append(note)
        job.emit(TrainingWarning(0, note))
    if start:
        warnings.append(f"Resumed at step {start} from {run.run_dir}.")
        generator.manual_seed(request.seed + start)
    before = _samples(run, method, trained=False) if request.sample_every and run.main else []
    if before:
        job.emit(Samples(0, request.samples(), before))

    step, strikes, rollbacks, learning_rate, loss_value = start, 0, 0, request.learning_rate, float("nan")
    stopped = job.stop.is_set()        # pressed while the data or the first samples were prepared: no step
    started = time.perf_counter()
    method.train_mode()
    while step < request.steps and not stopped:
        # 3. One step
        rate = learning_rate * request.learning_rate_factor(step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = _loss(objective, method, scheduler, alphas_cumprod, run, generator, data, prior)
        accelerator.backward(loss)
        loss = accelerator.reduce(loss.detach(), "mean")     # the whole batch's, over every process

        # 4. NaN guard
        if not _finite(loss, parameters):
            optimizer.zero_grad(set_to_none=True)
            strikes, learning_rate = strikes + 1, learning_rate / 2
            message = f"Step {step}: the loss or a gradient was not finite; step skipped, learning rate halved."
            if strikes >= NAN_STRIKES_BEFORE_ROLLBACK:
                rollbacks += 1
                if rollbacks > MAX_ROLLBACKS:
                    raise ValueError(f"The loss kept turning non-finite ({rollbacks} roll-backs); nothing was "
                                     "saved. Lower the learning rate or check the images.")
                step, _ = resume(run.run_dir, run.fingerprint, request.steps, method, optimizer)
                if step == 0:           # no checkpoint yet: start afresh
                    parameters = method.setup()
                    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
                    objective = accelerator.prepare(method.objective())
                strikes = 0
                message += f" {NAN_STRIKES_BEFORE_ROLLBACK} in a row: rolled back to step {step}."
            warnings.append(message)
            job.emit(TrainingWarning(step, message))
            if stopped := _yield_to_others(job, method):
                break
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        strikes, step, loss_value = 0, step + 1, float(loss)
        _report(job, request, step, start, loss_value, rate, time.perf_counter() - started)

        # 5. Checkpoints, samples, and room for other jobs
        _after_step(run, method, optimizer, step)
        if stopped := _yield_to_others(job, method):
            break
    run.pipeline.unet.eval()
    accelerator.wait_for_everyone()

    # 6. The file, then its effect
    return _finish(run, method, data, score, step=step, loss=loss_value, stopped=stopped, before=before,
                   warnings=warnings)


def _report(job, request: TrainingRequest, step: int, start: int, loss: float, rate: float, seconds: float) -> None:
    """The step's loss point, and the status: the loss, the speed and the time left."""
    job.emit(LossPoint(step, loss, rate, seconds))
    speed = (step - start) / seconds
    job.report(step, request.steps, f"loss {loss:.4f} · {speed:.2f} steps/s · "
                                    f"{_time_left((request.steps - step) / speed)} left")


def _after_step(run: _Run, method, optimizer, step: int) -> None:
    """The checkpoint and the samples due at `step` (the first process alone writes and draws)."""
    request = run.request
    if (step % request.checkpoint_every == 0 or step == request.steps) and run.main:
        save_checkpoint(run.run_dir, run.fingerprint, method, optimizer, step)
    if request.sample_every and step % request.sample_every == 0 and step < request.steps and run.main:
        run.job.emit(Samples(step, request.samples(), _samples(run, method, trained=True)))
        method.train_mode()


def _finite(loss: torch.Tensor, parameters: list) -> bool:
    """Whether the loss and every gradient are finite, read from the device once."""
    checks = [torch.isfinite(loss).all()] + [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
    return bool(torch.stack([check.to(loss.device) for check in checks]).all())


def _loss(objective, method, scheduler, alphas_cumprod, run: _Run, generator, data: TrainingData,
          prior: TrainingData | None) -> torch.Tensor:
    """One batch's loss: x_t from the forward process q(x_t | x_0), the eps-prediction's squared error, weighted
    by min-SNR: min(SNR_t, gamma) / SNR_t; with DreamBooth, plus `prior_loss_weight` times the class rows'.
    Every process draws the whole batch alike and computes its own share of the rows; DDP averages the
    gradients of the processes, so each scales its share's sum by their number."""
    request = run.request
    parts = [_batch(data, request, scheduler, generator, weight=1.0)]
    if prior is not None:
        parts.append(_batch(prior, request, scheduler, generator, weight=request.prior_loss_weight))
    count, index = run.accelerator.num_processes, run.accelerator.process_index
    share = request.batch_size // count

    def my_rows(value):
        if isinstance(value, dict):          # SDXL's added conditioning
            return {key: my_rows(item) for key, item in value.items()}
        return value[index * share:(index + 1) * share] if torch.is_tensor(value) else value
    mine = [{key: my_rows(value) for key, value in part.items()} for part in parts]
    if not method.text:
        for part in mine:
            part["input_ids"] = None
    return _weighted(mine, objective(mine), request, alphas_cumprod=alphas_cumprod, processes=count,
                     velocity=scheduler.config.prediction_type == "v_prediction")


def _weighted(parts: list[dict], errors: list[torch.Tensor], request: TrainingRequest, *, alphas_cumprod,
              processes: int, velocity: bool = False) -> torch.Tensor:
    """Σ over the parts of weight · Σ_rows min-SNR-weighted error / batch size, times the processes (DDP averages).
    Min-SNR's weight is min(SNR, γ) / SNR on an eps-prediction's error, min(SNR, γ) / (SNR + 1) on a
    v-prediction's (Hang et al. 2023, as diffusers' scripts weight them)."""
    total = torch.zeros((), device=errors[0].device)
    for part, error in zip(parts, errors):
        t = part["t"]
        if "row_weight" in part:          # an EDM model's rows (edm.py)
            error = error * part["row_weight"]
        if request.min_snr_gamma and alphas_cumprod is not None:
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            error = error * torch.clamp(snr, max=request.min_snr_gamma) / (snr + 1 if velocity else snr)
        total = total + part["weight"] * error.sum() / request.batch_size
    return total * processes


def _batch(data: TrainingData, request: TrainingRequest, scheduler, generator, *, weight: float) -> dict:
    """A whole batch, drawn from `generator`: one bucket's x_0 (mirrored at random), noise, t, the forward
    process's x_t, and the captions (embeddings and token ids; dropped to "" at the caption-dropout rate)."""
    size = request.batch_size
    bucket, index = data.draw(size, generator)
    device, dtype = bucket.latents.device, bucket.latents.dtype
    flip = torch.rand(size, generator=generator) < 0.5 if request.flip else torch.zeros(size, dtype=torch.bool)
    x0 = torch.where(flip.view(-1, 1, 1, 1).to(device), bucket.mirrored[index], bucket.latents[index])
    noise = torch.randn(x0.shape, generator=generator).to(device, dtype)
    if request.noise_offset:
        noise = noise + request.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1,
                                                           generator=generator).to(device, dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (size,), generator=generator).to(device)
    drop = torch.rand(size, generator=generator) < request.caption_dropout       # learn the unconditional too
    context = torch.where(drop.view(-1, 1, 1).to(device), data.empty.expand_as(bucket.embeddings[index]),
                          bucket.embeddings[index])
    input_ids = torch.where(drop.view(-1, 1), data.empty_ids.expand_as(bucket.input_ids[index]),
                            bucket.input_ids[index])
    if is_edm_schedule(scheduler):     # t: the index of a training σ (edm.py)
        batch = edm_batch(scheduler, x0, noise, t)
    else:
        # what the model predicts: eps, or (SD 2.x's v-prediction) v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
        target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else \
            noise
        batch = {"x_t": scheduler.add_noise(x0, noise, t), "t": t, "target": target}
    batch |= {"context": context, "input_ids": input_ids, "weight": weight}
    if bucket.pooled is not None:     # SDXL: the pooled caption, and the bucket's size as its size and crop ids
        pooled = torch.where(drop.view(-1, 1).to(device), data.empty_pooled.expand_as(bucket.pooled[index]),
                             bucket.pooled[index])
        batch["added"] = {"text_embeds": pooled, "time_ids": bucket.time_ids.expand(size, -1).to(device, dtype)}
    return batch


def _finish(run: _Run, method, data: TrainingData, score: EffectScore | None, *, step: int, loss: float,
            stopped: bool, before: list, warnings: list[str]) -> TrainingResult:
    """The file (a finished run needs its checkpoint no more), then the training's effect on the samples."""
    request = run.request
    if step == 0:     # stopped before its first step: an untrained file would replace the one there may be
        raise TrainingStopped(f"Stopped before the first step; nothing was written ({method.path().name}, if there "
                              "is one, is as it was).")
    path = method.path()
    if run.main:
        method.save(step)
        if not stopped:
            remove_checkpoint(run.run_dir)
    run.accelerator.wait_for_everyone()
    result = TrainingResult(path=path, steps=step, final_loss=loss, effect=0.0, moved=False,
                            feature_distance_before=None, feature_distance_after=None, before=before, after=[],
                            stopped=stopped, warnings=warnings, base_model=run.model.name, method=request.method)
    if not run.main:
        return result
    result.after = _samples(run, method, trained=True)
    result.before = before or _samples(run, method, trained=False)
    result.effect = float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                                   for a, b in zip(result.after, result.before)]))
    result.moved = result.effect >= EFFECT_THRESHOLD
    if request.method == "dreambooth":       # the identifier against its class, the same seeds, the LoRA on
        method.use(trained=True)
        result.comparison = {prompt: _draw(run, [prompt] * 2) for prompt in (request.prompts()[0], request.class_prompt)}
    if score is not None:
        result.feature_distance_before, result.feature_distance_after = score(data.pictures, result.before,
                                                                              result.after)
    else:
        warnings.append("No feature distance to the training images was measured: the training was given no "
                        "effect score.")
    if not result.moved:
        warnings.append(f"This training barely changes the images (mean change {result.effect:.2f} of 255 on the "
                        "sample prompts): train longer, raise the learning rate, or use more distinctive images.")
    return result


def _yield_to_others(job, method) -> bool:
    """Let queued generations run (and wait while paused); if one ran, put the training back in charge,
    whatever it switched. Returns whether the job was asked to stop."""
    if job.checkpoint():
        method.train_mode()
    return job.stop.is_set()


def _time_left(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _samples(run: _Run, method, *, trained: bool) -> list:
    """The sample prompts at fixed seeds, trained or not. Whatever a generation in between left on the
    pipeline, the samples are made the same way, so that before and after differ by the training alone: with
    the model's own sampler (not the last generation's), and with every other adapter off."""
    method.use(trained=trained)
    return _draw(run, [method.expand(prompt) for prompt in run.request.samples()])


def _draw(run: _Run, prompts: list[str]) -> list:
    """Each prompt at the seed of its place (the request's seed + its number), with the model's own sampler."""
    pipeline, config = run.pipeline, run.model.scheduler_config
    last_sampler = pipeline.scheduler
    images = []
    try:
        with torch.no_grad():
            for number, prompt in enumerate(prompts):
                # a fresh scheduler for each: a multistep sampler keeps state from the previous image
                pipeline.scheduler = make_scheduler(model_default_sampler(config), config)
                # encoded here as written: an embedding's name is already its run's tokens
                prompts, _ = prompt_arguments(pipeline, prompt, "", pipeline._execution_device, emphasis=False)
                latents = pipeline(**prompts, num_inference_steps=run.request.sample_steps, output_type="latent",
                                   generator=torch.Generator().manual_seed(run.request.seed + number)).images
                images.append(to_pil(decode(pipeline.vae, latents)[0])[0])
    finally:
        pipeline.scheduler = last_sampler
    return images


__all__ = ["EffectScore", "LossPoint", "Samples", "TrainingRequest", "TrainingResult", "TrainingWarning",
           "make_accelerator", "train"]
