"""Train the embedded model's ControlNets: canny, scribble and colour layout.

    python -m recipe.controlnet canny                  # train (resumes from .cache/train/controlnet-canny.pt), export
    python -m recipe.controlnet scribble --start-from canny --threads 1   # as shipped (see the README)
    python -m recipe.controlnet colour export          # write assets/emoji-controlnet-colour from the checkpoint

Each is a standard diffusers `ControlNetModel`, started with `ControlNetModel.from_unet` from the embedded
model's UNet (a trainable copy of its encoder and middle block, joined to the frozen UNet by zero-initialised
convolutions, so training starts from the unchanged model), trained as in the ControlNet paper:

- frozen VAE, text encoder and UNet; the loss is the UNet's usual noise-prediction MSE with the ControlNet's
  residuals added;
- 50% of the captions replaced by the empty prompt, so the ControlNet learns to read the control image
  on its own (and classifier-free guidance keeps working);
- control images from `pipelines/tasks/preprocessors.py`, the studio's own functions:
  - canny: `controlnet_aux.CannyDetector`, thresholds drawn at random per image (low 50-150, high 1.5-3× low);
  - scribble: those edges made to look drawn by hand (`scribble_from_edges`: random dilation, erosion,
    dropout and a smooth jitter);
  - colour: the 8×8 mean-colour grid;
- placement: every emoji is seen as it is and in three random placements (scaled to 50-100%, moved), so the
  layout comes from the control image and not from the prompt (which alone puts the emoji centred, full size);
- held out: every class named by the 300 evaluation prompts (`recipe.evaluate.evaluation_prompts`),
  never trained on; `recipe.controlnet_eval` measures on them.

Shipped as fp16 safetensors in `assets/emoji-controlnet-<kind>`, loadable by plain
`ControlNetModel.from_pretrained`. Seeded and resumable; loss logs in .cache/train/controlnet-<kind>.log.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from PIL import Image
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from pipelines.tasks import preprocessors
from recipe import architecture, data
from recipe.draft import held_out_classes
from recipe.train import WORK, _log, _save_atomically, clipped_step, export_model

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "assets" / "emoji-ldm"
KINDS = ("canny", "scribble", "colour")
PREPROCESSOR = {"canny": "canny", "scribble": "invert", "colour": "colour grid"}   # what the studio pairs them with
EMPTY_PROMPT_RATE = 0.5


def output_folder(kind: str) -> Path:
    return ROOT / "assets" / f"emoji-controlnet-{kind}"


def _checkpoint(kind: str) -> Path:
    return WORK / f"controlnet-{kind}.pt"


def place(image: np.ndarray, scale: float, dx: float, dy: float) -> np.ndarray:
    """The emoji scaled by `scale` about its centre and moved by (dx, dy) px, on white (H×W×3 uint8)."""
    import cv2
    size = image.shape[0]
    offset = (1 - scale) * size / 2
    matrix = np.float32([[scale, 0, offset + dx], [0, scale, offset + dy]])
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_AREA, borderValue=(255, 255, 255))


def unplace(image: Image.Image, scale: float, dx: float, dy: float) -> Image.Image:
    """The part of a generated image where `place` put the emoji, back at full size (for the classifier, which
    knows emoji centred and full size)."""
    size = image.width
    left, top = (1 - scale) * size / 2 + dx, (1 - scale) * size / 2 + dy
    return image.convert("RGB").crop((round(left), round(top), round(left + scale * size), round(top + scale * size))
                                     ).resize((size, size), Image.Resampling.LANCZOS)


def random_placement(rng: np.random.Generator, size: int = 64, smallest: float = 0.5) -> tuple[float, float, float]:
    """A scale in [smallest, 1] and a shift that keeps the emoji inside the image."""
    scale = float(rng.uniform(smallest, 1.0))
    room = (1 - scale) * size / 2
    return scale, float(rng.uniform(-room, room)), float(rng.uniform(-room, room))


def placed_latents(training, images: np.ndarray, vae, variants: int = 4) -> dict:
    """Every training emoji as it is and in `variants - 1` random placements (smaller, moved), with the VAE's
    posterior of each; cached. In the data every emoji fills the frame at the centre, where the prompt alone
    puts it; moved copies make the control image, not the prompt, the only source of the layout."""
    stored = WORK / f"controlnet-placed-{variants}.pt"
    if stored.exists():
        return torch.load(stored)
    rng = np.random.default_rng(7)
    placements = [(i, (1.0, 0.0, 0.0) if v == 0 else random_placement(rng))
                  for i in range(len(training)) for v in range(variants)]
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(placements), 256):
            chunk = np.stack([place(images[i], *where) for i, where in placements[start:start + 256]])
            pixels = torch.from_numpy(chunk).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            posterior = vae.encode(pixels).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    scale = float(vae.config.scaling_factor)
    cached = {"record": torch.tensor([i for i, _ in placements]), "where": torch.tensor([w for _, w in placements]),
              "mean": torch.cat(means) * scale, "std": torch.cat(stds) * scale}
    torch.save(cached, stored)
    return cached


def random_canny(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Canny edges with thresholds drawn at random (the paper's augmentation), H×W uint8."""
    low = int(rng.integers(50, 151))
    high = int(low * rng.uniform(1.5, 3.0))
    edges = preprocessors.canny(Image.fromarray(image), low_threshold=low, high_threshold=high)
    return np.asarray(edges)[..., 0]


