"""LoRA training on the flow-matching transformers (SD 3.x, Flux.1, Flux 2, Sana), as diffusers'
`train_dreambooth_lora_sd3.py`, `_flux.py`, `_flux2.py` and `_sana.py` train them, on the loaded model, as a job of
the studio's device worker:

1. Data: each image centre-cropped to the model's side (its mirror image too, for flips) and encoded once by the
   frozen VAE (the posterior mean, shifted and scaled as the model reads it); each caption (with the trigger word
   in front) encoded once by the frozen text encoders, and the empty caption, for caption dropout.
2. What trains: a peft LoRA on the transformer's attention (the image and the text stream's projections), B zero
   and A Gaussian, so at step 0 the model is unchanged.
3. Each step: x_0 a batch of latents, eps ~ N(0, I), t from the logit-normal density (SD 3's paper: sigmoid of a
   standard normal), shifted as the model's schedule shifts it (its `shift`; Flux: the resolution's `mu`); the
   forward process x_t = (1 − t)·x_0 + t·eps, in the space the transformer sees (Flux 2: its normalised 2×2
   patches); the transformer predicts the velocity; the loss is
   ‖(eps − x_0) − v_θ(x_t, t)‖². AdamW with a linear warm-up, then cosine decay. A non-finite loss skips the
   step and halves the learning rate.
4. The file: `models/lora/<name>.safetensors` in diffusers' format (the family's own `save_lora_weights`), which
   plain diffusers loads with `load_lora_weights` and the studio by its prompt tag; then its effect: the sample
   prompts at fixed seeds before and after.

Between steps queued generations run (a generation in between sees the model without the LoRA that trains), and
Stop saves what has trained. DreamBooth (a LoRA on the identifier's images) adds the class images the model draws
itself (class_images.py) and their loss times `prior_loss_weight`, as diffusers' scripts' `--with_prior_preservation`.
A checkpoint (the LoRA and AdamW's moments) is kept every `checkpoint_every` steps under the run's folder, and a run
with the same settings, data and base model resumes from it. Not here yet, as the UNet loop has them: several
processes (DDP), textual inversion and a LoRA on the text encoders.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.core.families import family_of_pipeline
from pipelines.core.images import fit_image, image_to_tensor
from pipelines.core.transformer_call import text_encoder_layers
from pipelines.core.transformers import DEFAULT_DISTILLED_GUIDANCE, flux2_to_packed
from pipelines.core.vae import encode
from pipelines.training.checkpoint import (
    base_model_identity,
    fingerprint,
    remove_checkpoint,
    resume,
    save_checkpoint,
)
from pipelines.training.class_images import class_image_folder, class_images, draw_image, report_and_yield
from pipelines.training.request import (
    EFFECT_THRESHOLD,
    LossPoint,
    Samples,
    TrainingRequest,
    TrainingResult,
    TrainingStopped,
    TrainingWarning,
)

FLOW_TRAINING_FAMILIES = ("SD 3.x", "Flux", "Flux 2", "Sana")
MAX_NAN_STRIKES = 5
# diffusers' SD 3 and Flux LoRA scripts' default layers: both streams' attention projections
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out"]
# Flux 2's single-stream blocks fuse theirs (with the MLP's input) into `to_qkv_mlp_proj`, and their `to_out` is one
# layer (the double blocks' a list): diffusers' Flux 2 script trains those too
FLUX2_TARGETS = (r".*(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|to_qkv_mlp_proj)"
                 r"|single_transformer_blocks\.\d+\.attn\.to_out)")
# Sana's linear self-attention and its cross-attention (`attn1`, `attn2`): q, k, v (diffusers' Sana script's) and out
SANA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# The steps Flux 2's time shift is fitted for in training (its pipeline's default; the shift grows with fewer)
FLUX2_SHIFT_STEPS = 50


def train_transformer_lora(models, model, request: TrainingRequest, job, *, cache_dir: Path) -> TrainingResult:
    """Steps 1 to 4 of the module's docstring, on the held model (pipelines/training/loop.py `train` calls it)."""
    pipeline = model.pipeline
    family = family_of_pipeline(pipeline)
    transformer = pipeline.transformer
    device, adapter = pipeline._execution_device, "training_" + request.name.replace(".", "_").replace("-", "_")
    side, base = min(model.native_side or 512, 1024), base_model_identity(model)   # (before any adapter is on)
    # 1. Data (DreamBooth's class images drawn first, with no adapter on), and the samples before
    folder = class_image_folder(cache_dir, base, request.class_prompt, side)
    prior = _class_latents(models, model, request, job, folder, side) if request.method == "dreambooth" else []
    latents = _latents(pipeline, request.images, request.prompts(), request.image_repeats(), request.flip, side)
    texts = _texts(pipeline, family, [*request.prompts(), *([request.class_prompt] if prior else [])], device)
    before = _draw(pipeline, model, request, request.samples(), side) if request.sample_every else []
    if before:
        job.emit(Samples(0, request.samples(), before))
    # 2. The LoRA (from this run's last checkpoint, where there is one: same settings, data, model and layers)
    run_dir, identity = cache_dir / request.name, fingerprint(request, base)
    parameters = _add_lora(transformer, adapter, request,
                           {"Flux 2": FLUX2_TARGETS, "Sana": SANA_TARGETS}.get(family, TARGETS))
    weights, warnings, strikes = _AdapterWeights(transformer, adapter), _unused_settings(request, family), 0
    try:
        optimizer = torch.optim.AdamW(parameters, lr=request.learning_rate, weight_decay=1e-2)
        identity |= {"lora": weights.layout()}
        start = _resumed(run_dir, identity, request, weights, optimizer, job, warnings)
        generator = torch.Generator().manual_seed(request.seed + start)
        step, loss_value, started, learning_rate = start, float("nan"), time.perf_counter(), request.learning_rate
        stopped, comparison = job.stop.is_set(), {}
        while step < request.steps and not stopped:
            # 3. One step (DreamBooth: plus the class rows' loss, weighted)
            rate = learning_rate * request.learning_rate_factor(step)
            for group in optimizer.param_groups:
                group["lr"] = rate
            loss = _loss(pipeline, family, model.scheduler_config, request, latents, texts, generator)
            if prior:
                loss = loss + request.prior_loss_weight * _loss(pipeline, family, model.scheduler_config, request,
                                                                prior, texts, generator)
            loss.backward()
            gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
            if not torch.isfinite(loss) or not all(torch.isfinite(gradient).all() for gradient in gradients):
                optimizer.zero_grad(set_to_none=True)
                learning_rate, strikes = learning_rate / 2, strikes + 1
                if strikes > MAX_NAN_STRIKES:
                    raise ValueError(f"The loss kept turning non-finite ({strikes} steps in a row); nothing was "
                                     "saved. Lower the learning rate or check the images.")
                warnings.append(f"Step {step}: the loss or a gradient was not finite; step skipped, learning rate "
                                "halved.")
            else:
                strikes = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step, loss_value = step + 1, float(loss.detach())
                seconds = time.perf_counter() - started
                job.emit(LossPoint(step, loss_value, rate, seconds))
                job.report(step, request.steps, f"loss {loss_value:.4f} · {(step - start) / seconds:.2f} steps/s")
                if step % request.checkpoint_every == 0 or step == request.steps:
                    save_checkpoint(run_dir, identity, weights, optimizer, step)
            if job.checkpoint():          # a generation ran in between, without this LoRA: put it back on
                _train_mode(transformer, adapter)
            stopped = job.stop.is_set()
        if step == start:
            raise TrainingStopped("Stopped before the first step; nothing was written.")
        # 4. The file, then the effect (DreamBooth: the identifier against its class, at the same seeds)
        transformer.eval()
        path = _save(pipeline, transformer, adapter, models.lora_dir, request.name)
        after = _draw(pipeline, model, request, request.samples(), side) if before else []
        if prior:
            comparison = {prompt: _draw(pipeline, model, request, [prompt] * 2, side)
                          for prompt in (request.prompts()[0], request.class_prompt)}
    finally:
        transformer.delete_adapters(adapter)
        transformer.eval()
    if not stopped:
        remove_checkpoint(run_dir)
    return _result(model, request, path=path, steps=step, loss=loss_value, before=before, after=after,
                   stopped=stopped, warnings=warnings, comparison=comparison)


