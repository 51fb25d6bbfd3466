"""Training a LoRA on the loaded model: a background job on the device worker.

The loop is diffusers' `train_text_to_image_lora.py` in substance, read top to bottom in `train_lora`:

1. Data (train_data.py): the images cropped around their centre to the model's native size; each caption
   prefixed with the trigger word. Latents (the VAE's posterior mean, and its mirror image for flips) and
   text embeddings are computed once: the VAE and the text encoder are frozen.
2. The LoRA: peft adapters on the UNet's attention projections (to_q, to_k, to_v, to_out), B
   zero-initialised and A Gaussian, so at step 0 the model is unchanged.
3. Each step: a batch of latents x_0, noise eps (plus an optional noise offset), t uniform; the forward
   process x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; the UNet's eps-prediction; the loss
   || eps - eps_theta ||^2, weighted by min-SNR (Hang et al. 2023): min(SNR_t, gamma) / SNR_t;
   AdamW with a linear warm-up, then cosine decay; captions dropped (to "") at a rate, for CFG.
4. NaN guard: a non-finite loss or gradient skips the step and halves the learning rate; a third in a
   row rolls back to the last checkpoint. A file with a non-finite tensor is never written.
5. Every `checkpoint_every` steps a checkpoint (checkpoint.py), so a restarted studio resumes the same run
   (same settings, data and base model); every `sample_every` steps, images at fixed prompts and seeds;
   between steps, `job.checkpoint()` lets a generation in, and a paused training waits there.
6. The LoRA is saved as `models/lora/<name>.safetensors` in the kohya / A1111 key format (export.py);
   then its effect is measured: the same prompts and seeds at weight 0 and 1, with the model's own
   sampler and no adapter but the trained one, so that it is the only difference; and, when the caller
   gives an `EffectScore` (the studio: the emoji judge, judge.py), how far each set is from the images.

The whole run holds the base model (`ModelManager.hold`): loading another model, unloading it or changing
the memory mode, which would otherwise run at its checkpoints, are refused while it trains, naming it.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.core.images import to_pil
from pipelines.core.samplers import make_scheduler, model_default_sampler
from pipelines.core.vae import decode
from pipelines.training.checkpoint import base_model_identity, fingerprint, remove_checkpoint, resume, save_checkpoint
from pipelines.lora.export import save_kohya
from pipelines.training.data import TrainingData, prepare_data
from pipelines.training.request import (EFFECT_THRESHOLD, EffectScore, LoraTrainingRequest, LoraTrainingResult,
                                          LossPoint, Samples, TrainingWarning)

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
NAN_STRIKES_BEFORE_ROLLBACK = 3
MAX_ROLLBACKS = 5
SAMPLE_STEPS = 20


@dataclass
class _Run:
    """What one run keeps fixed from start to end: the model it holds and where its files go."""
    request: LoraTrainingRequest
    job: object
    model: object                # the LoadedModel held for the whole run
    adapter: str                 # the peft adapter's name on the UNet
    run_dir: Path                # its checkpoints
    lora_dir: Path               # where the finished file goes
    fingerprint: dict            # what a checkpoint must match to be resumed (checkpoint.py)

    @property
    def pipeline(self):
        return self.model.pipeline

    @property
    def unet(self):
        return self.model.pipeline.unet


def train_lora(models, request: LoraTrainingRequest, job, *, cache_dir: Path,
               score: EffectScore | None = None) -> LoraTrainingResult:
    """Run (or resume) the training described by `request`, as job `job`, on the device thread; `score`
    measures the samples against the training images at the end (None: not measured, and the result says so)."""
    with models.hold(f"the LoRA training {request.name!r}") as model:
        _check_model(model)
        models.use_loras([])      # no other LoRA may shape the cached embeddings or the "before" samples
        run = _Run(request=request, job=job, model=model, adapter="training_" + re.sub(r"\W", "_", request.name),
                   run_dir=cache_dir / request.name, lora_dir=models.lora_dir,
                   fingerprint=fingerprint(request, base_model_identity(model)))   # before any adapter is added

        # 1. Data, cached once
        data = prepare_data(model.pipeline, request, model.native_side or 512)

        # 2. The LoRA: B zero, A Gaussian, on the attention projections (removed again however the run ends)
        parameters = add_training_adapter(run.unet, request, run.adapter)
        try:
            return _train(run, parameters, data, score)
        finally:
            run.unet.eval()
            for parameter in run.unet.parameters():
                parameter.requires_grad_(False)
            _remove_adapter(run.unet, run.adapter)
            if getattr(run.unet, "peft_config", None):    # loaded LoRAs stay off until a prompt names them
                run.unet.disable_adapters()


def _check_model(model) -> None:
    if model.pipeline.unet.config.addition_embed_type is not None:
        raise ValueError(f"LoRA training here takes SD 1.x/2.x-style models; {model.name} (SDXL and kin) is not "
                         "supported yet.")
    if model.scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"LoRA training here learns an eps-prediction; {model.name} predicts "
                         f"{model.scheduler_config['prediction_type']}, which it does not support yet.")


def _train(run: _Run, parameters: list, data: TrainingData, score: EffectScore | None) -> LoraTrainingResult:
    """Steps 3 to 6 of the module's docstring."""
    from diffusers import DDPMScheduler

    request, job, unet = run.request, run.job, run.unet
    # the training schedule itself (not the sampler the last generation used): q(x_t | x_0) at any t
    scheduler = DDPMScheduler.from_config(run.model.scheduler_config)
    alphas_cumprod = scheduler.alphas_cumprod.to(data.latents.device)
    generator = torch.Generator().manual_seed(request.seed)
    optimizer = torch.optim.AdamW(parameters, lr=request.learning_rate, weight_decay=1e-2)
    warnings: list[str] = []
    start, note = resume(run.run_dir, run.fingerprint, request.steps, unet, run.adapter, optimizer)
    if note:
        warnings.append(note)
        job.emit(TrainingWarning(0, note))
    if start:
        warnings.append(f"Resumed at step {start} from {run.run_dir}.")
        generator.manual_seed(request.seed + start)
    before = sample_images(run, trained=False) if request.sample_every else []
    if before:
        job.emit(Samples(0, request.samples(), before))

    step, strikes, rollbacks, learning_rate, loss_value, stopped = start, 0, 0, request.learning_rate, float("nan"), False
    started = time.perf_counter()
    _train_mode(unet, run.adapter)
    while step < request.steps:
        # 3. One step
        rate = learning_rate * _schedule(step, request)
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = _loss(unet, scheduler, alphas_cumprod, request, generator, data)
        loss.backward()

        # 4. NaN guard
        if not (torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in parameters)):
            optimizer.zero_grad(set_to_none=True)
            strikes, learning_rate = strikes + 1, learning_rate / 2
            message = f"Step {step}: the loss or a gradient was not finite; step skipped, learning rate halved."
            if strikes >= NAN_STRIKES_BEFORE_ROLLBACK:
                rollbacks += 1
                if rollbacks > MAX_ROLLBACKS:
                    raise ValueError(f"The loss kept turning non-finite ({rollbacks} roll-backs); nothing was "
                                     "saved. Lower the learning rate or check the images.")
                step, _ = resume(run.run_dir, run.fingerprint, request.steps, unet, run.adapter, optimizer)
                if step == 0:           # no checkpoint yet: start the LoRA and the optimiser afresh
                    parameters = add_training_adapter(unet, request, run.adapter)
                    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
                    _train_mode(unet, run.adapter)
                strikes = 0
                message += f" {NAN_STRIKES_BEFORE_ROLLBACK} in a row: rolled back to step {step}."
            warnings.append(message)
            job.emit(TrainingWarning(step, message))
            if stopped := _yield_to_others(job, unet, run.adapter):
                break
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        strikes, step, loss_value = 0, step + 1, float(loss.detach())
        seconds = time.perf_counter() - started
        job.emit(LossPoint(step, loss_value, rate, seconds))
        speed = (step - start) / seconds
        job.report(step, request.steps, f"loss {loss_value:.4f} · {speed:.2f} steps/s · "
                                        f"about {(request.steps - step) / speed:.0f} s to go")

        # 5. Checkpoints, samples, and room for other jobs
        if step % request.checkpoint_every == 0 or step == request.steps:
            save_checkpoint(run.run_dir, run.fingerprint, unet, run.adapter, optimizer, step)
        if request.sample_every and step % request.sample_every == 0 and step < request.steps:
            job.emit(Samples(step, request.samples(), sample_images(run, trained=True)))
            _train_mode(unet, run.adapter)
        if stopped := _yield_to_others(job, unet, run.adapter):
            break
    unet.eval()

    # 6. The file, then its effect
    return _finish(run, data, score, step=step, loss=loss_value, stopped=stopped, before=before,
                   warnings=warnings)


