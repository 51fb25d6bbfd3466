"""Speculative sampling measured as the paper's table, on the embedded model.

    python -m recipe.speculative_eval                  # every row; resumes from .cache/eval/speculative/
    python -m recipe.speculative_eval --prompts 50     # a quick look

Rows (each prompt i with seed 1000 + i, CFG 7.5, 64x64, through the studio's own Generator):

    draft only, DDPM 100 steps      the draft UNet (recipe/draft.py) as the model
    target, DDPM 100 steps          the embedded model
    target, DDPM 30 steps
    speculative, DDPM 100 steps     at several drafts and draft lengths L

Columns: the judge's top-5 on the prompts' classes and the Fréchet distance to real images in its
feature space (recipe/evaluate.py's machinery: real held-out images the judge never trained on as the
reference), the target's sequential calls per image (NFE; plain DDPM: one per step; CFG's two passes
are one batched call), the acceptance rate, and wall-clock seconds per image on this
CPU. The prompts are `recipe.evaluate.evaluation_prompts` (300), whose classes the draft never trained
on. Speculative rows are exact samples of the target's DDPM chain: their quality differs from "target,
100 steps" only by sampling noise (the seeds' noise is used differently), which the two real-vs-real
figures put a scale on.

Each row is saved when done (.cache/eval/speculative/ROW.json), so a stopped run resumes; the table goes
to assets/speculative-eval.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from recipe import data, evaluate

ROOT = Path(__file__).resolve().parent.parent
ROWS_DIR = ROOT / ".cache" / "eval" / "speculative"
REPORT = ROOT / "assets" / "speculative-eval.json"
GUIDANCE = 7.5
# name -> (model, sampler, steps, draft, draft length)
ROWS = {
    "draft only, DDPM 100": ("draft", "DDPM", 100, None, None),
    "target, DDPM 100": ("target", "DDPM", 100, None, None),
    "target, DDPM 30": ("target", "DDPM", 30, None, None),
    # the same chain again with other seeds: how far sampling noise alone moves the figures
    "target, DDPM 100, seeds 5000 + i": ("target", "DDPM", 100, None, None),
    "speculative, frozen target (eps), L 4": ("target", "DDPM speculative", 100, "frozen target", 4),
    "speculative, frozen target x0, L 4": ("target", "DDPM speculative", 100, "frozen target x0", 4),
    "speculative, frozen target x0, L 8": ("target", "DDPM speculative", 100, "frozen target x0", 8),
    "speculative, frozen target x0, L 16": ("target", "DDPM speculative", 100, "frozen target x0", 16),
    "speculative, draft model, L 4": ("target", "DDPM speculative", 100, "draft model", 4),
    "speculative, anchored draft model, L 4": ("target", "DDPM speculative", 100, "anchored draft model", 4),
}


def _draft_as_model(manager) -> None:
    """Put a pipeline whose UNet is the shipped draft into the base slot (the "draft only" row)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from pipelines.models.drafts import EMBEDDED_DRAFT
    from pipelines.models.sources import EMBEDDED_MODEL, ModelSource
    pipeline = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, safety_checker=None,
                                                       requires_safety_checker=False)
    pipeline.unet = UNet2DConditionModel.from_pretrained(EMBEDDED_DRAFT)
    manager.adopt(pipeline, ModelSource("folder", str(EMBEDDED_DRAFT), "embedded-draft"))


def run_row(name: str, prompts: list[str], worker, log=print) -> dict:
    """Generate every prompt for one row; returns its images and per-image costs."""
    from pipelines.generation.generator import Generator
    from pipelines.io.metadata import parse_infotext
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from pipelines.tasks.txt2img import Txt2ImgRequest

    model, sampler, steps, draft, length = ROWS[name]
    first_seed = 5000 if "seeds 5000" in name else evaluate.FIRST_SEED
    manager = ModelManager(MemoryManager(device="cpu"), worker=worker)
    if model == "draft":
        _draft_as_model(manager)
    else:
        manager.load("embedded")
    generator = Generator(manager, outputs_dir=None)
    extra = {"draft": draft, "draft_length": length} if draft else {}
    images, seconds, target_calls, acceptance = [], [], [], []
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        request = Txt2ImgRequest(prompt=prompt, sampler=sampler, steps=steps, guidance_scale=GUIDANCE,
                                 width=64, height=64, seed=first_seed + i, **extra)
        begin = time.perf_counter()
        done = generator.generate(request)
        seconds.append(time.perf_counter() - begin)
        image = done.images[0]
        images.append(np.asarray(image.image.convert("RGB")))
        _, _, parameters = parse_infotext(image.infotext)
        target_calls.append(int(parameters.get("Target calls", steps)) if model == "target" else 0)
        acceptance.append(float(parameters["Draft acceptance"]) if "Draft acceptance" in parameters else None)
        if (i + 1) % 25 == 0 or i + 1 == len(prompts):
            log(f"{name}: {i + 1}/{len(prompts)} ({time.perf_counter() - started:.0f} s)")
    manager.unload("base")
    return {"images": np.stack(images), "seconds": seconds, "target_calls": target_calls, "acceptance": acceptance}


