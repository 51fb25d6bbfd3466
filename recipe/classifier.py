"""Train the noise-aware classifier for classifier guidance (pipelines/guidance/classifier.py) on the embedded model.

    python -m recipe.classifier                     # train from scratch, evaluate, write assets/emoji-ldm-classifier
    python -m recipe.classifier --resume            # continue from .cache/classifier/checkpoint.pt
    python -m recipe.classifier --steps 200         # a short run (the shipped run: the defaults)

What it learns: p(category | x_t, t) for the emoji categories of recipe/data.py ("food & drink", "flags", ...;
the "component" swatches are not in the records), on the embedded model's noisy latents

    x_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,   t ~ U{0, ..., 999},  eps ~ N(0, I)    (Ho et al. 2020, eq. 4)

with z_0 drawn from the shipped VAE's posterior and scaled by its `scaling_factor`, as recipe/train.py trains the
UNet (the sampler's x_0 estimates are posterior-mean-like, so at t = 0 the held-out images are scored on the
posterior mean, which is what pipelines/core/vae.py's `encode` gives).

- Held out honestly: whole base emoji, 15% of each category's (both art styles and every skin tone go together),
  grouped so that "man pilot" / "woman pilot" / "pilot" and "... facing right" variants fall on one side; the
  emoji of the app's example images (assets/examples) are always held out, so the tests can check the
  classifier on art it never saw.
- Class balance: the categories are very unbalanced (people & body has 57% of the images, mostly skin tones), so
  batches are drawn category-uniformly, then base-emoji-uniformly within the category, then one of that emoji's
  images: every category is seen equally often and no emoji counts five times for its skin tones.
- Augmentation: the horizontal mirror of every image, encoded too (a latent flip is not the VAE's flip), and the
  posterior sample. Tried and left out, as they did not move held-out accuracy (t = 0 and t uniform within 0.02,
  the noise of 297 held-out emoji): moving latents by up to 1 pixel (6000 steps), dropout 0.2 in every block, and
  3000 or 6000 steps instead of 4000.
- AdamW, linear warm-up then cosine decay, gradients clipped at 1, an EMA of the weights (what is shipped, in
  fp16). Checkpoints and the encoded latents live in .cache/classifier/ (never committed).

Reported (and written to CLASSIFIER.json): held-out accuracy at t in {0, 250, 500, 750, 950} and over t uniform
(every 50th timestep), per image and balanced (mean per-category recall, chance 1/9), four noise draws per image.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.guidance.classifier import (
    EMBEDDED_CLASSIFIER,
    RECORD_NAME,
    WEIGHTS_NAME,
    NoiseAwareClassifier,
    load_guidance_classifier,
)
from recipe import architecture, data

ROOT = Path(__file__).resolve().parent.parent
VAE_FOLDER = ROOT / "assets" / "emoji-ldm" / "vae"
WORK = ROOT / ".cache" / "classifier"
CHECKPOINT = WORK / "checkpoint.pt"
LATENTS = WORK / "latents.pt"
REPORTED_TIMESTEPS = (0, 250, 500, 750, 950)
OVERALL_TIMESTEPS = tuple(range(0, 1000, 50))   # "t uniform": every 50th training timestep
EVAL_DRAWS = 4                                   # noise draws per held-out image and timestep
# The app's example images (assets/examples): always held out, so tests can score them as unseen art.
EXAMPLE_EMOJI = ("rainbow", "red apple", "cat face", "left speech bubble", "pilot", "record button", "senegal flag",
                 "woman kneeling facing right", "woman running facing right")


@dataclass(frozen=True)
class Settings:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    ema_decay: float = 0.999
    held_out_fraction: float = 0.15
    seed: int = 0
    widths: tuple = (32, 64, 128)
    blocks_per_level: int = 2
    time_dim: int = 128


# ----------------------------------------------------------------------------------------------
# 1. Data: categories, the held-out split, the latents.
# ----------------------------------------------------------------------------------------------
def categories(records: list[data.EmojiRecord]) -> list[str]:
    """The classes: every category of the records, in the data's own order (Unicode's)."""
    return list(dict.fromkeys(record.category for record in records))


def family(name: str) -> str:
    """Base emoji that are the same picture by another person or facing: held out together."""
    for prefix in ("man ", "woman ", "person "):
        name = name.removeprefix(prefix)
    return name.removesuffix(" facing right")


def held_out_split(records: list[data.EmojiRecord], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) image indices: `fraction` of each category's emoji families at random, plus the example
    images' families; every image of a held-out family (both styles, all skin tones) is held out."""
    families_of: dict[str, list[str]] = {}
    for record in records:
        families_of.setdefault(record.category, [])
        if family(record.name) not in families_of[record.category]:
            families_of[record.category].append(family(record.name))
    rng = random.Random(seed)
    held_out = {family(name) for name in EXAMPLE_EMOJI}
    for names in families_of.values():
        held_out.update(rng.sample(names, round(fraction * len(names))))
    is_held_out = np.array([family(record.name) in held_out for record in records])
    return np.flatnonzero(~is_held_out), np.flatnonzero(is_held_out)