def control_image(kind: str, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The training control image for one H×W×3 uint8 emoji, H×W×3 uint8."""
    if kind == "canny":
        return np.repeat(random_canny(image, rng)[..., None], 3, axis=2)
    if kind == "scribble":
        return np.repeat(preprocessors.scribble_from_edges(random_canny(image, rng), rng)[..., None], 3, axis=2)
    if kind == "colour":
        return np.asarray(preprocessors.colour_grid(Image.fromarray(image)))
    raise ValueError(f"`kind` must be one of {', '.join(KINDS)} but is {kind!r}.")


def evaluation_placement(index: int, size: int = 64) -> tuple[float, float, float]:
    """Held-out emoji `index`'s placement in the "moved" measurement: scaled to 65-85% and moved, seeded. (Smaller,
    an emoji covers 4×4 of the model's 8×8 latent cells, too few for its details at any setting.)"""
    rng = np.random.default_rng(10_000 + index)
    scale = float(rng.uniform(0.65, 0.85))
    room = (1 - scale) * size / 2
    return scale, float(rng.uniform(-room, room)), float(rng.uniform(-room, room))


def evaluation_control(kind: str, image: np.ndarray) -> Image.Image:
    """The control image measured on a held-out emoji: fixed thresholds, and a seeded scribble."""
    if kind == "scribble":
        edges = np.asarray(preprocessors.canny(Image.fromarray(image)))[..., 0]
        seed = int(image.astype(np.int64).sum()) % 2 ** 32
        scribble = preprocessors.scribble_from_edges(edges, np.random.default_rng(seed))
        return Image.fromarray(np.repeat(scribble[..., None], 3, axis=2))
    return preprocessors.preprocess(PREPROCESSOR[kind], Image.fromarray(image))


def train(kind: str, steps: int, batch_size: int = 32, lr: float = 3e-4, start_from: str | None = None) -> None:
    """`start_from`: another kind's trained weights to begin with (scribble starts from canny: both read white
    lines on black), instead of the UNet's copy."""
    records, _ = data.load_records(data.fetch())
    held_out = held_out_classes(records)
    training = [r for r in records if r.class_index not in held_out]
    images = data.load_images(training)
    tokenizer = CLIPTokenizer.from_pretrained(BASE / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(BASE / "text_encoder").eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(BASE / "unet").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(BASE / "vae").eval().requires_grad_(False)
    placed = placed_latents(training, images, vae)
    noise_scheduler = architecture.scheduler()

    checkpoint = _checkpoint(kind)
    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(unet)   # the encoder's copy; zero convolutions out
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=lr, weight_decay=0.01)
    step, caption_rng, control_rng = 0, random.Random(0), np.random.default_rng(0)
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        controlnet.load_state_dict(state["controlnet"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
        caption_rng.setstate(state["caption_rng"])
        control_rng.bit_generator.state = state["control_rng"]
    elif start_from is not None:
        controlnet.load_state_dict(torch.load(_checkpoint(start_from), weights_only=False)["controlnet"])
    progress = tqdm(total=steps, initial=step, desc=f"controlnet {kind}")
    controlnet.train()
    while step < steps:
        for group in optimizer.param_groups:   # warm-up, then a cosine to 10%
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.55 + 0.45 * np.cos(np.pi * step / steps))
        index = torch.randint(len(placed["record"]), (batch_size,))
        records = placed["record"][index].tolist()
        captions = [data.caption(training[i], caption_rng) if caption_rng.random() >= EMPTY_PROMPT_RATE else ""
                    for i in records]
        controls = np.stack([control_image(kind, place(images[i], *where), control_rng)
                             for i, where in zip(records, placed["where"][index].tolist())])
        with torch.no_grad():
            tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
            text = text_encoder(tokens)[0]
            x0 = placed["mean"][index] + placed["std"][index] * torch.randn_like(placed["std"][index])
            noise = torch.randn_like(x0)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
            x_t = noise_scheduler.add_noise(x0, noise, t)   # the forward process q(x_t | x_0)
            cond = torch.from_numpy(controls).permute(0, 3, 1, 2).float() / 255.0   # [0, 1], as the pipelines feed it
        down, mid = controlnet(x_t, t, text, controlnet_cond=cond, return_dict=False)
        prediction = unet(x_t, t, text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        loss = F.mse_loss(prediction, noise)
        clipped_step(optimizer, loss, controlnet.parameters())
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if step % 50 == 0:
            _log(f"controlnet-{kind}", step, loss=loss.item())
        if step % 100 == 0 or step == steps:
            _save_atomically({"controlnet": controlnet.state_dict(), "optimizer": optimizer.state_dict(),
                              "step": step, "rng": torch.get_rng_state(), "caption_rng": caption_rng.getstate(),
                              "control_rng": control_rng.bit_generator.state}, checkpoint)
    progress.close()


def export(kind: str) -> Path:
    state = torch.load(_checkpoint(kind), weights_only=False)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(BASE / "unet"))
    controlnet.load_state_dict(state["controlnet"])
    return export_model(controlnet, output_folder(kind), "CONTROLNET.json", {
        "base": "assets/emoji-ldm", "kind": kind, "preprocessor": PREPROCESSOR[kind], "steps": state["step"],
        "recipe": f"python -m recipe.controlnet {kind}",
        "held_out": "the classes of the 300 evaluation prompts (recipe.evaluate.evaluation_prompts)"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("stage", nargs="?", default="all", choices=("all", "train", "export"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--start-from", choices=KINDS, help="begin from another kind's checkpoint")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage in ("all", "train"):
        train(args.kind, args.steps, start_from=args.start_from)
    if args.stage in ("all", "export"):
        print(f"Wrote {export(args.kind)}")


if __name__ == "__main__":
    main()