def _result(model, request: TrainingRequest, *, path: Path, steps: int, loss: float, before: list, after: list,
            stopped: bool, warnings: list[str], comparison: dict) -> TrainingResult:
    """The run's result, with its effect: the samples' mean change from before to after (said when it is small)."""
    effect = float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                            for a, b in zip(after, before)])) if after else 0.0
    if after and effect < EFFECT_THRESHOLD:
        warnings.append(f"This training barely changes the images (mean change {effect:.2f} of 255 on the sample "
                        "prompts): train longer, raise the learning rate, or use more distinctive images.")
    return TrainingResult(path=path, steps=steps, final_loss=loss, effect=effect, moved=effect >= EFFECT_THRESHOLD,
                          feature_distance_before=None, feature_distance_after=None, before=before, after=after,
                          stopped=stopped, warnings=warnings, base_model=model.name, method=request.method,
                          comparison=comparison)


class _AdapterWeights:
    """The training adapter's weights, as checkpoint.py saves and loads a method's (`state`, `load_state`)."""

    def __init__(self, transformer, adapter: str):
        self.transformer, self.adapter = transformer, adapter

    def state(self) -> dict[str, torch.Tensor]:
        return {name: parameter for name, parameter in self.transformer.named_parameters()
                if f".{self.adapter}." in name}

    def layout(self) -> str:
        """Its layers and shapes, in the order AdamW holds them: a checkpoint of another layout is another run's."""
        names = ",".join(f"{name}:{tuple(parameter.shape)}" for name, parameter in self.state().items())
        return hashlib.sha256(names.encode()).hexdigest()[:16]

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, parameter in self.state().items():
                parameter.copy_(state[name].to(parameter.device, parameter.dtype))


