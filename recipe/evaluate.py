"""Measure the embedded emoji model honestly: does a prompt give the emoji it names?

    python -m recipe.evaluate                          # 300 prompts, the studio's default settings
    python -m recipe.evaluate --model models/other --steps 50 --cfg 5 --sampler "Euler a"

What is measured, in three steps:

1. A judge. A small CNN is trained to name the base emoji (`EmojiRecord.class_index`, ~1906
   classes; both art styles and every skin tone of one emoji share a class) from the REAL images
   only. It never sees a generated image: a judge trained on the generator's output would learn
   the generator's mistakes as the right answers, and the figures would measure agreement with
   itself. Its augmentation (resized crops, small rotations, mild colour jitter, sometimes a
   slight blur) covers how a faithful 64x64 sample may differ from the art, the blur because
   samples decoded from 16x16 latents are softer than the PNGs. 10% of the real images are
   held out (never the last image of a class, so for a two-image class the held-out image is the
   other art style) and the judge's top-1/top-5 on them is reported: the ceiling the generated
   figures are read against.
2. Samples. `--prompts` distinct canonical prompts (`EmojiRecord.prompt`), drawn with
   `random.Random(0)`, each generated once with seed 1000 + i through the studio's own
   `Generator` at the studio's defaults for the model (its own sampler, 25 steps, CFG 7.5, its
   native size).
3. Figures. Top-1/top-5 of the judge on the samples against each prompt's class, and the
   Fréchet distance between samples and real images in the judge's 256-d feature layer. FD is
   biased by sample size, so its scale is FD between two disjoint sets of real images of the
   same size, drawn from the held-out images the judge never trained on.

The judge names the emoji; it does not check skin tone or art style. Outputs: a summary table,
`assets/emoji-ldm-eval.json` (figures, settings, date, command, every prompt's prediction) and
`assets/emoji-ldm-samples.png` (the first 32 samples with their prompts). The judge is cached in
.cache/eval/classifier.pt and reused unless `--retrain` or its settings changed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from pipelines.lora.judge import (  # the judge's inference side ships with the app
    SHIPPED_JUDGE,
    EmojiClassifier,
    as_array,
    classify,
    features,
    load_judge,  # noqa: F401  (recipe.evaluate.load_judge: the other recipes and tests read it here)
)
from pipelines.lora.judge import check_images as _check_images
from pipelines.lora.judge import to_pixels as _to_pixels
from recipe import data

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLASSIFIER = ROOT / ".cache" / "eval" / "classifier.pt"
DEFAULT_REPORT = ROOT / "assets" / "emoji-ldm-eval.json"
DEFAULT_GRID = ROOT / "assets" / "emoji-ldm-samples.png"
TRAIN_IMAGES = ROOT / ".cache" / "train" / "images.npy"   # written by recipe.train, same order as load_records
CLASSIFIER_VERSION = 1      # bump when the architecture or the training recipe changes: invalidates the cache
HELD_OUT_FRACTION = 0.1
FIRST_SEED = 1000           # prompt i is generated with seed FIRST_SEED + i
PROMPT_SEED = 0             # random.Random(PROMPT_SEED) draws the prompts
GRID_GAP_PX = 8
GRID_CAPTION_LINES = 3


# ----------------------------------------------------------------------------------------------
# 1. The judge: a small CNN (its architecture and inference: pipelines/lora/judge.py) trained on real
#    images only.
# ----------------------------------------------------------------------------------------------
def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A different random view of every image of the batch (pixels in [-1, 1], NCHW)."""
    n, device = pixels.shape[0], pixels.device

    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=generator, device=device)

    # Random resized crop (area 0.7-1, aspect 3/4-4/3) and a rotation of up to ±10°, as one affine
    # map per image from output to input coordinates: input = R(angle) · diag(crop_w, crop_h) · out + c.
    area = uniform(0.7, 1.0)
    aspect = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w, crop_h = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    centre_x, centre_y = uniform(-1, 1) * (1 - crop_w), uniform(-1, 1) * (1 - crop_h)
    angle = uniform(-10, 10) * math.pi / 180
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos * crop_w, -sin * crop_h, centre_x], 1),
                         torch.stack([sin * crop_w, cos * crop_h, centre_y], 1)], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    # Sample (pixels - 1) with zero padding and add 1 back: what rotates in from outside is white,
    # like the emoji's own background.
    views = F.grid_sample(pixels - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1

    # Mild colour jitter, in [0, 1]: brightness, contrast (around each image's mean), saturation.
    rgb = (views + 1) / 2
    rgb = rgb * uniform(0.85, 1.15)[:, None, None, None]
    mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
    rgb = mean + (rgb - mean) * uniform(0.85, 1.15)[:, None, None, None]
    grey = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3])
    rgb = grey + (rgb - grey) * uniform(0.85, 1.15)[:, None, None, None]
    views = rgb.clamp(0, 1) * 2 - 1

    # A slight Gaussian blur on 30% of the views (sigma 0.4-1.2 px); the others get a unit impulse.
    sigma = torch.where(torch.rand(n, generator=generator, device=device) < 0.3, uniform(0.4, 1.2),
                        torch.full((n,), 1e-3, device=device))
    radius = 3
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=pixels.dtype)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, dim=0)  # one per image and channel
    flat = views.reshape(1, n * 3, *views.shape[2:])
    flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * 3)      # separable: rows,
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * 3)      # then columns
    return flat.reshape(views.shape)