def figures(images: np.ndarray, labels: np.ndarray, judge, reference_features: np.ndarray) -> dict:
    logits = evaluate.classify(judge, images)
    return {"top1": evaluate.top_k_accuracy(logits, labels, 1), "top5": evaluate.top_k_accuracy(logits, labels, 5),
            "fd_vs_real": evaluate.frechet_distance(evaluate.features(judge, images), reference_features)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="row names (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pipelines.jobs.worker import DeviceWorker
    worker = DeviceWorker()
    worker.call(_evaluate, args, worker)


def held_out_setup(count: int) -> tuple[list[str], np.ndarray, object, np.ndarray, float]:
    """The evaluation's prompts and their classes, the shipped judge, its features of `count` held-out real images
    (FD's reference) and the FD between two such real sets (here and recipe/fast_eval.py)."""
    records, _ = data.load_records(data.fetch())
    chosen = evaluate.evaluation_prompts(records, count)
    judge, _ = evaluate.load_judge()
    real = evaluate.real_images(records)
    _, held_out = evaluate.holdout_split(np.array([r.class_index for r in records]))
    draw = np.random.default_rng(evaluate.PROMPT_SEED).permutation(held_out)
    n = len(chosen)
    reference = evaluate.features(judge, real[np.sort(draw[:n])])
    real_vs_real = evaluate.frechet_distance(evaluate.features(judge, real[np.sort(draw[n:2 * n])]), reference)
    return [r.prompt for r in chosen], np.array([r.class_index for r in chosen]), judge, reference, real_vs_real


def _evaluate(args, worker) -> None:
    prompts, labels, judge, reference, real_vs_real = held_out_setup(args.prompts)
    n = len(prompts)
    ROWS_DIR.mkdir(parents=True, exist_ok=True)
    table = {}
    for name in args.rows:
        stored = ROWS_DIR / f"{name.replace(' ', '_').replace(',', '')}-{n}.json"
        if stored.exists():
            table[name] = json.loads(stored.read_text())
            print(f"{name}: from {stored}")
            continue
        result = run_row(name, prompts, worker)
        model, sampler, steps, draft, length = ROWS[name]
        rates = [a for a in result["acceptance"] if a is not None]
        row = {"model": model, "sampler": sampler, "steps": steps, "draft": draft, "draft_length": length,
               "prompts": n, **figures(result["images"], labels, judge, reference),
               "target_nfe": float(np.mean(result["target_calls"])) if model == "target" else None,
               "acceptance": float(np.mean(rates)) if rates else None,
               "seconds_per_image": float(np.median(result["seconds"]))}
        evaluate._write_atomically(stored, lambda partial: partial.write_text(json.dumps(row, indent=2)))
        table[name] = row
        print(name, {k: row[k] for k in ("top5", "fd_vs_real", "target_nfe", "acceptance", "seconds_per_image")})
    # rows measured on other prompt counts (a quicker sweep) stay in the report beside these
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {"rows": {}, "fd_real_vs_real": {}}
    report.update({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "command": "python -m recipe.speculative_eval [--prompts N --rows ...]", "cfg": GUIDANCE,
                   "size": 64, "seeds": f"{evaluate.FIRST_SEED} + i",
                   "judge_held_out_top5": judge.provenance["held_out"]["top5"]})
    report["fd_real_vs_real"][str(n)] = real_vs_real
    report["rows"].update({f"{name} ({n} prompts)": row for name, row in table.items()})
    evaluate._write_atomically(REPORT, lambda partial: partial.write_text(json.dumps(report, indent=2) + "\n"))
    print(markdown_table(report))


def markdown_table(report: dict) -> str:
    lines = ["| configuration (prompts) | top-5 ↑ | FD ↓ | target NFE ↓ | accepted | s / image |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in report["rows"].items():
        nfe = "–" if row["target_nfe"] is None else f"{row['target_nfe']:.1f}"
        accepted = "–" if row["acceptance"] is None else f"{row['acceptance']:.0%}"
        lines.append(f"| {name} | {row['top5']:.1%} | {row['fd_vs_real']:.1f} | {nfe} | {accepted} | "
                     f"{row['seconds_per_image']:.2f} |")
    for n, value in report["fd_real_vs_real"].items():
        lines.append(f"| real vs real, held-out ({n} images) | {report['judge_held_out_top5']:.1%} | {value:.1f} | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
