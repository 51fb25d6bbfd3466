"""Train the embedded emoji model from scratch, in four stages:

1. data -> a VAE with 8 latent channels ("wide") -> cached latents -> text encoder + UNet on them;
2. narrow to Stable Diffusion's 4 latent channels by projecting onto the latents' top 4 principal
   directions (recipe/project.py), then fine-tune the VAE decoder on the narrowed latents;
3. fine-tune text encoder + UNet on the narrowed latents, from stage 1's projected weights;
4. export a diffusers Stable Diffusion folder.

    python -m recipe.train all                           # everything, resuming where it stopped
    python -m recipe.train vae --vae-steps 1500          # one stage (data vae unet narrow decoder unet4 export)
    python -m recipe.train export --out assets/emoji-ldm # write the diffusers folder

Every stage is seeded and resumable: checkpoints and loss logs live in .cache/train/ and a
second run continues from the last checkpoint. Nothing here is needed at run time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from recipe import architecture, data, project

WORK = Path(__file__).resolve().parent.parent / ".cache" / "train"
WIDE_UNET_STEPS = 5000  # stage 1's length in the shipped run (constant learning rate after warm-up)
CAPTION_DROPOUT = 0.15  # empty prompt this often, so classifier-free guidance has an unconditional model


def _save_atomically(state: dict, path: Path) -> None:
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def export_model(model, out: Path, record_name: str, record: dict) -> Path:
    """`model` saved in fp16 safetensors with a JSON record of how it was made, as folder `out`: written beside it
    and renamed into place, so `out` is never half written."""
    partial = out.with_name(out.name + ".partial")
    model.half().save_pretrained(partial, safe_serialization=True)
    (partial / record_name).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def clipped_step(optimizer, loss: torch.Tensor, parameters) -> None:
    """One optimiser step on `loss`, gradients clipped to norm 1 (every stage of the recipe trains so)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()


def _log(name: str, step: int, **values: float) -> None:
    with open(WORK / f"{name}.log", "a") as log:
        log.write(json.dumps({"step": step, "time": round(time.time(), 1), **values}) + "\n")


def _images_tensor(cache: Path) -> tuple[torch.Tensor, list[data.EmojiRecord], list[str]]:
    records, class_names = data.load_records(cache)
    stored = WORK / "images.npy"
    if stored.exists():
        images = np.load(stored)
    else:
        images = data.load_images(records)
        np.save(stored, images)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, records, class_names


# ----------------------------------------------------------------------------------------------
# Stage 1: the VAE. L1 reconstruction plus SD's tiny KL weight, on random 32x32 crops (the
# encoder and decoder are convolutional with no attention, so crops train them 4x cheaper).
# ----------------------------------------------------------------------------------------------
def train_vae(pixels: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 1e-3) -> None:
    checkpoint = WORK / "vae.pt"
    vae = architecture.vae(architecture.WIDE_LATENT_CHANNELS)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
    else:
        torch.manual_seed(0)
    if step >= steps:
        return
    progress = tqdm(total=steps, initial=step, desc="vae")
    vae.train()
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr * _cosine_to_zero(step, steps)
        batch = pixels[torch.randint(len(pixels), (batch_size,))]
        if step % 4 != 3:  # three steps in four on crops, one on whole images
            y, x = np.random.randint(0, 33, size=2)
            batch = batch[:, :, y:y + 32, x:x + 32]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        l1 = (reconstruction - batch).abs().mean()
        kl = posterior.kl().mean() / batch[0].numel()
        loss = l1 + 1e-6 * kl
        clipped_step(optimizer, loss, vae.parameters())
        step += 1
        progress.update(1)
        progress.set_postfix(l1=f"{l1.item():.4f}")
        if step % 50 == 0:
            _log("vae", step, l1=l1.item(), kl=kl.item())
        if step % 250 == 0 or step == steps:
            _save_atomically({"vae": vae.state_dict(), "optimizer": optimizer.state_dict(),
                              "step": step, "rng": torch.get_rng_state()}, checkpoint)
    progress.close()


@torch.no_grad()
def reconstruction_psnr(vae, pixels: torch.Tensor, latent_means: torch.Tensor, count: int = 512) -> float:
    """PSNR of decoding the first `count` images' latent means, in dB (pixels in [-1, 1])."""
    reconstruction = torch.cat([vae.decode(m).sample for m in latent_means[:count].split(128)])
    return -10 * math.log10(((reconstruction.clamp(-1, 1) - pixels[:count]) / 2).pow(2).mean().item())