def _loss(unet, scheduler, alphas_cumprod, request: LoraTrainingRequest, generator,
          data: TrainingData) -> torch.Tensor:
    """One batch's loss: x_t from the forward process q(x_t | x_0), the eps-prediction's squared error,
    weighted by min-SNR: min(SNR_t, gamma) / SNR_t."""
    device, dtype, size = data.latents.device, data.latents.dtype, request.batch_size
    index = torch.randint(0, len(data.pictures), (size,), generator=generator)
    flip = torch.rand(size, generator=generator) < 0.5 if request.flip else torch.zeros(size, dtype=torch.bool)
    x0 = torch.where(flip.view(-1, 1, 1, 1).to(device), data.mirrored[index], data.latents[index])
    noise = torch.randn(x0.shape, generator=generator).to(device, dtype)
    if request.noise_offset:
        noise = noise + request.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1,
                                                           generator=generator).to(device, dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (size,), generator=generator).to(device)
    drop = torch.rand(size, generator=generator) < request.caption_dropout       # learn the unconditional too
    context = torch.where(drop.view(-1, 1, 1).to(device), data.empty.expand_as(data.embeddings[index]),
                          data.embeddings[index])
    x_t = scheduler.add_noise(x0, noise, t)
    prediction = unet(x_t, t, encoder_hidden_states=context).sample
    loss = (prediction.float() - noise.float()).square().mean(dim=(1, 2, 3))
    if request.min_snr_gamma:
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        loss = loss * torch.clamp(snr, max=request.min_snr_gamma) / snr
    return loss.mean()


