"""Outpainting's seam and sharpness measured on the embedded model (issue 25, item 9: "a visible seam and a blurry
half-object in the new strip").

    python -m recipe.outpaint_eval                  # this checkout: 11 pictures × 2 cases × 3 seeds, about a minute
    python -m recipe.outpaint_eval --seeds 1        # a quick look

Another checkout's code side by side (the same script and pictures, that checkout's pipelines/):

    git archive COMMIT pipelines | tar -x -C /tmp/before && ln -s "$PWD/assets" /tmp/before/assets
    PYTHONPATH=/tmp/before python recipe/outpaint_eval.py

The pictures: the studio's examples (assets/examples: three 256-px emoji, six 64-px held-out ones; real emoji art,
of the kind the model trained on), and a photograph it never saw, matplotlib's sample of Grace Hopper (public
domain), at 64 and 256 px. Each goes through the studio's own Generator with the outpainting request's defaults
and the picture's name as the prompt, in two cases: "extended", the whole picture extended right by 64 px (as in
the issue), and "cut", the picture cut to its left 5/8 (its object cut by the edge) and extended back to its width.
Figures, for the seam at the original's right edge (column W), per case over the emoji, then by kind and size:

    seam           mean |step across the seam (columns W-1 → W)| / mean |step between neighbouring columns| three
                   columns either side, pooled over the pictures and seeds: 1 = no seam
    sharpness      Laplacian variance of the new strip / of the original, median
    seam band      mean |d²/dy²| (detail along the seam) in the new strip's first 8 columns / in the original's last 8,
                   pooled: under 1, a blurred band along the seam
    across/along   mean |d²/dx²| / mean |d²/dy²| in the new strip, over the same in the original, median: under 1,
                   the strip is coarser across than along (stretched)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
CUT_FRACTION = 5 / 8
EXTEND_PX = 64


def column_steps(image: np.ndarray) -> np.ndarray:
    """Mean |difference| between neighbouring columns, over rows and channels: entry c is column c → c + 1."""
    return np.abs(np.diff(np.asarray(image, dtype=np.float64), axis=1)).mean(axis=(0, 2))


def seam_steps(image: np.ndarray, seam_column: int, reach: int = 3) -> tuple[float, float]:
    """(the step across the seam, the mean step between neighbouring columns `reach` columns either side)."""
    steps = column_steps(image)
    seam = seam_column - 1
    return float(steps[seam]), float(np.mean(np.r_[steps[seam - reach:seam], steps[seam + 1:seam + 1 + reach]]))


def grey(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("L"), dtype=np.float64)


def laplacian_variance(image: np.ndarray) -> float:
    return float(ndimage.laplace(grey(image))[1:-1, 1:-1].var())


def along_detail(image: np.ndarray) -> float:
    """Mean |d²/dy²|: the detail along a vertical seam."""
    return float(np.abs(np.diff(grey(image), 2, axis=0)).mean())


def across_along(image: np.ndarray) -> float:
    """Mean |d²/dx²| over mean |d²/dy²|: how much finer the picture is across (x) than along (y)."""
    values = grey(image)
    across = np.abs(np.diff(values, 2, axis=1))[1:-1].mean()
    along = np.abs(np.diff(values, 2, axis=0))[:, 1:-1].mean()
    return float(across / max(along, 1e-6))


def figures(result: np.ndarray, seam_column: int) -> dict[str, float]:
    """The figures of one result whose original ends at `seam_column` (the new strip is to its right)."""
    original, strip = result[:, :seam_column], result[:, seam_column:]
    seam, neighbours = seam_steps(result, seam_column)
    return {"seam": seam, "neighbours": neighbours,
            "sharpness": laplacian_variance(strip) / max(laplacian_variance(original), 1e-6),
            "band detail": along_detail(strip[:, :8]), "edge detail": along_detail(original[:, -8:]),
            "across/along": across_along(strip) / max(across_along(original), 1e-6)}


def pictures() -> list[tuple[str, Image.Image]]:
    """(prompt, picture) for the six 64-px held-out emoji, then the three 256-px examples."""
    paths = sorted((EXAMPLES / "held-out").glob("*.png")) + sorted(EXAMPLES.glob("*.png"))
    return [(path.stem.split("-", 1)[1].split(",")[0].replace("-", " "), Image.open(path).convert("RGB"))
            for path in paths]


def photographs() -> list[tuple[str, Image.Image]]:
    """(prompt, picture): a photograph, its top square at 64 and 256 px."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as file:
        photo = Image.open(file).convert("RGB")
    square = photo.crop((0, 0, photo.width, photo.width))
    return [("woman", square.resize((side, side), Image.Resampling.LANCZOS)) for side in (64, 256)]


def cases(picture: Image.Image) -> dict[str, tuple[Image.Image, int]]:
    """Each case's source and how far it is extended to the right."""
    width, height = picture.size
    cut = round(width * CUT_FRACTION)
    return {"extended": (picture, EXTEND_PX), "cut": (picture.crop((0, 0, cut, height)), width - cut)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    import torch

    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from pipelines.tasks.outpaint import OutpaintRequest

    torch.set_num_threads(1)
    models = ModelManager(MemoryManager(device="cpu"))
    models.load("embedded")
    generator = Generator(models, outputs_dir=None)
    start = time.perf_counter()
    rows: dict[str, list[dict[str, float]]] = {}
    for kind, sources in (("emoji", pictures()), ("photo", photographs())):
        for prompt, picture in sources:
            for case, (source, right) in cases(picture).items():
                for seed in range(args.seeds):
                    done = generator.generate(OutpaintRequest(prompt=prompt, init_image=source, right=right, seed=seed))
                    measured = figures(np.asarray(done.images[0].image), source.width)
                    for row in ((case,) if kind == "emoji" else ()) + (f"{case}, {kind} {picture.height} px",):
                        rows.setdefault(row, []).append(measured)
    print(f"{'case':24s} {'seam':>6s} {'sharpness':>10s} {'seam band':>10s} {'across/along':>13s}")
    for row, measured in sorted(rows.items()):
        pooled = {name: sum(item[top] for item in measured) / sum(item[bottom] for item in measured)
                  for name, top, bottom in (("seam", "seam", "neighbours"), ("band", "band detail", "edge detail"))}
        medians = {name: float(np.median([item[name] for item in measured])) for name in ("sharpness", "across/along")}
        print(f"{row:24s} {pooled['seam']:6.2f} {medians['sharpness']:10.3f} {pooled['band']:10.3f} "
              f"{medians['across/along']:13.3f}")
    print(f"({args.seeds} seed(s) per picture and case, {time.perf_counter() - start:.0f} s)")

if __name__ == "__main__":
    main()
