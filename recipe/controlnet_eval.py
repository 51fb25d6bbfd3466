"""The shipped ControlNets measured on emoji they never trained on.

    python -m recipe.controlnet_eval                     # all three, 300 held-out images; -> assets/controlnet-eval.json
    python -m recipe.controlnet_eval --prompts 30 --kinds canny    # a quick look
    python -m recipe.controlnet_eval --fast --as-drawn 0   # with Fast (the LCM-LoRA, 4 steps): -> ...-fast.json

For held-out emoji i (the first 200 of the evaluation prompts of `recipe.evaluate.evaluation_prompts`, whose
classes no ControlNet trained on) the control image is made from the real emoji (`recipe.controlnet.
evaluation_control`: canny edges at 100/200, a seeded scribble from them, the 8×8 colour grid), and the studio
generates the emoji's prompt with seed 1000 + i through its own Generator, with the ControlNet (weight 1,
balanced) and without it (Text-to-Image, same prompt, seed, sampler and steps).

The embedded model has seen these emoji (only the ControlNets have not), and its Text-to-Image puts each one
centred and full size, where the real emoji's lines are: unmoved ("as drawn") controls would credit the
prompt with what the control should do. So the control is made from the emoji *moved* (scaled to 65-85%,
shifted; `evaluation_placement`, seeded), and also, for the first 100, as drawn. Figures:

    edge F1       canny and scribble: F1 between the canny edges (100/200) of the generated image and the
                  control lines, with a 1-px tolerance (a pixel counts as matched when the other map has a line
                  within its 3×3 neighbourhood)
    colour error  colour layout: the mean absolute difference, in 0-255 levels per channel, between the 8×8
                  mean-colour grid of the generated image and the control grid
    top-5         the shipped judge's (recipe/evaluate.py) top-5 accuracy on the prompts' classes: the prompt
                  must still count with control on. The judge knows emoji centred and full size, so a moved
                  emoji is judged on the box the control put it in, cut out and resized (`unplace`)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.tasks import preprocessors
from recipe import controlnet, data, evaluate

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "assets" / "controlnet-eval.json"
GRID = ROOT / "assets" / "controlnet-grid.png"
EXAMPLES_DIR = ROOT / "assets" / "examples" / "held-out"   # a few held-out emoji, for the tests
EXAMPLES = 6


def edge_f1(generated: np.ndarray, control: np.ndarray, tolerance_px: int = 1) -> float:
    """F1 of two binary line maps (H×W bool) with a `tolerance_px` match radius."""
    import cv2
    kernel = np.ones((2 * tolerance_px + 1,) * 2, np.uint8)
    near_control = cv2.dilate(control.astype(np.uint8), kernel) > 0
    near_generated = cv2.dilate(generated.astype(np.uint8), kernel) > 0
    if not generated.any() or not control.any():
        return 0.0
    precision = float((generated & near_control).sum() / generated.sum())
    recall = float((control & near_generated).sum() / control.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def edges_of(image: Image.Image) -> np.ndarray:
    return np.asarray(preprocessors.canny(image))[..., 0] > 127


def colour_error(generated: Image.Image, control: Image.Image) -> float:
    grid = np.asarray(preprocessors.colour_grid(generated), np.float32)
    return float(np.abs(grid - np.asarray(control.convert("RGB"), np.float32)).mean())


def score(kind: str, generated: Image.Image, control: Image.Image) -> float:
    if kind == "colour":
        return colour_error(generated, control)
    return edge_f1(edges_of(generated), np.asarray(control.convert("L")) > 127)


def text_to_image(generator, records, settings: dict, log=print) -> list[Image.Image]:
    """The Text-to-Image image of every prompt (seed 1000 + i): what each ControlNet is compared with."""
    from pipelines.tasks.txt2img import Txt2ImgRequest
    images, started = [], time.perf_counter()
    for i, record in enumerate(records):
        images.append(generator.generate(Txt2ImgRequest(prompt=record.prompt, seed=evaluate.FIRST_SEED + i,
                                                        **settings)).images[0].image)
        if log and ((i + 1) % 50 == 0 or i + 1 == len(records)):
            log(f"text-to-image: {i + 1}/{len(records)} ({time.perf_counter() - started:.0f} s)")
    return images


def measure(kind: str, generator, records, images, without: list[Image.Image], *, settings: dict, moved: bool,
            log=print) -> dict:
    """Generate every held-out emoji with the ControlNet (its control made from the real emoji, moved or as
    drawn); score it and the Text-to-Image image of the same prompt and seed against the control."""
    from pipelines.tasks.controlnet import ControlNetRequest

    with_control, controls, started = [], [], time.perf_counter()
    for i, (record, image) in enumerate(zip(records, images)):
        if moved:
            image = controlnet.place(image, *controlnet.evaluation_placement(i))
        control = controlnet.evaluation_control(kind, image)
        controls.append(control)
        with_control.append(generator.generate(ControlNetRequest(
            prompt=record.prompt, seed=evaluate.FIRST_SEED + i, **settings, control_image=control,
            preprocessor="none", model=controlnet.output_folder(kind).name)).images[0].image)
        if log and ((i + 1) % 50 == 0 or i + 1 == len(records)):
            log(f"{kind}{' moved' if moved else ''}: {i + 1}/{len(records)} ({time.perf_counter() - started:.0f} s)")
    return {"with": with_control, "without": without[:len(records)], "controls": controls,
            "score_with": [score(kind, g, c) for g, c in zip(with_control, controls)],
            "score_without": [score(kind, g, c) for g, c in zip(without, controls)]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200, help="held-out emoji with moved controls")
    parser.add_argument("--as-drawn", type=int, default=100, help="of them, how many also with unmoved controls")
    parser.add_argument("--kinds", nargs="+", choices=controlnet.KINDS, default=list(controlnet.KINDS))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--fast", action="store_true", help="generate with Fast: the LCM-LoRA, LCM, 4 steps, CFG 1")
    parser.add_argument("--report", type=Path, default=None, help=f"default: {REPORT.name} (-fast.json with --fast)")
    args = parser.parse_args(argv)
    args.report = args.report or (REPORT.with_name(REPORT.stem + "-fast.json") if args.fast else REPORT)
    import torch
    torch.set_num_threads(args.threads)

    records, _ = data.load_records(data.fetch())
    held_out = evaluate.evaluation_prompts(records, args.prompts)
    images = data.load_images(held_out)
    generator, loaded = evaluate.studio_generator("embedded")
    settings = {key: value for key, value in evaluate.studio_defaults(loaded).items()}
    if args.fast:    # the sampler and CFG the request runs with are Fast's (pipelines/core/fast.py)
        settings.update(steps=4, fast=True)
    judge, _ = evaluate.load_judge()
    labels = np.array([record.class_index for record in held_out])
    without = text_to_image(generator, held_out, settings)

    def top5(samples) -> float:
        return evaluate.top_k_accuracy(evaluate.classify(judge, evaluate.as_array(samples, 64)),
                                       labels[:len(samples)], 5)

    ran = settings | ({"sampler": "LCM", "guidance_scale": 1.0, "lora": "emoji-ldm-lcm"} if args.fast else {})
    figures: dict = {"held-out emoji": len(held_out), "as drawn": args.as_drawn, "settings": ran,
                     "top-5 text-to-image": top5(without), "date": datetime.date.today().isoformat(),
                     "command": " ".join(["python -m recipe.controlnet_eval",
                                          *(sys.argv[1:] if argv is None else argv)])}
    grid_rows = []
    for kind in args.kinds:
        metric = "colour error" if kind == "colour" else "edge F1"
        figures[kind] = {"metric": metric, "trained steps": json.loads(
            (controlnet.output_folder(kind) / "CONTROLNET.json").read_text())["steps"]}
        for moved, count in ((True, len(held_out)), (False, args.as_drawn)):
            if count == 0:
                continue
            results = measure(kind, generator, held_out[:count], images[:count], without, settings=settings,
                              moved=moved)
            # the judge knows emoji centred and full size: a moved one is cut out where the control put it
            judged = [controlnet.unplace(image, *controlnet.evaluation_placement(i)) if moved else image
                      for i, image in enumerate(results["with"])]
            figures[kind]["moved" if moved else "as drawn"] = {
                "with control": float(np.mean(results["score_with"])),
                "text-to-image": float(np.mean(results["score_without"])),
                "top-5 with control": top5(judged), "top-5 text-to-image": top5(results["without"])}
            if moved:
                grid_rows.append((kind, results))
        print(kind, json.dumps(figures[kind]))
    args.report.write_text(json.dumps(figures, indent=2) + "\n")
    if args.report == REPORT:
        _grid(grid_rows, held_out).save(GRID)
        for record, image in zip(held_out[:EXAMPLES], images):   # for tests/test_embedded.py
            EXAMPLES_DIR.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(EXAMPLES_DIR / f"{record.style}-{record.prompt.replace(' ', '-')}.png")
    return figures


def _grid(rows, records, columns: int = 6) -> Image.Image:
    """control → with control → without, for the first `columns` emoji of each kind."""
    cells, captions = [], []
    for kind, results in rows:
        for i in range(columns):
            cells += [results["controls"][i], results["with"][i], results["without"][i]]
            captions += [f"{kind}: {records[i].prompt}", "with ControlNet", "Text-to-Image"]
    return evaluate.sample_grid(cells, captions, columns=3 * columns)


if __name__ == "__main__":
    main()
