"""Does a style learnt with the training tab's defaults carry over to prompts it never saw?

As a new user would try it: 16 pictures in one style (real emoji art, Noto, turned grayscale: a style the
embedded model never draws), each captioned with its name, the tab's defaults, and 12 held-out prompts (other
emoji, none in the captions). For each method its style measure, the mean saturation (HSV S over every pixel,
0 for greys), with the training against without it, on the same prompts and seeds:

    moved = (S_without - S_with) / (S_without - S_training images)      (1: all the way; goal >= 0.5)

and, so that a training that merely wrecks the pictures does not pass for a style, how much of each picture's
drawing it kept: the correlation of its grey levels with the picture the same prompt and seed give without it.
(The emoji judge cannot tell: it names real emoji from their colours, and scores 0 of the grayscale training
pictures themselves.)

- LoRA: "<prompt> <lora:name:1>" against "<prompt>" (the tab's default: no trigger word; with `--trigger WORD`,
  the word in front of the captions and of both prompts);
- textual inversion: "<name>, <prompt>" (the embedding used by its name) against "<prompt>".

    python -m bench.training_generalisation                      # both methods, the defaults
    python -m bench.training_generalisation --method lora --set steps=600 --set learning_rate=1e-3
    python -m bench.training_generalisation --method lora --trigger grayscale --write     # adds a row
    python -m bench.training_generalisation --method lora --attention-only --set learning_rate=5e-4 --write

Needs the emoji art (`recipe.data.fetch`, the recipe's one network step: npm). Prints a table and writes
assets/training-generalisation.json (with `--write`), where each row replaces the one of the same variant (method,
trigger, adapted layers, settings) and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "assets" / "training-generalisation.json"
TRAINING_IMAGES, HELD_OUT_PROMPTS = 16, 12
DATA_SEED, FIRST_SEED = 7, 900
ATTENTION_ONLY = ["to_q", "to_k", "to_v", "to_out.0"]


def style_data() -> tuple[list[Image.Image], list[str], list[str]]:
    """(16 grayscale pictures, their captions, 12 held-out prompts): Noto emoji without skin tones, drawn at
    random (seeded); the held-out prompts name other emoji."""
    from recipe import data

    records, _ = data.load_records(data.fetch())
    plain = [record for record in records if record.style == "noto" and record.skin_tone is None]
    chosen = random.Random(DATA_SEED).sample(plain, TRAINING_IMAGES + HELD_OUT_PROMPTS)
    training, held_out = chosen[:TRAINING_IMAGES], chosen[TRAINING_IMAGES:]
    images = [ImageOps.grayscale(Image.fromarray(data.load_image(record.image_path))).convert("RGB")
              for record in training]
    return images, [record.name for record in training], [record.name for record in held_out]


def structure_kept(with_images: list[Image.Image], without_images: list[Image.Image]) -> float:
    """The mean correlation of the grey levels of each picture with the training against the same prompt and seed
    without it: near 1 when the style changed the colours and kept the drawing, near 0 when the picture is
    another (or a wreck)."""
    def grey(image):
        return np.asarray(ImageOps.grayscale(image), dtype=np.float64).ravel()
    return float(np.mean([np.corrcoef(grey(a), grey(b))[0, 1] for a, b in zip(with_images, without_images)]))


def saturation(images: list[Image.Image]) -> float:
    """Mean HSV saturation over every pixel, 0..1."""
    return float(np.mean([np.asarray(image.convert("HSV"))[..., 1].mean() / 255 for image in images]))


def measure(models, generator, method: str, overrides: dict, images, captions, held_out, trigger: str,
            grid: Path | None = None, attention_only: bool = False) -> dict:
    from pipelines.jobs.worker import Priority
    from pipelines.tasks.txt2img import Txt2ImgRequest
    from pipelines.training.loop import train
    from pipelines.training.request import TrainingRequest

    name = f"gray-{method.replace('_', '-')}"
    extra = {"trigger": trigger} if method == "lora" else {}
    request = TrainingRequest(name=name, images=images, captions=captions, method=method, sample_every=0,
                              **extra | overrides)
    started = time.perf_counter()
    with adapted_layers(ATTENTION_ONLY if attention_only else None):
        result = models.worker.submit(lambda job: train(models, request, job, cache_dir=models.lora_dir / ".runs"),
                                      kind="train", priority=Priority.BACKGROUND).result()
    seconds = time.perf_counter() - started
    if method == "textual_inversion":
        prompts_with, prompts_without = [f"{name}, {p}" for p in held_out], list(held_out)
    else:
        prompts_without = [", ".join(part for part in (trigger, p) if part) for p in held_out]
        prompts_with = [f"{p} <lora:{name}:1>" for p in prompts_without]

    def draw(prompts: list[str]) -> list[Image.Image]:
        return [generator.generate(Txt2ImgRequest(prompt=prompt, seed=FIRST_SEED + number)).images[0].image
                for number, prompt in enumerate(prompts)]
    with_images, without_images = draw(prompts_with), draw(prompts_without)
    if grid is not None:        # without the training above, with it below, a column per held-out prompt
        sheet = Image.new("RGB", (64 * len(held_out), 128), "white")
        for column, (plain, styled) in enumerate(zip(without_images, with_images)):
            sheet.paste(plain.resize((64, 64)), (64 * column, 0))
            sheet.paste(styled.resize((64, 64)), (64 * column, 64))
        sheet.save(grid.with_name(f"{grid.stem}-{method}{grid.suffix}"))
    target, s_with, s_without = saturation(images), saturation(with_images), saturation(without_images)
    return {"method": method, "trigger": trigger, "layers": "attention" if attention_only else "default",
            "overrides": overrides, "settings": request.settings(), "training_seconds": round(seconds, 1),
            "final_loss": round(result.final_loss, 4), "saturation_training": round(target, 4),
            "saturation_without": round(s_without, 4), "saturation_with": round(s_with, 4),
            "moved": round((s_without - s_with) / (s_without - target), 3),
            "structure_kept": round(structure_kept(with_images, without_images), 3)}


@contextmanager
def adapted_layers(targets: list[str] | None):
    """The LoRA on the UNet's `targets` alone for one training (None: the studio's own, kohya's transformer
    layers), to compare with the attention-only LoRA the studio trained before."""
    from pipelines.training import methods

    kept = methods.UNET_TARGETS
    methods.UNET_TARGETS = targets or kept
    try:
        yield
    finally:
        methods.UNET_TARGETS = kept


def merged(rows: list[dict]) -> list[dict]:
    """The report's rows with `rows` in place of those of the same variant: method, trigger word, adapted layers
    and the settings given (`--set`), the others being the defaults of the day."""
    def variant(row: dict) -> str:
        return json.dumps([row["method"], row["trigger"], row["layers"], row["overrides"]], sort_keys=True)
    kept = json.loads(REPORT.read_text())["rows"] if REPORT.is_file() else []
    new = {variant(row) for row in rows}
    return [row for row in kept if variant(row) not in new] + rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", choices=["lora", "textual_inversion"],
                        help="the method(s) to measure (default: both)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting other than the default (JSON value), e.g. steps=600")
    parser.add_argument("--trigger", default="", help="LoRA: a trigger word (default: none, as the tab starts)")
    parser.add_argument("--attention-only", action="store_true",
                        help="LoRA: adapt the attention projections alone (the studio's old default)")
    parser.add_argument("--grid", type=Path, default=None,
                        help="save the pictures here (PATH-<method>.png): without above, with below")
    parser.add_argument("--write", action="store_true", help=f"write {REPORT.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}

    from pipelines.generation.generator import Generator
    from pipelines.jobs.worker import DeviceWorker
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager

    images, captions, held_out = style_data()
    models = ModelManager(MemoryManager(device="cpu"), worker=DeviceWorker(),
                          models_dir=ROOT / ".cache" / "bench-generalisation")
    models.load("embedded")
    generator = Generator(models, outputs_dir=None)
    rows = [measure(models, generator, method, overrides, images, captions, held_out, args.trigger, args.grid,
                    attention_only=args.attention_only and method == "lora")
            for method in args.method or ["lora", "textual_inversion"]]
    print(f"{TRAINING_IMAGES} grayscale emoji, {HELD_OUT_PROMPTS} held-out prompts; overrides {overrides or 'none'}")
    print(f"{'method':<18} {'layers':<10} {'trigger':<10} {'S train':>8} {'S without':>10} {'S with':>8} {'moved':>7} "
          f"{'drawing kept':>13} {'train s':>8}")
    for row in rows:
        print(f"{row['method']:<18} {row['layers']:<10} {row['trigger'] or '-':<10} {row['saturation_training']:8.3f} {row['saturation_without']:10.3f} "
              f"{row['saturation_with']:8.3f} {row['moved']:7.0%} {row['structure_kept']:13.2f} "
              f"{row['training_seconds']:8.1f}")
    if args.write:
        REPORT.write_text(json.dumps({"training_images": TRAINING_IMAGES, "held_out_prompts": held_out,
                                      "captions": captions, "rows": merged(rows)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
