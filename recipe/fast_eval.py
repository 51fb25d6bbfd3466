"""The four-step model measured beside the 25-step one, on the embedded model (issue 22's table).

    python -m recipe.fast_eval                     # every row, 300 prompts; resumes from .cache/eval/fast/
    python -m recipe.fast_eval --prompts 50        # a quick look (during training: `recipe.lcm export` first)

Rows (prompt i with seed 1000 + i, 64x64, through the studio's own Generator, one image per request):

    25 steps        the studio's defaults: DPM++ 2M, CFG 7.5 (two UNet passes per step)
    LCM 8/4/2/1     `fast`: the shipped LCM-LoRA (recipe/lcm.py), the LCM sampler, CFG 1 (one pass per step)
    LCM 4, no LoRA  the LCM sampler on the base model: what the distillation adds

Columns: the judge's top-5 on the prompts' classes and the Fréchet distance to held-out real images in its
feature space (recipe/evaluate.py's machinery, as recipe/speculative_eval.py), and the median wall-clock
seconds per image on this CPU, all rows in one process. The prompts are `recipe.evaluate.evaluation_prompts`,
whose classes the LCM-LoRA never trained on. The table goes to assets/fast-eval.json.
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

from recipe import evaluate
from recipe.speculative_eval import figures, held_out_setup

ROOT = Path(__file__).resolve().parent.parent
ROWS_DIR = ROOT / ".cache" / "eval" / "fast"
REPORT = ROOT / "assets" / "fast-eval.json"
# name -> request settings
ROWS = {
    "25 steps (DPM++ 2M, CFG 7.5)": {"steps": 25},
    "LCM-LoRA, 8 steps": {"steps": 8, "fast": True},
    "LCM-LoRA, 4 steps": {"steps": 4, "fast": True},
    "LCM-LoRA, 2 steps": {"steps": 2, "fast": True},
    "LCM-LoRA, 1 step": {"steps": 1, "fast": True},
    "LCM sampler, 4 steps, no LoRA (CFG 7.5)": {"steps": 4, "sampler": "LCM"},
}


def run_row(generator, settings: dict, prompts: list[str], log=print) -> dict:
    from pipelines.tasks.txt2img import Txt2ImgRequest

    images, seconds = [], []
    for i, prompt in enumerate(prompts):
        request = Txt2ImgRequest(prompt=prompt, seed=evaluate.FIRST_SEED + i, width=64, height=64, preview_every=0,
                                 **settings)
        begin = time.perf_counter()
        done = generator.generate(request)
        seconds.append(time.perf_counter() - begin)
        images.append(np.asarray(done.images[0].image.convert("RGB")))
        if log and ((i + 1) % 100 == 0 or i + 1 == len(prompts)):
            log(f"{settings}: {i + 1}/{len(prompts)}")
    return {"images": np.stack(images), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="row names (default: all)")
    parser.add_argument("--fresh", action="store_true", help="measure every row again (not from .cache/eval/fast/)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pipelines.jobs.worker import DeviceWorker
    worker = DeviceWorker()
    worker.call(_evaluate, args, worker)


def _evaluate(args, worker) -> None:
    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager

    prompts, labels, judge, reference, real_vs_real = held_out_setup(args.prompts)
    n = len(prompts)
    manager = ModelManager(MemoryManager(device="cpu"), worker=worker)
    manager.load("embedded")
    generator = Generator(manager, outputs_dir=None)
    lora = ROOT / "assets" / "emoji-ldm-lcm" / "LCM.json"
    trained = json.loads(lora.read_text())["steps"] if lora.exists() else None
    from pipelines.lora.adapters import short_hash
    weights = lora.with_name("pytorch_lora_weights.safetensors")
    version = short_hash(weights) if weights.exists() else "none"    # a row is measured again for other weights
    ROWS_DIR.mkdir(parents=True, exist_ok=True)
    table = {}
    for name in args.rows:
        stored = ROWS_DIR / f"{name.replace(' ', '_').replace(',', '')}-{n}-{version}.json"
        if stored.exists() and not args.fresh:
            table[name] = json.loads(stored.read_text())
            continue
        result = run_row(generator, ROWS[name], prompts)
        row = {**ROWS[name], "prompts": n, **figures(result["images"], labels, judge, reference),
               "seconds_per_image": float(np.median(result["seconds"]))}
        evaluate._write_atomically(stored, lambda partial: partial.write_text(json.dumps(row, indent=2)))
        table[name] = row
        print(name, {k: round(row[k], 4) for k in ("top5", "fd_vs_real", "seconds_per_image")})
    base = table.get("25 steps (DPM++ 2M, CFG 7.5)")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m recipe.fast_eval", "prompts": n, "lcm_lora_training_steps": trained,
              "size": 64, "seeds": f"{evaluate.FIRST_SEED} + i", "fd_real_vs_real": real_vs_real,
              "judge_held_out_top5": judge.provenance["held_out"]["top5"], "rows": table}
    if base is not None:
        for row in table.values():
            row["time_vs_25_steps"] = row["seconds_per_image"] / base["seconds_per_image"]
    evaluate._write_atomically(REPORT, lambda partial: partial.write_text(json.dumps(report, indent=2) + "\n"))
    print(markdown_table(report))


def markdown_table(report: dict) -> str:
    lines = ["| configuration | top-5 ↑ | FD ↓ | s / image | time vs 25 steps |", "| --- | --- | --- | --- | --- |"]
    for name, row in report["rows"].items():
        ratio = row.get("time_vs_25_steps")
        lines.append(f"| {name} | {row['top5']:.1%} | {row['fd_vs_real']:.1f} | {row['seconds_per_image']:.3f} | "
                     f"{'–' if ratio is None else f'{ratio:.2f}×'} |")
    lines.append(f"| real vs real, held-out ({report['prompts']} images) | {report['judge_held_out_top5']:.1%} | "
                 f"{report['fd_real_vs_real']:.1f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