def _resumed(run_dir: Path, identity: dict, request: TrainingRequest, weights, optimizer, job,
             warnings: list[str]) -> int:
    """The step this run starts at: its last checkpoint's (the LoRA and AdamW's moments loaded), or 0, said why
    when a checkpoint there is another run's."""
    start, note = resume(run_dir, identity, request.steps, weights, optimizer)
    if note:
        warnings.append(note)
        job.emit(TrainingWarning(0, note))
    if start:
        warnings.append(f"Resumed at step {start} from {run_dir}.")
    return start


def _unused_settings(request: TrainingRequest, family: str) -> list[str]:
    """What the UNet loop does with a request that this loop does not, said once at the start."""
    unused = [what for what, used in (
        ("aspect-ratio buckets (square centre crops instead)", request.bucketing),
        ("min-SNR weighting (flow matching draws t from the logit-normal density instead)", request.min_snr_gamma),
        ("a noise offset", request.noise_offset), ("samples between checkpoints (before and after only)",
                                                  request.sample_every and request.sample_every < request.steps))
        if used]
    return [f"On {family}, this training runs without: {'; '.join(unused)}."] if unused else []


def _latents(pipeline, images: list, captions: list[str], repeats: list[int], flip: bool,
             side: int) -> list[tuple[str, list[torch.Tensor]]]:
    """Each image's caption and latents (and its mirror's, for flips), repeated as asked: (1, C, h, w) each."""
    examples, device = [], pipeline._execution_device
    with torch.no_grad():
        for image, caption, times in zip(images, captions, repeats):
            fitted = fit_image(image.convert("RGB"), side, side)
            views = [fitted, fitted.transpose(0)] if flip else [fitted]   # 0: FLIP_LEFT_RIGHT
            encoded = [encode(pipeline.vae, image_to_tensor(view)).float().to(device) for view in views]
            examples += [(caption, encoded)] * times
    return examples


def _class_latents(models, model, request: TrainingRequest, job, folder: Path, side: int) -> list:
    """DreamBooth's class images (class_images.py: drawn by the model itself, cached in `folder`), as latents
    captioned with the class prompt. Between two images queued generations run, and Stop stops."""
    pictures = class_images(model.pipeline, model.scheduler_config, folder=folder, class_prompt=request.class_prompt,
                            count=request.class_images, side=side, report=report_and_yield(job, models),
                            arguments=_arguments(model.pipeline))
    return _latents(model.pipeline, pictures, [request.class_prompt] * len(pictures), [1] * len(pictures),
                    request.flip, side)


def _texts(pipeline, family: str, captions: list[str], device) -> dict[str, dict]:
    """Each caption's (and the empty caption's) text conditioning, as the family's pipeline encodes it."""
    with torch.no_grad():
        return {text: _encode(pipeline, family, text, device) for text in dict.fromkeys([*captions, ""])}