def load_vae():
    """The stage-1 (wide, 8-channel) VAE."""
    vae = architecture.vae(architecture.WIDE_LATENT_CHANNELS)
    vae.load_state_dict(torch.load(WORK / "vae.pt", weights_only=False)["vae"])
    return vae.eval().requires_grad_(False)


def cache_latents(pixels: torch.Tensor) -> dict:
    """Encode every image once with the frozen VAE: the UNet stage never touches pixels."""
    stored = WORK / "latents.pt"
    vae_step = torch.load(WORK / "vae.pt", weights_only=False)["step"]
    if stored.exists():
        cached = torch.load(stored)
        if cached["vae_step"] == vae_step:
            return cached
    vae = load_vae()
    means, stds = [], []
    with torch.no_grad():
        for chunk in pixels.split(256):
            posterior = vae.encode(chunk).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    psnr = reconstruction_psnr(vae, pixels, mean)
    cached = {"mean": mean, "std": std, "vae_step": vae_step,
              # SD's convention: scale latents to unit variance before diffusion.
              "scaling_factor": 1.0 / mean.std().item(), "psnr": psnr}
    torch.save(cached, stored)
    print(f"latents {tuple(mean.shape)}, scaling_factor {cached['scaling_factor']:.4f}, "
          f"VAE reconstruction PSNR {psnr:.2f} dB")
    return cached


# ----------------------------------------------------------------------------------------------
# Text encoder + UNet, epsilon prediction, min-SNR(5) loss weights, EMA weights kept. Run twice:
# stage 1 on the wide latents from scratch, stage 3 on the narrowed latents from stage 1's weights.
# ----------------------------------------------------------------------------------------------
def train_unet(latents: dict, records: list[data.EmojiRecord], tokenizer, steps: int, *,
               checkpoint: Path, latent_channels: int, start_from: dict | None = None, decay_steps: int = 0,
               batch_size: int = 64, lr: float = 5e-4, warmup: int = 300, ema_decay: float = 0.999) -> None:
    """Train to `steps`, resuming from `checkpoint`. A new run starts from `start_from` ({"unet":
    state, "text_encoder": state}) when given, else from seeded random weights."""
    name = checkpoint.stem
    unet = architecture.unet(latent_channels)
    text_encoder = architecture.text_encoder(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    noise_scheduler = architecture.scheduler()
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    step = 0
    caption_rng = random.Random(0)
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        ema = state["ema"]
        step = state["step"]
        torch.set_rng_state(state["rng"])
        caption_rng.setstate(state["caption_rng"])
    else:
        torch.manual_seed(1)
        if start_from is not None:
            unet.load_state_dict(start_from["unet"])
            text_encoder.load_state_dict(start_from["text_encoder"])
        ema = {k: v.detach().clone() for k, v in _named_weights(unet, text_encoder).items()}
    if step >= steps:
        return

    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-gamma weighting (Hang et al. 2023)
    scaling_factor = latents["scaling_factor"]
    progress = tqdm(total=steps, initial=step, desc=name)
    unet.train()
    text_encoder.train()
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr * _unet_lr_factor(step, steps, warmup, decay_steps)
        index = torch.randint(len(records), (batch_size,))
        captions = ["" if caption_rng.random() < CAPTION_DROPOUT else data.caption(records[i], caption_rng)
                    for i in index.tolist()]
        tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
        x0 = (latents["mean"][index] + latents["std"][index] * torch.randn_like(latents["std"][index]))
        x0 = x0 * scaling_factor
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        # Forward diffusion, closed form: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
        x_t = noise_scheduler.add_noise(x0, noise, t)
        encoder_hidden_states = text_encoder(tokens)[0]
        predicted_noise = unet(x_t, t, encoder_hidden_states).sample
        per_sample = F.mse_loss(predicted_noise, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        clipped_step(optimizer, loss, parameters)
        step += 1
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for weight_name, weight in _named_weights(unet, text_encoder).items():
                ema[weight_name].lerp_(weight.detach(), 1 - decay)
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if step % 50 == 0:
            _log(name, step, loss=loss.item(), mse=per_sample.mean().item())
        if step % 250 == 0 or step == steps:
            _save_atomically({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                              "optimizer": optimizer.state_dict(), "ema": ema, "step": step,
                              "rng": torch.get_rng_state(), "caption_rng": caption_rng.getstate()},
                             checkpoint)
    progress.close()


def ema_weights(checkpoint: Path) -> dict:
    """A UNet checkpoint's EMA weights, as {"unet": state, "text_encoder": state, "step": n}."""
    state = torch.load(checkpoint, weights_only=False)
    split = {"unet": {}, "text_encoder": {}, "step": state["step"]}
    for key, value in state["ema"].items():
        part, _, name = key.partition(".")
        split[part][name] = value
    # integer buffers (position ids) are not averaged: take them from the live weights
    for part in ("unet", "text_encoder"):
        split[part] = {**{k: v for k, v in state[part].items() if not v.dtype.is_floating_point}, **split[part]}
    return split


def _cosine_to_zero(step: int, steps: int) -> float:
    """The VAE stages' learning-rate factor: half a cosine from 1 at step 0 to 0 at `steps`."""
    return 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))