def _finish(run: _Run, data: TrainingData, score: EffectScore | None, *, step: int, loss: float, stopped: bool,
            before: list, warnings: list[str]) -> LoraTrainingResult:
    """The file (a finished run needs its checkpoint no more), then the LoRA's effect on the samples."""
    request = run.request
    path = save_kohya(run.lora_dir, request, run.model, run.unet, run.adapter, step)
    if not stopped:
        remove_checkpoint(run.run_dir)
    after = sample_images(run, trained=True)
    before = before or sample_images(run, trained=False)
    effect = float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                            for a, b in zip(after, before)]))
    if score is not None:
        distance_before, distance_after = score(data.pictures, before, after)
    else:
        distance_before = distance_after = None
        warnings.append("No feature distance to the training images was measured: the training was given no "
                        "effect score.")
    if effect < EFFECT_THRESHOLD:
        warnings.append(f"This LoRA barely changes the images (mean change {effect:.2f} of 255 on the sample "
                        "prompts): train longer, raise the learning rate, or use more distinctive images.")
    return LoraTrainingResult(path=path, steps=step, final_loss=loss, effect=effect, moved=effect >= EFFECT_THRESHOLD,
                              feature_distance_before=distance_before, feature_distance_after=distance_after,
                              before=before, after=after, stopped=stopped, warnings=warnings,
                              base_model=run.model.name)


def _yield_to_others(job, unet, adapter: str) -> bool:
    """Let queued generations run (and wait while paused); if one ran, put the training adapter back in
    charge, whatever it switched. Returns whether the job was asked to stop."""
    if job.checkpoint():
        _train_mode(unet, adapter)
    return job.stop.is_set()


def _train_mode(unet, adapter: str) -> None:
    """The adapter in training on, alone (a generation in between may have switched it off or others on)."""
    unet.enable_adapters()
    unet.set_adapters([adapter])
    unet.train()


def add_training_adapter(unet, request: LoraTrainingRequest, adapter: str) -> list:
    """A fresh peft LoRA on the UNet's attention (B zero, A Gaussian: peft's "gaussian" init), the only
    parameters that train; returns them."""
    from peft import LoraConfig

    _remove_adapter(unet, adapter)
    with torch.random.fork_rng():          # A's Gaussian comes from the seed, and the global RNG is left alone
        torch.manual_seed(request.seed)
        unet.add_adapter(LoraConfig(r=request.rank, lora_alpha=request.alpha, init_lora_weights="gaussian",
                                    target_modules=TARGET_MODULES), adapter_name=adapter)
    unet.enable_adapters()
    unet.set_adapters([adapter])
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(adapter in name)
    parameters = [parameter for name, parameter in unet.named_parameters() if adapter in name]
    for parameter in parameters:        # trained in fp32 whatever the model's dtype: AdamW's eps is 0 in fp16
        parameter.data = parameter.data.float()
    return parameters


def _schedule(step: int, request: LoraTrainingRequest) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < request.warmup_steps:
        return (step + 1) / request.warmup_steps
    progress = (step - request.warmup_steps) / max(1, request.steps - request.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _remove_adapter(unet, adapter: str) -> None:
    if adapter in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters([adapter])


def sample_images(run: _Run, *, trained: bool) -> list:
    """The sample prompts at fixed seeds, with the adapter in training on (`trained`) or off. Whatever a
    generation in between left on the pipeline, the samples are made the same way, so that before and after
    differ by the trained adapter alone: with the model's own sampler (not the last generation's), and with
    every other adapter off, the text encoder's (a loaded LoRA's text-encoder part) included."""
    pipeline, unet, config = run.pipeline, run.unet, run.model.scheduler_config
    pipeline.disable_lora()          # every adapter of the UNet and of the text encoder
    if trained:
        unet.enable_adapters()
        unet.set_adapters([run.adapter])
    unet.eval()
    last_sampler = pipeline.scheduler
    images = []
    try:
        with torch.no_grad():
            for number, prompt in enumerate(run.request.samples()):
                # a fresh scheduler for each: a multistep sampler keeps state from the previous image
                pipeline.scheduler = make_scheduler(model_default_sampler(config), config)
                latents = pipeline(prompt, num_inference_steps=SAMPLE_STEPS, output_type="latent",
                                   generator=torch.Generator().manual_seed(run.request.seed + number)).images
                images.append(to_pil(decode(pipeline.vae, latents)[0])[0])
    finally:
        pipeline.scheduler = last_sampler
    return images


__all__ = [
    "EffectScore",
    "LoraTrainingRequest",
    "LoraTrainingResult",
    "LossPoint",
    "Samples",
    "TrainingWarning",
    "add_training_adapter",
    "sample_images",
    "train_lora",
]
