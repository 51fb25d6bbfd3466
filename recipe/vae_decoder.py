"""Fine-tune the embedded VAE's decoder for true colours, keeping its latent space (the encoder is frozen, so the
UNet, the ControlNets and the draft, which all live in that space, need no retraining).

Loss: the pixels' squared error (what PSNR measures) plus the chroma's, weighted up (YCbCr's Cb and Cr: the grey-
blue purples are a chroma the old L1 decoder let slide). Trained on the recipe's own art (Noto, Twemoji), measured
every `--eval-every` steps on art it never saw (Facebook's set, recipe/vae_eval.py). Resumable: a checkpoint in
.cache/vae-decoder/ every `--checkpoint-every` steps; run it again to go on.

    python -m recipe.vae_decoder --steps 4000 --threads 1          # in the background while you work
    python -m recipe.vae_decoder --export OUT_FOLDER               # the model folder with the fine-tuned VAE
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "vae-decoder"
SHIPPED = ROOT / "assets" / "emoji-ldm"
# RGB -> YCbCr's chroma rows (BT.601), on [-1, 1] pixels
CHROMA = torch.tensor([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def chroma(pixels: torch.Tensor) -> torch.Tensor:
    return torch.einsum("cr,brhw->bchw", CHROMA.to(pixels), pixels)


def loss_of(decoded: torch.Tensor, target: torch.Tensor, chroma_weight: float) -> torch.Tensor:
    return (decoded - target).square().mean() + chroma_weight * (chroma(decoded) - chroma(target)).square().mean()


def _images(packages, count: int | None, seed: int) -> np.ndarray:
    from recipe import data
    from recipe.vae_eval import sample_images

    if count is not None:
        return sample_images(packages, count=count, seed=seed)
    records, _ = data.load_records(data.fetch(packages=packages), packages=packages)
    return data.load_images(records)


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def _latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])


def learning_rate_factor(step: int, steps: int, warmup: int) -> float:
    """A linear warm-up over `warmup` steps, then half a cosine down to 0 at `steps`."""
    return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


def train(args) -> None:
    from diffusers import AutoencoderKL

    from recipe import data
    from recipe.vae_eval import hue_error, psnr, reconstruct

    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(SHIPPED, subfolder="vae")
    cache = WORK / "data.pt"
    if cache.exists():
        stored = torch.load(cache)
        pixels, latents = stored["pixels"], stored["latents"]
    else:
        pixels = _pixels(_images(data.PACKAGES, None, 0))
        latents = _latents(vae.eval(), pixels)
        torch.save({"pixels": pixels, "latents": latents}, cache)
    held_out = _images(data.HELD_OUT_PACKAGES, 256, 1)
    trained = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    vae.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    checkpoint, step, log = WORK / "checkpoint.pt", 0, []
    if checkpoint.exists():
        state = torch.load(checkpoint)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        step, log = state["step"], state["log"]
    generator = torch.Generator().manual_seed(args.seed + step)

    def evaluate() -> dict:
        vae.eval()
        rebuilt = reconstruct(vae, held_out)
        vae.train()
        return {"step": step, "psnr_db": round(psnr(held_out, rebuilt), 2),
                "hue_error_deg": round(hue_error(held_out, rebuilt), 2)}
    if not log:
        log.append(evaluate())
        print(json.dumps(log[-1]), flush=True)
    vae.train()
    started = time.perf_counter()
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * learning_rate_factor(step, args.steps, args.warmup)
        index = torch.randint(0, len(pixels), (args.batch_size,), generator=generator)
        decoded = vae.decode(latents[index]).sample
        loss = loss_of(decoded, pixels[index], args.chroma_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            log.append(evaluate() | {"loss": round(loss.item(), 5),
                                     "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(log[-1]), flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            partial = checkpoint.with_suffix(".partial")
            torch.save({"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "log": log},
                       partial)
            os.replace(partial, checkpoint)


def export(folder: Path) -> None:
    """The embedded model folder with the fine-tuned VAE in place of the shipped one."""
    from diffusers import AutoencoderKL

    state = torch.load(WORK / "checkpoint.pt")
    vae = AutoencoderKL.from_pretrained(SHIPPED, subfolder="vae")
    vae.load_state_dict(state["vae"])
    shutil.copytree(SHIPPED, folder, dirs_exist_ok=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    print(f"{folder}: the VAE of step {state['step']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=4e-4, help="the peak learning rate (cosine decay to 0)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--chroma-weight", type=float, default=4.0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", type=Path, default=None, help="write the model folder with this VAE, and stop")
    args = parser.parse_args(argv)
    if args.export:
        export(args.export)
    else:
        train(args)


if __name__ == "__main__":
    main()