def _encode(pipeline, family: str, text: str, device) -> dict:
    if family == "Flux 2":
        embeddings, text_ids = pipeline.encode_prompt(prompt=text, device=device,
                                                      text_encoder_out_layers=text_encoder_layers(pipeline))
        return {"encoder_hidden_states": embeddings, "txt_ids": text_ids}
    if family == "Flux":
        embeddings, pooled, text_ids = pipeline.encode_prompt(prompt=text, prompt_2=text, device=device)
        return {"encoder_hidden_states": embeddings, "pooled_projections": pooled, "txt_ids": text_ids}
    if family == "Sana":        # with the instruction its pipeline puts before a prompt (not the empty negative)
        instruction = inspect.signature(type(pipeline).__call__).parameters["complex_human_instruction"].default \
            if text else None
        embeddings, mask, _, _ = pipeline.encode_prompt(prompt=text, do_classifier_free_guidance=False, device=device,
                                                        complex_human_instruction=instruction)
        return {"encoder_hidden_states": embeddings, "encoder_attention_mask": mask}
    embeddings, _, pooled, _ = pipeline.encode_prompt(prompt=text, prompt_2=text, prompt_3=text, device=device,
                                                      do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeddings, "pooled_projections": pooled}


def _add_lora(transformer, adapter: str, request: TrainingRequest, targets) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    if adapter in (getattr(transformer, "peft_config", None) or {}):
        transformer.delete_adapters(adapter)
    transformer.requires_grad_(False)
    with torch.random.fork_rng():           # A's Gaussian from the seed; the global RNG is left alone
        torch.manual_seed(request.seed)
        transformer.add_adapter(LoraConfig(r=request.rank, lora_alpha=request.alpha, init_lora_weights="gaussian",
                                           target_modules=targets), adapter_name=adapter)
    parameters = [parameter for name, parameter in transformer.named_parameters() if f".{adapter}." in name]
    for parameter in parameters:             # trained in fp32 whatever the model's dtype
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    _train_mode(transformer, adapter)
    return parameters


def _train_mode(transformer, adapter: str) -> None:
    transformer.enable_adapters()
    transformer.set_adapter(adapter)
    transformer.train()


def _loss(pipeline, family: str, scheduler_config: dict, request: TrainingRequest, latents: list, texts: dict,
          generator: torch.Generator) -> torch.Tensor:
    """One batch's flow-matching loss: ‖(eps − x_0) − v_θ((1 − t)·x_0 + t·eps, t)‖²."""
    rows = torch.randint(len(latents), (request.batch_size,), generator=generator).tolist()
    flips = torch.randint(2, (request.batch_size,), generator=generator).tolist()
    x0 = torch.cat([latents[row][1][flip % len(latents[row][1])] for row, flip in zip(rows, flips)])
    captions = [latents[row][0] for row in rows]       # each image's own caption
    dropped = (torch.rand(request.batch_size, generator=generator) < request.caption_dropout).tolist()
    text = {key: torch.cat([texts["" if drop else caption][key] for caption, drop in zip(captions, dropped)])
            for key in ("encoder_hidden_states", "pooled_projections", "encoder_attention_mask") if key in texts[""]}
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    u = torch.sigmoid(torch.randn(request.batch_size, generator=generator))      # logit-normal
    t = _shifted(u, scheduler_config, x0, flux2=family == "Flux 2").to(x0.device)
    if family == "Flux 2":              # the flow runs on the transformer's normalised, packed patches
        x0, ids = flux2_to_packed(pipeline, x0)
        noise = noise.reshape(x0.shape)                # (i.i.d.: only its arrangement changes)
    t_ = t.view(-1, *[1] * (x0.dim() - 1))
    x_t = (1 - t_) * x0 + t_ * noise
    transformer = pipeline.transformer
    dtype = transformer.dtype
    if family == "Flux 2":
        batch = x_t.shape[0]
        guidance = torch.full((batch,), DEFAULT_DISTILLED_GUIDANCE, device=x0.device) \
            if transformer.config.guidance_embeds else None
        prediction = transformer(hidden_states=x_t.to(dtype), timestep=t, guidance=guidance,
                                 encoder_hidden_states=text["encoder_hidden_states"].to(dtype),
                                 txt_ids=texts[""]["txt_ids"].expand(batch, -1, -1), img_ids=ids,
                                 return_dict=False)[0]
    elif family == "Flux":
        from diffusers import FluxPipeline

        batch, channels, height, width = x_t.shape
        guidance = torch.full((batch,), DEFAULT_DISTILLED_GUIDANCE, device=x0.device) \
            if transformer.config.guidance_embeds else None
        packed = transformer(
            hidden_states=FluxPipeline._pack_latents(x_t.to(dtype), batch, channels, height, width), timestep=t,
            guidance=guidance, encoder_hidden_states=text["encoder_hidden_states"].to(dtype),
            pooled_projections=text["pooled_projections"].to(dtype), txt_ids=texts[""]["txt_ids"],
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x0.device, dtype),
            return_dict=False)[0]
        factor = pipeline.vae_scale_factor
        prediction = FluxPipeline._unpack_latents(packed, height * factor, width * factor, factor)
    elif family == "Sana":
        prediction = transformer(x_t.to(dtype), encoder_hidden_states=text["encoder_hidden_states"].to(dtype),
                                 encoder_attention_mask=text["encoder_attention_mask"],
                                 timestep=t * 1000 * transformer.config.timestep_scale, return_dict=False)[0]
        if transformer.config.out_channels // 2 == x0.shape[1]:       # a learned variance's half, as it draws
            prediction = prediction.chunk(2, dim=1)[0]
    else:
        prediction = transformer(hidden_states=x_t.to(dtype), timestep=t * 1000,
                                 encoder_hidden_states=text["encoder_hidden_states"].to(dtype),
                                 pooled_projections=text["pooled_projections"].to(dtype), return_dict=False)[0]
    return (prediction.float() - (noise - x0)).square().mean()