def _unet_lr_factor(step: int, steps: int, warmup: int, decay_steps: int) -> float:
    """Linear warm-up, constant, then a cosine cool-down to 10% over the last `decay_steps` steps.

    The factor depends only on the step and the run's planned length, so a resumed run follows
    the same schedule as an uninterrupted one (as long as --unet-steps is not changed once the
    cool-down has begun).
    """
    factor = min(1.0, (step + 1) / warmup)
    into_decay = step - (steps - decay_steps)
    if decay_steps > 0 and into_decay > 0:
        factor *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(into_decay / decay_steps, 1.0)))
    return factor


def _named_weights(unet, text_encoder) -> dict[str, torch.Tensor]:
    weights = {f"unet.{k}": v for k, v in unet.state_dict(keep_vars=True).items()}
    weights.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict(keep_vars=True).items()})
    return {k: v for k, v in weights.items() if v.dtype.is_floating_point}


# ----------------------------------------------------------------------------------------------
# Stage 2: narrow the wide model to 4 latent channels (recipe/project.py), then fine-tune the
# VAE decoder on the narrowed latents. The encoder stays the exact projection, so the projected
# cached latents stay valid for stage 3.
# ----------------------------------------------------------------------------------------------
def narrow(wide_latents: dict) -> dict:
    """Project the cached wide latents and write the narrowed VAE's starting point (once)."""
    stored = WORK / "latents4.pt"
    if stored.exists():
        return torch.load(stored, weights_only=False)
    directions = project.principal_directions(wide_latents["mean"])
    mean, std = project.project_latents(wide_latents["mean"], wide_latents["std"], directions["P"])
    narrowed = {"mean": mean, "std": std, "vae_step": wide_latents["vae_step"],
                # the wide scaling factor: the kept directions' signal reaches the UNet unchanged
                "scaling_factor": wide_latents["scaling_factor"], **directions}
    torch.save(narrowed, stored)
    print(f"narrowed latents to {tuple(mean.shape)}; the 4 kept directions hold "
          f"{directions['variance_kept']:.2%} of the variance")
    return narrowed