def train_classifier(images: np.ndarray, labels: np.ndarray, *, epochs: int = 15, seed: int = 0,
                     num_classes: int | None = None, batch_size: int = 128, lr: float = 3e-3,
                     weight_decay: float = 0.05, label_smoothing: float = 0.1,
                     log: Callable[[str], None] | None = print) -> EmojiClassifier:
    """Train the judge from scratch on `images` (uint8 NHWC) with integer `labels`.

    AdamW with a short linear warm-up then a cosine decay to zero; every batch is a fresh
    augmented view (`augment`). Seeded: the same inputs give the same weights on one machine.
    """
    # 1. Check inputs
    _check_images(images)
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"`labels` must be {len(images)} integers (one per image) but has dtype {labels.dtype} "
                         f"and shape {labels.shape}.")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"`labels` must lie in [0, {num_classes}) but span [{labels.min()}, {labels.max()}].")
    if epochs < 1 or len(images) < 2:
        raise ValueError(f"Need at least 1 epoch and 2 images, got {epochs} epoch(s) and {len(images)} image(s).")

    # 2. Model, optimiser and schedule
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    classifier = EmojiClassifier(num_classes, image_size=images.shape[1])
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    batch_size = min(batch_size, len(images))
    steps_per_epoch = len(images) // batch_size     # drop the ragged last batch: BatchNorm needs company
    total_steps = epochs * steps_per_epoch
    warmup = max(1, total_steps // 20)

    def learning_rate(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    # 3. Training loop
    images_tensor, labels_tensor = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    classifier.train()
    step = 0
    for epoch in range(epochs):
        started, loss_sum, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(images), generator=generator)
        for batch in order[:steps_per_epoch * batch_size].split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step)
            views = augment(_to_pixels(images_tensor[batch]), generator)
            logits = classifier(views)
            loss = F.cross_entropy(logits, labels_tensor[batch], label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(batch)
            correct += (logits.argmax(1) == labels_tensor[batch]).sum().item()
        if log:
            seen = steps_per_epoch * batch_size
            log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.3f}, top-1 on augmented "
                f"training views {correct / seen:.3f} ({time.perf_counter() - started:.0f} s)")
    return classifier.eval()