def _vae_fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        digest.update((VAE_FOLDER / name).read_bytes())
    return digest.hexdigest()[:16]


def encoded_latents(records: list[data.EmojiRecord]) -> dict:
    """The shipped VAE's posterior (mean, std) of every image and of its mirror image, scaled as the UNet sees
    latents; encoded once and cached in .cache/classifier/latents.pt."""
    from diffusers import AutoencoderKL

    key = {"vae": _vae_fingerprint(), "images": len(records), "first": str(records[0].image_path),
           "last": str(records[-1].image_path)}
    if LATENTS.exists():
        cached = torch.load(LATENTS)
        if cached["key"] == key:
            return cached
    vae = AutoencoderKL.from_pretrained(VAE_FOLDER, torch_dtype=torch.float32).eval()
    scale = float(vae.config.scaling_factor)
    pixels = torch.from_numpy(data.load_images(records)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    cached = {"key": key, "scaling_factor": scale}
    started = time.perf_counter()
    for name, images in (("", pixels), ("mirrored_", pixels.flip(3))):
        means, stds = [], []
        with torch.no_grad():
            for chunk in images.split(256):
                posterior = vae.encode(chunk).latent_dist
                means.append(posterior.mean * scale)
                stds.append(posterior.std * scale)
        cached[f"{name}mean"], cached[f"{name}std"] = torch.cat(means), torch.cat(stds)
    print(f"Encoded {len(records)} images and their mirrors in {time.perf_counter() - started:.0f} s.")
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save(cached, LATENTS.with_suffix(".partial"))
    os.replace(LATENTS.with_suffix(".partial"), LATENTS)
    return cached


def sampling_weights(records: list[data.EmojiRecord], index: np.ndarray) -> torch.Tensor:
    """P(image) = 1/categories * 1/(the category's emoji) * 1/(the emoji's images): class-balanced sampling."""
    chosen = [records[i] for i in index]
    emoji_of_category: dict[str, set[int]] = {}
    images_of_emoji: dict[int, int] = {}
    for record in chosen:
        emoji_of_category.setdefault(record.category, set()).add(record.class_index)
        images_of_emoji[record.class_index] = images_of_emoji.get(record.class_index, 0) + 1
    return torch.tensor([1 / (len(emoji_of_category) * len(emoji_of_category[r.category])
                              * images_of_emoji[r.class_index]) for r in chosen], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# 2. Training.
# ----------------------------------------------------------------------------------------------
def learning_rate(settings: Settings, step: int) -> float:
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(settings: Settings, num_classes: int) -> NoiseAwareClassifier:
    return NoiseAwareClassifier(num_classes, widths=settings.widths, blocks_per_level=settings.blocks_per_level,
                                time_dim=settings.time_dim)


def train(settings: Settings, latents: dict, labels: torch.Tensor, train_index: np.ndarray, weights: torch.Tensor,
          num_classes: int, *, resume: bool, log_every: int = 250) -> NoiseAwareClassifier:
    """Cross-entropy on x_t at uniform random t; returns the EMA model."""
    alphas_cumprod = architecture.scheduler().alphas_cumprod
    model, ema = build_model(settings, num_classes), build_model(settings, num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    ema.load_state_dict(model.state_dict())
    step = 0
    if resume and CHECKPOINT.exists():
        state = torch.load(CHECKPOINT, weights_only=False)
        if state["settings"] != asdict(settings):
            raise SystemExit(f"{CHECKPOINT} was trained with {state['settings']}, not {asdict(settings)}: "
                             "run without --resume to start again.")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step = state["step"]
        print(f"Resuming from step {step} of {settings.steps}.")
    ema.requires_grad_(False)
    train_index = torch.from_numpy(train_index)
    model.train()
    started, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
    while step < settings.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        batch = train_index[torch.multinomial(weights, settings.batch_size, replacement=True, generator=generator)]
        mirrored = (torch.rand(settings.batch_size, generator=generator) < 0.5)[:, None, None, None]
        mean = torch.where(mirrored, latents["mirrored_mean"][batch], latents["mean"][batch])
        std = torch.where(mirrored, latents["mirrored_std"][batch], latents["std"][batch])
        z_0 = mean + std * torch.randn(mean.shape, generator=generator)     # a sample of the VAE's posterior
        t = torch.randint(0, len(alphas_cumprod), (settings.batch_size,), generator=generator)
        noise = torch.randn(z_0.shape, generator=generator)
        abar = alphas_cumprod[t][:, None, None, None]
        x_t = abar.sqrt() * z_0 + (1 - abar).sqrt() * noise                   # the forward process q(x_t | z_0)
        logits = model(x_t, t)
        loss = F.cross_entropy(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for ema_parameter, parameter in zip(ema.parameters(), model.parameters()):
                ema_parameter.lerp_(parameter, 1 - settings.ema_decay)
        step += 1
        loss_sum += loss.item() * len(batch)
        correct += (logits.argmax(1) == labels[batch]).sum().item()
        seen += len(batch)
        if step % log_every == 0 or step == settings.steps:
            print(f"step {step}/{settings.steps}: loss {loss_sum / seen:.3f}, training accuracy (all t) "
                  f"{correct / seen:.3f}, {time.perf_counter() - started:.0f} s", flush=True)
            loss_sum, correct, seen = 0.0, 0, 0
            WORK.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(), "step": step, "settings": asdict(settings)},
                       CHECKPOINT.with_suffix(".partial"))
            os.replace(CHECKPOINT.with_suffix(".partial"), CHECKPOINT)
    return ema.eval()


# ----------------------------------------------------------------------------------------------
# 3. Held-out accuracy per noise level.
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def held_out_accuracy(model: NoiseAwareClassifier, z_0: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      timesteps: tuple[int, ...], draws: int = EVAL_DRAWS, seed: int = 1) -> dict[int, dict]:
    """For each t: accuracy per image and balanced (mean per-class recall) over `draws` seeded noise draws."""
    alphas_cumprod = architecture.scheduler().alphas_cumprod
    generator = torch.Generator().manual_seed(seed)
    figures = {}
    for t in timesteps:
        abar = alphas_cumprod[t]
        hits = torch.zeros(len(z_0))
        for _ in range(draws):
            noise = torch.randn(z_0.shape, generator=generator)
            x_t = abar.sqrt() * z_0 + (1 - abar).sqrt() * noise
            predicted = torch.cat([model(chunk, torch.full((len(chunk),), t)).argmax(1) for chunk in x_t.split(512)])
            hits += (predicted == labels).float()
        hits /= draws
        recall = [hits[labels == c].mean().item() for c in range(num_classes) if (labels == c).any()]
        figures[t] = {"accuracy": round(hits.mean().item(), 4), "balanced_accuracy": round(float(np.mean(recall)), 4)}
    return figures


# ----------------------------------------------------------------------------------------------
# 4. The shipped folder: written beside it and renamed into place.
# ----------------------------------------------------------------------------------------------
def export(model: NoiseAwareClassifier, class_names: list[str], record: dict, out: Path = EMBEDDED_CLASSIFIER) -> Path:
    from safetensors.torch import save_file

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    state = {key: value.detach().half().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(partial / WEIGHTS_NAME), metadata={"architecture": json.dumps(model.config),
                                                            "class_names": json.dumps(class_names)})
    record["file_bytes"] = (partial / WEIGHTS_NAME).stat().st_size
    (partial / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--resume", action="store_true", help="continue from .cache/classifier/checkpoint.pt")
    parser.add_argument("--out", type=Path, default=EMBEDDED_CLASSIFIER)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings(steps=args.steps)
    started = time.perf_counter()

    # 1. Data
    records, _ = data.load_records(data.fetch())
    class_names = categories(records)
    labels = torch.tensor([class_names.index(record.category) for record in records])
    train_index, held_out_index = held_out_split(records, settings.held_out_fraction, settings.seed)
    latents = encoded_latents(records)
    print(f"{len(class_names)} categories; training on {len(train_index)} images, holding out "
          f"{len(held_out_index)} (whole emoji families).")

    # 2. Train
    weights = sampling_weights(records, train_index)
    ema = train(settings, latents, labels, train_index, weights, len(class_names), resume=args.resume)
    ema.load_state_dict({key: value.half().float() for key, value in ema.state_dict().items()})  # as shipped

    # 3. Held-out accuracy: on the posterior mean, the deterministic z_0
    held_out_z0, held_out_labels = latents["mean"][held_out_index], labels[held_out_index]
    per_t = held_out_accuracy(ema, held_out_z0, held_out_labels, len(class_names), REPORTED_TIMESTEPS)
    overall = held_out_accuracy(ema, held_out_z0, held_out_labels, len(class_names), OVERALL_TIMESTEPS, draws=2)
    overall_figures = {key: round(float(np.mean([f[key] for f in overall.values()])), 4)
                       for key in ("accuracy", "balanced_accuracy")}
    counts = np.bincount(held_out_labels.numpy(), minlength=len(class_names))
    chance = {"balanced_accuracy": round(1 / len(class_names), 4),
              "accuracy": round(float(counts.max() / counts.sum()), 4),
              "accuracy_note": "always naming the most common held-out category (people & body)"}

    # 4. Report and ship
    record = {
        "what": "p(emoji category | x_t, t) on the embedded model's noisy latents, for classifier guidance "
                "(Dhariwal & Nichol 2021, Algorithm 1); pipelines/guidance/classifier.py loads it",
        "architecture": ema.config, "parameters": sum(p.numel() for p in ema.parameters()),
        "class_names": class_names, "input": "x_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, z_0 = VAE latent * "
                                             f"scaling_factor ({latents['scaling_factor']:.6f}), t in [0, 1000)",
        "training": {**asdict(settings), "sampling": "class-balanced: category uniform, then emoji uniform within "
                     "it, then one of the emoji's images", "augmentation": "mirrored images (encoded), VAE posterior "
                     "sample", "timesteps": "uniform over 0..999", "weights": "EMA, stored fp16", "threads": args.threads},
        "held_out": {"images": len(held_out_index), "emoji": len({records[i].class_index for i in held_out_index}),
                     "split": f"{settings.held_out_fraction:.0%} of each category's emoji families (man/woman/person "
                              "and facing-right variants together) plus the example images' emoji; both styles, all "
                              "skin tones", "images_per_category": dict(zip(class_names, counts.tolist())),
                     "z_0": "the VAE posterior mean", "noise_draws_per_image": EVAL_DRAWS},
        "held_out_accuracy": {str(t): figures for t, figures in per_t.items()},
        "held_out_accuracy_overall": {**overall_figures, "timesteps": "every 50th from 0 to 950, 2 draws each"},
        "chance": chance,
        "wall_time_s": round(time.perf_counter() - started),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "recipe.classifier", *(sys.argv[1:] if argv is None else argv)]),
    }
    out = export(ema, class_names, record, args.out)
    load_guidance_classifier(out)   # what was written loads
    print(f"\nHeld-out accuracy ({len(held_out_index)} images of {record['held_out']['emoji']} unseen emoji):")
    print("| t | accuracy | balanced accuracy |\n|---|---|---|")
    for t, figures in per_t.items():
        print(f"| {t} | {figures['accuracy']:.3f} | {figures['balanced_accuracy']:.3f} |")
    print(f"| uniform | {overall_figures['accuracy']:.3f} | {overall_figures['balanced_accuracy']:.3f} |")
    print(f"| chance | {chance['accuracy']:.3f} (majority) | {chance['balanced_accuracy']:.3f} |")
    print(f"Wrote {out} ({record['file_bytes'] / 1e6:.2f} MB) in {record['wall_time_s']} s.")
    return record


if __name__ == "__main__":
    main()