def train_decoder(pixels: torch.Tensor, latents: dict, steps: int, batch_size: int = 32, lr: float = 3e-4) -> None:
    """Fine-tune the narrowed VAE's decoder (post_quant_conv + decoder) on the projected latents."""
    checkpoint = WORK / "vae4.pt"
    vae = architecture.vae()
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        vae.load_state_dict(state["vae"])
        step = state["step"]
    else:
        project.narrow_vae(load_vae(), vae, latents["P"], latents["mu"])
        state = None
    vae.requires_grad_(False)
    trained = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    else:
        torch.manual_seed(2)
    if step == 0:
        _log("vae4", 0, psnr=reconstruction_psnr(vae, pixels, latents["mean"]))
    if step >= steps:
        return
    progress = tqdm(total=steps, initial=step, desc="decoder")
    vae.train()
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr * _cosine_to_zero(step, steps)
        index = torch.randint(len(pixels), (batch_size,))
        z = latents["mean"][index] + latents["std"][index] * torch.randn_like(latents["std"][index])
        l1 = (vae.decode(z).sample - pixels[index]).abs().mean()
        clipped_step(optimizer, l1, trained)
        step += 1
        progress.update(1)
        progress.set_postfix(l1=f"{l1.item():.4f}")
        if step % 50 == 0:
            _log("vae4", step, l1=l1.item())
        if step % 250 == 0 or step == steps:
            _save_atomically({"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                              "rng": torch.get_rng_state()}, checkpoint)
    progress.close()


def load_narrow_vae():
    vae = architecture.vae()
    vae.load_state_dict(torch.load(WORK / "vae4.pt", weights_only=False)["vae"])
    return vae.eval().requires_grad_(False)


def narrowed_start(latents: dict) -> dict:
    """Stage 3's starting weights: stage 1's EMA UNet read through the projection, its text encoder."""
    wide = ema_weights(WORK / "unet.pt")
    unet = architecture.unet()
    project.narrow_unet(wide["unet"], unet, latents["P"])
    return {"unet": unet.state_dict(), "text_encoder": wide["text_encoder"], "wide_step": wide["step"]}


# ----------------------------------------------------------------------------------------------
# Stage 4: export the EMA weights as a standard diffusers Stable Diffusion folder (safetensors).
# ----------------------------------------------------------------------------------------------
def export(out: Path, tokenizer_folder: Path, pixels: torch.Tensor, latents: dict, wide_latents: dict,
           use_ema: bool = True) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    checkpoint = WORK / "unet4.pt"
    weights = ema_weights(checkpoint) if use_ema else torch.load(checkpoint, weights_only=False)
    unet = architecture.unet()
    text_encoder = architecture.text_encoder(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    unet.load_state_dict(weights["unet"])
    text_encoder.load_state_dict(weights["text_encoder"])
    vae = load_narrow_vae()
    vae.register_to_config(scaling_factor=latents["scaling_factor"])
    scheduler = DPMSolverMultistepScheduler.from_config(architecture.scheduler().config)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    partial = out.with_name(out.name + ".partial")
    # fp16 files for the UNet and VAE keep the folder under 60 MB; diffusers loads them as fp32 by
    # default. The text encoder stays fp32: transformers would keep fp16 weights as fp16 on load.
    unet.to(torch.float16)
    vae.to(torch.float16)
    pipeline.save_pretrained(partial, safe_serialization=True)
    wide_unet_step = torch.load(WORK / "unet.pt", weights_only=False)["step"]
    vae_step = torch.load(WORK / "vae4.pt", weights_only=False)["step"]
    (partial / "TRAINING.json").write_text(json.dumps({
        "stage1_wide_vae_steps": wide_latents["vae_step"], "stage1_wide_unet_steps": wide_unet_step,
        "stage2_variance_kept": round(latents["variance_kept"], 4), "stage2_decoder_steps": vae_step,
        "stage3_unet_steps": weights["step"], "ema": use_ema,
        "vae_psnr_db": round(reconstruction_psnr(load_narrow_vae(), pixels, latents["mean"]), 2),
        "wide_vae_psnr_db": round(wide_latents["psnr"], 2),
        "recipe": "python -m recipe.train all"}, indent=2))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(partial, out)
    print(f"exported {out}: wide UNet {wide_unet_step} steps, narrowed UNet {weights['step']} steps")


STAGES = ["data", "vae", "unet", "narrow", "decoder", "unet4", "export", "all"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    # The defaults reproduce the shipped weights (assets/emoji-ldm/TRAINING.json records them).
    parser.add_argument("--vae-steps", type=int, default=1500, help="stage 1: the wide VAE")
    parser.add_argument("--wide-unet-steps", type=int, default=WIDE_UNET_STEPS, help="stage 1: the wide UNet")
    parser.add_argument("--decoder-steps", type=int, default=600, help="stage 2: the narrowed VAE's decoder")
    parser.add_argument("--unet-steps", type=int, default=7000, help="stage 3: the narrowed UNet")
    parser.add_argument("--unet-decay-steps", type=int, default=2500,
                        help="stage 3: cosine learning-rate cool-down over its last N steps")
    parser.add_argument("--cache", type=Path, default=data.DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "assets" / "emoji-ldm")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)

    data.fetch(args.cache)
    pixels, records, _ = _images_tensor(args.cache)
    tokenizer_folder = WORK / "tokenizer"
    if not (tokenizer_folder / "vocab.json").exists():
        architecture.build_tokenizer(data.all_caption_words(records), tokenizer_folder)
    run = lambda stage: args.stage in (stage, "all")  # noqa: E731
    if run("vae"):
        train_vae(pixels, args.vae_steps)
    if run("unet"):
        from transformers import CLIPTokenizer
        train_unet(cache_latents(pixels), records, CLIPTokenizer.from_pretrained(tokenizer_folder),
                   args.wide_unet_steps, checkpoint=WORK / "unet.pt",
                   latent_channels=architecture.WIDE_LATENT_CHANNELS)
    if run("narrow") or run("decoder"):
        train_decoder(pixels, narrow(cache_latents(pixels)), args.decoder_steps)
    if run("unet4"):
        from transformers import CLIPTokenizer
        latents = narrow(cache_latents(pixels))
        start = None if (WORK / "unet4.pt").exists() else narrowed_start(latents)
        train_unet(latents, records, CLIPTokenizer.from_pretrained(tokenizer_folder), args.unet_steps,
                   checkpoint=WORK / "unet4.pt", latent_channels=architecture.LATENT_CHANNELS,
                   start_from=start, decay_steps=args.unet_decay_steps)
    if run("export"):
        wide_latents = cache_latents(pixels)
        export(args.out, tokenizer_folder, pixels, narrow(wide_latents), wide_latents)


if __name__ == "__main__":
    main()
