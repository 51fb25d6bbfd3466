"""The VAE's reconstructions, measured on emoji art it never trained on (Facebook's set: the recipe trains on
Google's Noto and Twitter's Twemoji) and, beside it, on its own training art: PSNR, and the mean hue error on
saturated pixels (the embedded model's colour shift: purples came back grey-blue).

    python -m recipe.vae_eval                         # the shipped VAE (assets/emoji-ldm/vae)
    python -m recipe.vae_eval --vae FOLDER --write    # another VAE; --write: assets/vae-eval.json

Reconstruction: the encoder's posterior mean, decoded, as the model's latents are made. Hue error: the circular
distance of HSV hue, in degrees, over the pixels the original shows saturated (S > 0.5) and not dark (V > 0.3),
where a hue is a colour at all. Fetching the held-out art is the one network step (npm, like recipe.data).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_VAE = ROOT / "assets" / "emoji-ldm"
REPORT = ROOT / "assets" / "vae-eval.json"
SAMPLE, SEED = 512, 0
SATURATED, LIT = 0.5, 0.3


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB over whole uint8 images (one MSE over every pixel, as the recipe's training log reports it)."""
    mse = np.mean((original.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def hue_error(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean circular hue distance in degrees over the original's saturated, lit pixels (NaN where it has none)."""
    def hsv(images: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(Image.fromarray(image).convert("HSV"), dtype=np.float64) / 255.0
                         for image in images])
    before, after = hsv(original), hsv(reconstruction)
    mask = (before[..., 1] > SATURATED) & (before[..., 2] > LIT)
    if not mask.any():
        return float("nan")
    difference = np.abs(before[..., 0] - after[..., 0])[mask]
    return float(np.mean(np.minimum(difference, 1.0 - difference)) * 360.0)


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """Each image through the VAE: the posterior mean, decoded, back to uint8."""
    out = []
    for start in range(0, len(images), batch):
        pixels = torch.from_numpy(images[start:start + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        out.append(((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def sample_images(packages: dict, count: int = SAMPLE, seed: int = SEED) -> np.ndarray:
    """`count` images of the packages' art, drawn at random (seeded), no skin-tone variants, on white."""
    from recipe import data

    records, _ = data.load_records(data.fetch(packages=packages), packages=packages)
    plain = [record for record in records if record.skin_tone is None]
    chosen = random.Random(seed).sample(plain, min(count, len(plain)))
    return data.load_images(chosen)


def evaluate(vae_folder: Path) -> dict:
    from diffusers import AutoencoderKL

    from recipe import data

    vae = AutoencoderKL.from_pretrained(vae_folder, subfolder="vae").eval()
    rows = {}
    for name, packages in (("held-out (facebook)", data.HELD_OUT_PACKAGES), ("training (noto, twemoji)",
                                                                              data.PACKAGES)):
        images = sample_images(packages)
        rebuilt = reconstruct(vae, images)
        rows[name] = {"images": len(images), "psnr_db": round(psnr(images, rebuilt), 2),
                      "hue_error_deg": round(hue_error(images, rebuilt), 2)}
    return {"vae": str(vae_folder.relative_to(ROOT)) if vae_folder.is_relative_to(ROOT) else str(vae_folder),
            "saturated_pixels": f"S > {SATURATED}, V > {LIT}", "rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, default=SHIPPED_VAE, help="a model folder with a vae/ subfolder")
    parser.add_argument("--write", action="store_true", help=f"write {REPORT.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    report = evaluate(args.vae)
    print(f"VAE {report['vae']}: reconstructions (posterior mean, decoded), {SAMPLE} images each")
    for name, row in report["rows"].items():
        print(f"  {name:<26} PSNR {row['psnr_db']:6.2f} dB   hue error {row['hue_error_deg']:6.2f}° on saturated pixels")
    if args.write:
        REPORT.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