def holdout_split(labels: np.ndarray, fraction: float = HELD_OUT_FRACTION, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: `fraction` of the images at random, never the last image of a
    class, so every held-out image's class is still trained on."""
    labels = np.asarray(labels)
    remaining = np.bincount(labels)
    target = round(fraction * len(labels))
    held_out: list[int] = []
    for index in np.random.default_rng(seed).permutation(len(labels)):
        if len(held_out) == target:
            break
        if remaining[labels[index]] >= 2:
            remaining[labels[index]] -= 1
            held_out.append(int(index))
    held_out_index = np.sort(np.array(held_out, dtype=np.int64))
    return np.setdiff1d(np.arange(len(labels)), held_out_index), held_out_index


def prepare_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, *, path: Path, epochs: int,
                       seed: int, retrain: bool, fit_all: bool, log: Callable[[str], None] = print
                       ) -> EmojiClassifier:
    """The cached judge when it was trained with these settings on this data, else a new one.

    A new judge is trained on 90% of the real images and scored on the held-out 10%; with
    `fit_all` a second one is then trained on every image and used (its held-out figures are the
    first one's, and the held-out images are no longer unseen)."""
    settings = {"version": CLASSIFIER_VERSION, "epochs": epochs, "seed": seed, "fit_all": fit_all,
                "images": int(len(images)), "classes": int(num_classes),
                "held_out_fraction": HELD_OUT_FRACTION}
    if path.exists() and not retrain:
        saved = torch.load(path, weights_only=True)
        if saved["provenance"]["settings"] == settings:
            classifier = EmojiClassifier(saved["num_classes"], image_size=saved["image_size"])
            classifier.load_state_dict(saved["state_dict"])
            classifier.provenance = saved["provenance"]
            log(f"Using the cached classifier {path} (held-out top-1 "
                f"{classifier.provenance['held_out']['top1']:.3f}); --retrain to train a new one.")
            return classifier.eval()
        log(f"The cached classifier {path} was trained with {saved['provenance']['settings']}, "
            f"not {settings}: training a new one.")

    train_index, held_out_index = holdout_split(labels, seed=seed)
    log(f"Training the classifier on {len(train_index)} real images ({num_classes} classes), "
        f"holding out {len(held_out_index)}.")
    classifier = train_classifier(images[train_index], labels[train_index], epochs=epochs, seed=seed,
                                  num_classes=num_classes, log=log)
    logits = classify(classifier, images[held_out_index])
    held_out = {"images": int(len(held_out_index)),
                "top1": top_k_accuracy(logits, labels[held_out_index], 1),
                "top5": top_k_accuracy(logits, labels[held_out_index], min(5, num_classes))}
    log(f"Held-out real images: top-1 {held_out['top1']:.3f}, top-5 {held_out['top5']:.3f}.")
    if fit_all:
        log("Training the final classifier on every real image (--fit-all).")
        classifier = train_classifier(images, labels, epochs=epochs, seed=seed, num_classes=num_classes, log=log)
    classifier.provenance = {"settings": settings, "held_out": held_out,
                             "held_out_index": held_out_index.tolist(),
                             "trained_on_held_out": fit_all}
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, lambda partial: torch.save(
        {"state_dict": classifier.state_dict(), "num_classes": num_classes, "image_size": classifier.image_size,
         "provenance": classifier.provenance}, partial))
    return classifier


def export_judge(classifier: EmojiClassifier, class_names: Sequence[str], path: Path = SHIPPED_JUDGE) -> Path:
    """Ship the judge for the end-to-end test: weights as safetensors, class names and provenance as
    metadata (no pickle), so CI can recognise emoji without the emoji data."""
    from safetensors.torch import save_file

    provenance = {k: v for k, v in classifier.provenance.items() if k != "held_out_index"}
    metadata = {"num_classes": str(classifier.num_classes), "image_size": str(classifier.image_size),
                "class_names": json.dumps(list(class_names)), "provenance": json.dumps(provenance)}
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    if path.exists() and _same_safetensors(path, state, metadata):
        return path  # safetensors' header order varies between writes: don't touch an identical file
    _write_atomically(path, lambda partial: save_file(state, str(partial), metadata=metadata))
    return path


def _same_safetensors(path: Path, state: dict, metadata: dict) -> bool:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        if handle.metadata() != metadata:
            return False
    stored = load_file(str(path))
    return stored.keys() == state.keys() and all(torch.equal(stored[k], v) for k, v in state.items())


# ----------------------------------------------------------------------------------------------
# 2. Prompts and samples, through the studio's own generation service.
# ----------------------------------------------------------------------------------------------
def evaluation_prompts(records: Sequence[data.EmojiRecord], n: int, seed: int = PROMPT_SEED
                       ) -> list[data.EmojiRecord]:
    """`n` distinct canonical prompts drawn with `random.Random(seed)`: one record per prompt, whose
    `.prompt` is the text and `.class_index` the class it names.

    Prompts that name more than one class are left out (two Unicode emoji are both called "man in
    tuxedo"): no judge could say which was meant."""
    classes_of: dict[str, set[int]] = defaultdict(set)
    first: dict[str, data.EmojiRecord] = {}
    for record in records:
        classes_of[record.prompt].add(record.class_index)
        first.setdefault(record.prompt, record)
    candidates = [record for prompt, record in first.items() if len(classes_of[prompt]) == 1]
    if not 1 <= n <= len(candidates):
        raise ValueError(f"`n` must be from 1 to {len(candidates)} (the distinct unambiguous prompts) but is {n}.")
    return random.Random(seed).sample(candidates, n)