def _shifted(u: torch.Tensor, scheduler_config: dict, x0: torch.Tensor, flux2: bool = False) -> torch.Tensor:
    """The model's time shift of t in (0, 1): shift·t / (1 + (shift − 1)·t); with dynamic shifting (Flux), the
    shift e^mu that the image's length in patches gives, as its pipeline computes it (Flux 2's: fitted to the length
    and FLUX2_SHIFT_STEPS steps)."""
    config = dict(scheduler_config)
    if config.get("use_dynamic_shifting") and flux2:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
        shift = math.exp(compute_empirical_mu(image_seq_len=x0.shape[-1] * x0.shape[-2] // 4,
                                              num_steps=FLUX2_SHIFT_STEPS))
    elif config.get("use_dynamic_shifting"):
        length = x0.shape[-1] * x0.shape[-2] // 4
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        shift = math.exp(low + (high - low) * (length - base) / (top - base))
    else:
        shift = float(config.get("shift", config.get("flow_shift", 1.0)))
    return shift * u / (1 + (shift - 1) * u)


def _save(pipeline, transformer, adapter: str, folder: Path, name: str) -> Path:
    """The LoRA in diffusers' format, written whole under a temporary name and then moved into place."""
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().to("cpu", torch.float16).contiguous()
             for key, value in get_peft_model_state_dict(transformer, adapter_name=adapter).items()}
    if not all(torch.isfinite(value).all() for value in state.values()):
        raise ValueError("The trained LoRA holds non-finite weights; nothing was written. Lower the learning rate.")
    partial = f".{name}.safetensors.partial"        # not listed as a LoRA if a crash leaves it
    # its alpha in the file's metadata, which diffusers' loader reads (without it, it takes alpha = rank)
    type(pipeline).save_lora_weights(folder, transformer_lora_layers=state, weight_name=partial,
                                     transformer_lora_adapter_metadata=transformer.peft_config[adapter].to_dict())
    path = folder / f"{name}.safetensors"
    os.replace(folder / partial, path)
    return path


def _arguments(pipeline) -> dict:
    """What else the family's pipeline is called with to draw as the studio does: Flux.1 without true CFG, Flux 2
    with the text-encoder layers its transformer reads, Sana at the size asked for."""
    family = family_of_pipeline(pipeline)
    if family == "Flux 2":
        return {"text_encoder_out_layers": text_encoder_layers(pipeline)}
    return {"Flux": {"true_cfg_scale": 1.0}, "Sana": {"use_resolution_binning": False}}.get(family, {})


def _draw(pipeline, model, request: TrainingRequest, prompts: list[str], side: int) -> list:
    """`prompts` at fixed seeds (the request's seed + their place), with the model's own sampler."""
    last = pipeline.scheduler
    try:
        with torch.no_grad():
            return [draw_image(pipeline, model.scheduler_config, prompt, side=side, seed=request.seed + number,
                               arguments=_arguments(pipeline), steps=request.sample_steps)
                    for number, prompt in enumerate(prompts)]
    finally:
        pipeline.scheduler = last