def studio_generator(model: str, device: str = "cpu", worker=None):
    """The studio's `Generator` on `model`, without saving images, and its loaded model. Give the
    `worker` this runs on, so that the judge and the generator share one thread."""
    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager

    manager = ModelManager(MemoryManager(device=device), worker=worker)
    loaded = manager.load(model)
    return Generator(manager, outputs_dir=None), loaded


def studio_defaults(loaded) -> dict:
    """What the studio's text-to-image tab starts with for this model: its own sampler, the
    request's default steps and CFG, the native size (as `studio.app.model_defaults`, which this
    recipe cannot import: it lives beside gradio)."""
    from pipelines.core.samplers import model_default_sampler
    from pipelines.tasks.txt2img import Txt2ImgRequest

    fields = Txt2ImgRequest.__dataclass_fields__
    side = loaded.native_side
    return {"sampler": model_default_sampler(loaded.scheduler_config), "steps": fields["steps"].default,
            "guidance_scale": fields["guidance_scale"].default, "width": side, "height": side}


def generate_samples(generator, prompts: Sequence[str], *, sampler: str, steps: int, guidance_scale: float,
                     width: int, height: int, first_seed: int = FIRST_SEED,
                     log: Callable[[str], None] | None = print) -> list[Image.Image]:
    """One image per prompt, prompt i with seed `first_seed + i`, one request each."""
    from pipelines.tasks.txt2img import Txt2ImgRequest

    samples, started = [], time.perf_counter()
    for i, prompt in enumerate(prompts):
        request = Txt2ImgRequest(prompt=prompt, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                                 width=width, height=height, seed=first_seed + i)
        samples.append(generator.generate(request).images[0].image)
        if log and ((i + 1) % 25 == 0 or i + 1 == len(prompts)):
            log(f"generated {i + 1}/{len(prompts)} ({time.perf_counter() - started:.0f} s)")
    return samples


# ----------------------------------------------------------------------------------------------
# 3. Figures.
# ----------------------------------------------------------------------------------------------
def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise ValueError(f"`logits` must be (N, classes) and `labels` (N,) but are {logits.shape} and {labels.shape}.")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"`k` must be from 1 to {logits.shape[1]} (the number of classes) but is {k}.")
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature vectors (rows):
    ||mu_a - mu_b||^2 + Tr(C_a) + Tr(C_b) - 2 Tr((C_a C_b)^(1/2))   (Heusel et al. 2017, as in FID).

    Tr((C_a C_b)^(1/2)) is taken as the sum of the square roots of the eigenvalues of the symmetric
    C_a^(1/2) C_b C_a^(1/2), which has the same spectrum as C_a C_b. Unlike `scipy.linalg.sqrtm` of the
    product, this stays exact when the covariances are singular (fewer samples than dimensions,
    dead ReLU units) and leaves no imaginary part to drop."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"`a` and `b` must be (N, D) sets of at least 2 vectors of one dimension but are "
                         f"{a.shape} and {b.shape}.")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues, eigenvectors = scipy.linalg.eigh(cov_a)
    sqrt_cov_a = (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T
    # Covariances are positive semi-definite: negative eigenvalues are rounding error.
    product_eigenvalues = scipy.linalg.eigvalsh(sqrt_cov_a @ cov_b @ sqrt_cov_a).clip(min=0)
    trace_sqrt_product = np.sqrt(product_eigenvalues).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt_product)


# ----------------------------------------------------------------------------------------------
# 4. Outputs.
# ----------------------------------------------------------------------------------------------
def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
            continue
        while draw.textlength(word, font=font) > width and len(word) > 1:  # a word wider than the cell
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and draw.textlength(lines[-1] + "...", font=font) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines


def sample_grid(images: Sequence[Image.Image | np.ndarray], captions: Sequence[str], columns: int = 8, *,
                scale: int = 2, caption_lines: int = GRID_CAPTION_LINES) -> Image.Image:
    """Images upscaled `scale`x (nearest) in `columns` columns on white, each with its caption
    wrapped under it. Width = columns * cell + (columns + 1) * GRID_GAP_PX."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"Need as many captions as images, and at least one, but got {len(images)} image(s) "
                         f"and {len(captions)} caption(s).")
    pictures = [Image.fromarray(i) if isinstance(i, np.ndarray) else i.convert("RGB") for i in images]
    cell_w, cell_h = pictures[0].width * scale, pictures[0].height * scale
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), "Ag", font=font)
    line_height = bottom - top + 2
    rows = math.ceil(len(pictures) / columns)
    block_h = cell_h + 4 + caption_lines * line_height
    grid = Image.new("RGB", (columns * cell_w + (columns + 1) * GRID_GAP_PX,
                             rows * block_h + (rows + 1) * GRID_GAP_PX), "white")
    draw = ImageDraw.Draw(grid)
    for index, (picture, text) in enumerate(zip(pictures, captions)):
        x = GRID_GAP_PX + (index % columns) * (cell_w + GRID_GAP_PX)
        y = GRID_GAP_PX + (index // columns) * (block_h + GRID_GAP_PX)
        grid.paste(picture.resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
        for line_index, line in enumerate(_wrap(draw, text, font, cell_w, caption_lines)):
            line_x = x + (cell_w - draw.textlength(line, font=font)) / 2
            draw.text((line_x, y + cell_h + 4 + line_index * line_height - top), line, fill="black", font=font)
    return grid


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(partial)` then rename over `path`: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def real_images(records: Sequence[data.EmojiRecord]) -> np.ndarray:
    """Every record's image, from recipe.train's decoded cache when it matches, else decoded now."""
    if TRAIN_IMAGES.exists():
        cached = np.load(TRAIN_IMAGES, mmap_mode="r")
        if len(cached) == len(records) and all(np.array_equal(cached[i], data.load_image(records[i].image_path))
                                               for i in (0, len(records) // 2, len(records) - 1)):
            return np.array(cached)  # into memory, writable
        print(f"{TRAIN_IMAGES} does not match the emoji records; decoding the images again.")
    return data.load_images(records)


def _rounded(value, digits: int = 4):
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    return round(value, digits) if isinstance(value, float) else value


def _summary(figures: dict) -> str:
    generated, real = figures["generated"], figures["real_reference"]
    rows = [("", "top-1", "top-5", f"FD (n={real['fd_images']} each)"),
            (f"generated, {generated['images']} prompts", f"{generated['top1']:.3f}", f"{generated['top5']:.3f}",
             f"{generated['fd_vs_real']:.2f}  (vs real)"),
            (f"real, {real['held_out_images']} held out", f"{real['held_out_top1']:.3f}",
             f"{real['held_out_top5']:.3f}", f"{real['fd_real_vs_real']:.2f}  (real vs real)")]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="embedded, a diffusers folder, a .safetensors file or a hub id")
    parser.add_argument("--prompts", type=int, default=300, help="distinct prompts, one sample each")
    parser.add_argument("--epochs", type=int, default=15, help="classifier training epochs")
    parser.add_argument("--retrain", action="store_true", help="train a new classifier even if one is cached")
    parser.add_argument("--fit-all", action="store_true",
                        help="after scoring it on held-out images, retrain the classifier on every real image")
    parser.add_argument("--classifier-cache", type=Path, default=DEFAULT_CLASSIFIER)
    parser.add_argument("--steps", type=int, help="default: the studio's (25)")
    parser.add_argument("--cfg", type=float, help="default: the studio's (7.5)")
    parser.add_argument("--sampler", help="default: the model's own scheduler, as the studio picks it")
    parser.add_argument("--device", default="cpu", choices=("auto", "cuda", "mps", "cpu"),
                        help="generation device (cpu: fp32, reproducible anywhere)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--cache", type=Path, default=data.DEFAULT_CACHE, help="the emoji data folder")
    parser.add_argument("--grid", type=Path, default=DEFAULT_GRID)
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Everything on one device worker's thread: one OpenMP thread team for the judge and the
    # generator (two teams halve the speed on a small CPU; see pipelines/jobs/worker.py).
    from pipelines.jobs.worker import DeviceWorker
    worker = DeviceWorker()
    return worker.call(_evaluate, args, argv, worker)


def _evaluate(args: argparse.Namespace, argv: Sequence[str] | None, worker) -> dict:
    # 1. Real images and the judge
    data.fetch(args.cache)
    records, class_names = data.load_records(args.cache)
    images = real_images(records)
    labels = np.array([r.class_index for r in records])
    classifier = prepare_classifier(images, labels, len(class_names), path=args.classifier_cache,
                                    epochs=args.epochs, seed=0, retrain=args.retrain, fit_all=args.fit_all)
    provenance = classifier.provenance
    if args.classifier_cache == DEFAULT_CLASSIFIER:
        print(f"Shipped the judge for the end-to-end test: {export_judge(classifier, class_names)}")

    # 2. Prompts and samples at the studio's defaults
    chosen = evaluation_prompts(records, args.prompts)
    from pipelines.core.paths import ModelLoadError
    try:
        generator, loaded = studio_generator(args.model, args.device, worker)
    except ModelLoadError as error:
        raise SystemExit(f"error: {error}") from error
    settings = studio_defaults(loaded)
    settings.update({k: v for k, v in (("steps", args.steps), ("guidance_scale", args.cfg),
                                       ("sampler", args.sampler)) if v is not None})
    print(f"Generating {len(chosen)} samples with {loaded.name}: {settings}")
    samples = generate_samples(generator, [r.prompt for r in chosen], **settings)
    generated = as_array(samples, classifier.image_size)

    # 3. Figures. FD's reference sets: two disjoint seeded draws of n real images, from the held-out
    # images when there are enough of them and the judge never trained on them, else from all.
    prompt_labels = np.array([r.class_index for r in chosen])
    logits = classify(classifier, generated)
    held_out_index = np.array(provenance["held_out_index"], dtype=np.int64)
    n = len(chosen)
    unseen = not provenance["trained_on_held_out"] and len(held_out_index) >= 2 * n
    pool = held_out_index if unseen else np.arange(len(images))
    if len(pool) < 2 * n:
        raise ValueError(f"FD needs 2 × {n} real images but there are {len(pool)}; use fewer --prompts.")
    draw = np.random.default_rng(PROMPT_SEED).permutation(pool)
    reference, second_reference = np.sort(draw[:n]), np.sort(draw[n:2 * n])
    reference_features = features(classifier, images[reference])
    figures = {
        "generated": {"images": n, "top1": top_k_accuracy(logits, prompt_labels, 1),
                      "top5": top_k_accuracy(logits, prompt_labels, 5),
                      "fd_vs_real": frechet_distance(features(classifier, generated), reference_features)},
        "real_reference": {"held_out_images": provenance["held_out"]["images"],
                           "held_out_top1": provenance["held_out"]["top1"],
                           "held_out_top5": provenance["held_out"]["top5"],
                           "fd_real_vs_real": frechet_distance(features(classifier, images[second_reference]),
                                                               reference_features),
                           "fd_images": n,
                           "fd_pool": "held-out real images (never trained on)" if unseen else
                                      "all real images (the classifier trained on most of them: an optimistic floor)"},
    }
    print(_summary(figures))

    # 4. Report and sample grid
    predicted = logits.argmax(1)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "recipe.evaluate", *(sys.argv[1:] if argv is None else argv)]),
        "model": {"spec": args.model, "name": loaded.name, "hash": loaded.model_hash},
        "generation": dict(settings, prompts=n, seeds=f"{FIRST_SEED} + i", prompt_draw=f"random.Random({PROMPT_SEED})",
                           negative_prompt="", device=args.device),
        "classifier": {"architecture": "4 conv blocks 32-64-128-256 (BN, ReLU, max pool), GAP, 256-d feature, linear",
                       "trained_on": "real emoji images only (both styles, all skin tones)",
                       **provenance["settings"], "cache": str(args.classifier_cache)},
        "figures": _rounded(figures),
        "samples": [{"prompt": r.prompt, "seed": FIRST_SEED + i, "class": class_names[r.class_index],
                     "predicted": class_names[int(predicted[i])], "top1": bool(predicted[i] == r.class_index)}
                    for i, r in enumerate(chosen)],
    }
    _write_atomically(args.report, lambda partial: partial.write_text(json.dumps(report, indent=2) + "\n"))
    shown = min(32, n)
    grid = sample_grid(samples[:shown], [r.prompt for r in chosen[:shown]], columns=8)
    _write_atomically(args.grid, lambda partial: grid.save(partial, format="PNG"))
    print(f"Wrote {args.report} and {args.grid}.")
    return report


if __name__ == "__main__":
    main()
