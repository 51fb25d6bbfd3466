"""Guidance beyond CFG, measured: what PAG costs in the studio against diffusers' own PAG pipeline, and what each
guidance method gives (the judge's top-5, FD) for what it costs (UNet rows per image, time).

    python -m bench.guidance                            # both parts, the embedded model, 80 prompts, one thread (~12 min)
    python -m bench.guidance --tiny                     # the overhead part on a seeded tiny model built in-process
    python -m bench.guidance --prompts 4 --skip-overhead    # a quick look at the table

1. PAG overhead (goal: studio / diffusers <= 1.03). The same prompt, seed, sampler (the model's own), steps, CFG
   7.5 and PAG 3 on the "mid" self-attention, in one process, interleaved runs, medians: the studio's generate path
   (a Txt2ImgRequest with pag_scale=3, which runs the studio's own loop, pipelines/tasks/guided.py; no previews, no
   saving) against `StableDiffusionPAGPipeline.from_pipe(<the same base pipeline>, pag_applied_layers=["mid"])`
   decoding to a PIL image. Plain CFG, studio against `StableDiffusionPipeline`, is the reference ratio (what
   bench.overhead measures). Both pairs must give the same image: the largest pixel difference is printed.

2. Method table, on the embedded model. `--prompts` prompts drawn by `recipe.evaluate.evaluation_prompts` with
   random.Random(PROMPT_SEED), leaving out the classes of recipe.evaluate's own 300 prompts (its main figure);
   prompt i with seed FIRST_SEED + i (recipe.evaluate uses 1000 + i). One image per prompt and method through the
   studio's Generator at the model's defaults (its own sampler, 25 steps, CFG 7.5, 64 px); the methods run
   interleaved per prompt (their order rotating), so machine noise falls on all alike. Per method: top-5 of the
   emoji judge (recipe/evaluate.py, trained on real images only) against the prompt's class; the Fréchet distance
   to held-out real images in the judge's feature space, with FD between two such real sets of the same size as
   its scale (FD grows as the set shrinks: compare within the table); NFE, the UNet rows evaluated per image
   (counted by a forward pre-hook on the UNet: CFG's two rows in one call count two); and the median seconds per
   image relative to CFG's. Classifier-guidance rows (prompt "", CFG 1) join when its classifier ships
   (assets/emoji-ldm-classifier); top-5 against a prompt's class does not apply to them.

Writes assets/guidance-eval.json (figures, settings, date, command; the overhead figures too when both parts ran)
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from bench.timing import interleaved_medians
from pipelines.core.samplers import make_scheduler, model_default_sampler
from pipelines.generation.generator import Generator
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.models.sources import EMBEDDED_MODEL, ModelSource
from pipelines.tasks.txt2img import Txt2ImgRequest

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "assets" / "guidance-eval.json"
CFG = 7.5
PAG_SCALE = 3.0
PAG_LAYERS = "mid"
OVERHEAD_PROMPT, OVERHEAD_SEED = "grinning face", 1234
FIRST_SEED = 3000            # table prompt i: seed FIRST_SEED + i (recipe.evaluate 1000 + i, speculative_eval 5000 + i)
PROMPT_SEED = 1              # random.Random(PROMPT_SEED) draws the table's prompts (recipe.evaluate: 0)
MAIN_FIGURE_PROMPTS = 300    # recipe.evaluate's prompts, whose classes the table leaves out
# Kynkäänniemi et al. 2024's interval for SD-XL, in the EDM noise level sigma (ComfyUI's GuidanceLimiter default):
# guidance acts for (low, high]; mapped onto the steps whose sigma falls there
INTERVAL_SIGMAS = (0.28, 5.42)
FEW_STEPS = 10               # Align Your Steps' tables are for 10 steps
CLASSIFIER_SCALE = 4.0       # when the classifier's CLASSIFIER.json names no scale


# ----------------------------------------------------------------------------------------------
# 1. PAG overhead: the studio's path against diffusers' PAG pipeline
# ----------------------------------------------------------------------------------------------
def load_model(manager: ModelManager, args: argparse.Namespace):
    """The overhead part's model: --model, the embedded model, or a seeded tiny one built in-process (--tiny, or
    when the embedded model is missing)."""
    if args.tiny or (args.model is None and not (EMBEDDED_MODEL / "model_index.json").exists()):
        from recipe.tiny import build_tiny_pipeline
        if not args.tiny:
            print(f"No embedded model in {EMBEDDED_MODEL}: timing a seeded tiny model built in-process instead.")
        folder = Path(tempfile.mkdtemp(prefix="bench-guidance-"))
        return manager.adopt(build_tiny_pipeline(folder), ModelSource("folder", str(folder), "tiny"))
    return manager.load(args.model or "embedded")


def measure_overhead(args: argparse.Namespace, worker) -> dict:
    """Median seconds of the studio and of diffusers, plain CFG and CFG + PAG, and the images' largest difference."""
    from diffusers import StableDiffusionPAGPipeline

    manager = ModelManager(MemoryManager(device=args.device), worker=worker)
    model = load_model(manager, args)
    base = model.pipeline
    sampler = args.sampler or model_default_sampler(model.scheduler_config)
    size = args.size or model.native_side
    generator = Generator(manager, outputs_dir=None)   # no saving; previews are off (preview_every 0)
    plain = Txt2ImgRequest(prompt=OVERHEAD_PROMPT, negative_prompt="", sampler=sampler, steps=args.steps,
                           guidance_scale=CFG, width=size, height=size, seed=OVERHEAD_SEED)
    pag = replace(plain, pag_scale=PAG_SCALE, pag_layers=PAG_LAYERS)
    # its own scheduler: a pipeline's constructor may rewrite a shared scheduler's config (DDIM's clip_sample)
    pag_pipeline = worker.call(lambda: StableDiffusionPAGPipeline.from_pipe(
        base, scheduler=make_scheduler(sampler, model.scheduler_config), pag_applied_layers=[PAG_LAYERS]))
    pag_pipeline.set_progress_bar_config(disable=True)

    def diffusers_call(pipeline, **extra):
        # on the device thread the studio uses, so both run with the same OpenMP thread team
        def run():
            pipeline.scheduler = make_scheduler(sampler, model.scheduler_config)   # as the studio's prepare does
            return pipeline(prompt=OVERHEAD_PROMPT, negative_prompt="", num_inference_steps=args.steps,
                            guidance_scale=CFG, width=size, height=size,
                            generator=[torch.Generator("cpu").manual_seed(OVERHEAD_SEED)], output_type="pil",
                            **extra).images[0]
        return worker.call(run)

    last: dict[str, object] = {}

    def keep(name, function):
        return lambda: last.__setitem__(name, function())

    candidates = {
        "diffusers": keep("diffusers", lambda: diffusers_call(base)),
        "studio": keep("studio", lambda: generator.generate(plain).images[0].image),
        "diffusers PAG": keep("diffusers PAG", lambda: diffusers_call(pag_pipeline, pag_scale=PAG_SCALE)),
        "studio PAG": keep("studio PAG", lambda: generator.generate(pag).images[0].image),
    }
    median = interleaved_medians(candidates, args.runs)

    def largest_difference(first, second) -> int:
        return int(np.abs(np.asarray(last[first], dtype=np.int16) - np.asarray(last[second], dtype=np.int16)).max())

    result = {
        "model": model.name, "size": size, "steps": args.steps, "sampler": sampler, "cfg": CFG,
        "pag_scale": PAG_SCALE, "pag_layers": PAG_LAYERS, "device": str(manager.memory.device),
        "threads": torch.get_num_threads(), "runs": args.runs,
        "median_ms": {name: round(value * 1000, 1) for name, value in median.items()},
        "studio_pag_over_diffusers_pag": round(median["studio PAG"] / median["diffusers PAG"], 3),
        "studio_over_diffusers": round(median["studio"] / median["diffusers"], 3),
        "pag_over_plain_studio": round(median["studio PAG"] / median["studio"], 3),
        "max_pixel_difference": {"PAG": largest_difference("studio PAG", "diffusers PAG"),
                                 "plain": largest_difference("studio", "diffusers")},
    }
    print(f"model {model.name} · {size}x{size} · {args.steps} steps · {sampler} · CFG {CFG:g} · PAG {PAG_SCALE:g} on "
          f"{PAG_LAYERS!r} · device {result['device']} · {result['threads']} thread(s) · {args.runs} interleaved runs "
          "each")
    for name, value in median.items():
        print(f"  {name:14s} median {value * 1000:8.1f} ms")
    print(f"studio PAG / diffusers PAG   = {result['studio_pag_over_diffusers_pag']:.3f}  (goal <= 1.03)")
    print(f"studio / diffusers (no PAG)  = {result['studio_over_diffusers']:.3f}  (the reference, bench.overhead)")
    print(f"PAG / plain CFG (studio)     = {result['pag_over_plain_studio']:.3f}  (a third UNet row per step)")
    print(f"largest pixel difference, studio vs diffusers: PAG {result['max_pixel_difference']['PAG']}, "
          f"plain {result['max_pixel_difference']['plain']} (of 255; 0-1 is float noise)")
    manager.unload("base")
    return result


# ----------------------------------------------------------------------------------------------
# 2. The method table
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One row: the request's settings beyond the prompt and seed. `unconditional` rows take the prompt "" (no
    class to judge against); a `classifier` row steers prompt i to category i of the classifier, round robin."""
    name: str
    settings: dict = field(default_factory=dict)
    unconditional: bool = False
    classifier: bool = False

    def request(self, prompt: str, seed: int, index: int, defaults: dict, categories: list[str]) -> Txt2ImgRequest:
        values = defaults | self.settings
        if self.classifier:
            values["classifier_class"] = categories[index % len(categories)]
        return Txt2ImgRequest(prompt="" if self.unconditional else prompt, seed=seed, **values)


def interval_from_sigmas(scheduler_config: dict, sampler: str, steps: int) -> tuple[float, float]:
    """(cfg_start, cfg_end): the share of the steps whose noise level sigma lies in INTERVAL_SIGMAS' (low, high],
    by the studio's rule that step i is inside when start <= i/n and (i+1)/n <= end."""
    from pipelines.core.schedules import schedule_table

    sigmas = schedule_table(scheduler_config, sampler, ["Default"], steps)["Default"]["sigmas"]
    low, high = INTERVAL_SIGMAS
    inside = [index for index, sigma in enumerate(sigmas) if low < sigma <= high]
    if not inside:
        raise ValueError(f"No step of {sampler} at {steps} steps has sigma in ({low}, {high}]: {list(sigmas)}.")
    return inside[0] / steps, (inside[-1] + 1) / steps


def few_step_sampler(sampler: str) -> str:
    """The sampler for the Align Your Steps rows: the model's own when it runs the schedule, else the first that does."""
    from pipelines.core.schedules import ALIGN_YOUR_STEPS, SCHEDULABLE_SAMPLERS, schedule_error

    return sampler if schedule_error(sampler, ALIGN_YOUR_STEPS) is None else SCHEDULABLE_SAMPLERS[0]


def guidance_classifier() -> tuple[list[str], float] | None:
    """The shipped classifier's categories and the scale to use (its CLASSIFIER.json's, else CLASSIFIER_SCALE); None
    when no classifier ships yet."""
    from pipelines.guidance.classifier import EMBEDDED_CLASSIFIER, WEIGHTS_NAME, load_guidance_classifier

    if not (EMBEDDED_CLASSIFIER / WEIGHTS_NAME).is_file():
        return None
    classifier = load_guidance_classifier(EMBEDDED_CLASSIFIER)
    provenance = classifier.provenance
    scale = next((float(provenance[key]) for key in ("recommended_scale", "guidance_scale", "classifier_scale")
                  if isinstance(provenance.get(key), (int, float))), CLASSIFIER_SCALE)
    return list(classifier.class_names), scale


def methods(sampler: str, interval: tuple[float, float], classifier: tuple[list[str], float] | None) -> list[Method]:
    start, end = interval
    few = few_step_sampler(sampler)
    rows = [
        Method(f"CFG {CFG:g}"),
        Method(f"CFG {CFG:g} + PAG {PAG_SCALE:g}", {"pag_scale": PAG_SCALE}),
        Method(f"PAG {PAG_SCALE:g} alone (CFG 1)", {"pag_scale": PAG_SCALE, "guidance_scale": 1.0}),
        Method(f"CFG {CFG:g} in [{start:g}, {end:g}) of the steps", {"cfg_start": start, "cfg_end": end}),
        Method(f"ICG {CFG:g}", {"cfg_method": "ICG"}),
        Method(f"CFG {CFG:g}, {FEW_STEPS} steps, Default schedule", {"steps": FEW_STEPS, "sampler": few}),
        Method(f"CFG {CFG:g}, {FEW_STEPS} steps, Align Your Steps",
               {"steps": FEW_STEPS, "sampler": few, "schedule": "Align Your Steps"}),
    ]
    if classifier is not None:
        _, scale = classifier
        rows += [Method('unconditional (prompt "", CFG 1)', {"guidance_scale": 1.0}, unconditional=True),
                 Method(f'classifier guidance s = {scale:g} (prompt "", CFG 1)',
                        {"guidance_scale": 1.0, "classifier_scale": scale}, unconditional=True, classifier=True)]
    return rows


class RowCounter:
    """UNet rows evaluated (the batch dimension of every UNet call), through a forward pre-hook."""

    def __init__(self, unet):
        self.rows = 0
        self.handle = unet.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.rows += int(sample.shape[0])

    def take(self) -> int:
        rows, self.rows = self.rows, 0
        return rows


def table_prompts(records, n: int) -> list:
    """`n` evaluation prompts drawn with PROMPT_SEED, none of a class that recipe.evaluate's main figure prompts."""
    from recipe import evaluate

    taken = {record.class_index for record in evaluate.evaluation_prompts(records, MAIN_FIGURE_PROMPTS)}
    drawn = evaluate.evaluation_prompts(records, n + MAIN_FIGURE_PROMPTS, seed=PROMPT_SEED)
    chosen = [record for record in drawn if record.class_index not in taken][:n]
    if len(chosen) < n:
        raise ValueError(f"Only {len(chosen)} prompts of classes outside recipe.evaluate's {MAIN_FIGURE_PROMPTS} "
                         f"were drawn; use fewer than {n} --prompts.")
    return chosen


def real_reference(records, judge, n: int) -> tuple[np.ndarray, float, bool]:
    """The judge's features of n real images (held out from its training where there are enough), FD between
    them and n others (the scale FD is read against), and whether they were held out."""
    from recipe import data, evaluate

    _, held_out = evaluate.holdout_split(np.array([record.class_index for record in records]),
                                         seed=judge.provenance["settings"]["seed"])
    unseen = not judge.provenance["trained_on_held_out"] and len(held_out) >= 2 * n
    pool = held_out if unseen else np.arange(len(records))
    if len(pool) < 2 * n:
        raise ValueError(f"FD needs 2 × {n} real images but there are {len(pool)}; use fewer --prompts.")
    draw = np.random.default_rng(evaluate.PROMPT_SEED).permutation(pool)
    reference, second = np.sort(draw[:n]), np.sort(draw[n:2 * n])
    real = data.load_images([records[i] for i in np.concatenate([reference, second])])
    reference_features = evaluate.features(judge, real[:n])
    return reference_features, evaluate.frechet_distance(evaluate.features(judge, real[n:]), reference_features), unseen


def measure_table(args: argparse.Namespace, worker) -> dict:
    """Every method on every prompt (on the device worker's thread: one OpenMP team for the judge and the UNet)."""
    from recipe import data, evaluate

    # 1. Prompts, the judge, the real reference images (as recipe.evaluate draws them)
    records, _ = data.load_records(data.fetch())
    chosen = table_prompts(records, args.prompts)
    labels = np.array([record.class_index for record in chosen])
    judge, _ = evaluate.load_judge()
    provenance = judge.provenance
    n = len(chosen)
    reference_features, real_vs_real, unseen = real_reference(records, judge, n)

    # 2. The methods at the model's defaults
    manager = ModelManager(MemoryManager(device=args.device), worker=worker)
    loaded = manager.load("embedded")
    generator = Generator(manager, outputs_dir=None)
    defaults = evaluate.studio_defaults(loaded)
    interval = interval_from_sigmas(loaded.scheduler_config, defaults["sampler"], defaults["steps"])
    classifier = guidance_classifier()
    if classifier is None:
        print("No guidance classifier in assets/emoji-ldm-classifier yet: the classifier-guidance rows are left out.")
    categories = classifier[0] if classifier else []
    rows = methods(defaults["sampler"], interval, classifier)
    counter = RowCounter(loaded.pipeline.unet)
    for method in rows:   # warm-up, untimed: first-call costs (PAG's processors, a schedule's tables)
        generator.generate(method.request("grinning face", 1, 0, defaults, categories))
    images: dict[str, list] = {method.name: [] for method in rows}
    seconds: dict[str, list[float]] = {method.name: [] for method in rows}
    model_rows: dict[str, list[int]] = {method.name: [] for method in rows}
    started = time.perf_counter()
    for i, record in enumerate(chosen):
        for method in rows[i % len(rows):] + rows[:i % len(rows)]:
            request = method.request(record.prompt, FIRST_SEED + i, i, defaults, categories)
            counter.take()
            begin = time.perf_counter()
            done = generator.generate(request)
            seconds[method.name].append(time.perf_counter() - begin)
            model_rows[method.name].append(counter.take())
            images[method.name].append(done.images[0].image)
        if (i + 1) % 8 == 0 or i + 1 == n:
            print(f"{i + 1}/{n} prompts, {len(rows)} methods each ({time.perf_counter() - started:.0f} s)", flush=True)
    counter.handle.remove()

    # 3. Figures
    cfg_seconds = statistics.median(seconds[rows[0].name])
    figures = {}
    for method in rows:
        pictures = evaluate.as_array(images[method.name], judge.image_size)
        logits = evaluate.classify(judge, pictures)
        median = statistics.median(seconds[method.name])
        figures[method.name] = {
            "settings": method.settings | ({"prompt": ""} if method.unconditional else {})
            | ({"classifier_class": "category i mod classes"} if method.classifier else {}),
            "top1": None if method.unconditional else round(evaluate.top_k_accuracy(logits, labels, 1), 4),
            "top5": None if method.unconditional else round(evaluate.top_k_accuracy(logits, labels, 5), 4),
            "fd_vs_real": round(evaluate.frechet_distance(evaluate.features(judge, pictures), reference_features), 2),
            "nfe_per_image": round(float(np.mean(model_rows[method.name])), 2),
            "seconds_per_image": round(median, 3),
            "time_vs_cfg": round(median / cfg_seconds, 3),
        }
    manager.unload("base")
    return {
        "model": {"name": loaded.name, "hash": loaded.model_hash},
        "prompts": n,
        "prompt_draw": f"recipe.evaluate.evaluation_prompts(records, n + {MAIN_FIGURE_PROMPTS}, "
                       f"seed={PROMPT_SEED}) without the classes of its {MAIN_FIGURE_PROMPTS} main-figure prompts",
        "seeds": f"{FIRST_SEED} + i",
        "defaults": defaults | {"negative_prompt": ""},
        "device": str(manager.memory.device), "threads": torch.get_num_threads(),
        "interval": {"cfg_start": interval[0], "cfg_end": interval[1],
                     "why": f"the steps of {defaults['sampler']} at {defaults['steps']} whose sigma lies in "
                            f"({INTERVAL_SIGMAS[0]}, {INTERVAL_SIGMAS[1]}], Kynkäänniemi et al. 2024's SD-XL interval"},
        "few_step_sampler": few_step_sampler(defaults["sampler"]),
        "classifier": None if classifier is None else {"categories": categories, "scale": classifier[1]},
        "fd_real_vs_real": round(real_vs_real, 2),
        "fd_pool": "held-out real images (never trained on by the judge)" if unseen else "all real images",
        "judge_held_out_top5": round(provenance["held_out"]["top5"], 4),
        "methods": figures,
    }


def markdown_table(table: dict) -> str:
    lines = ["| method | top-5 ↑ | FD ↓ | NFE / image | s / image vs CFG |", "| --- | --- | --- | --- | --- |"]
    for name, row in table["methods"].items():
        top5 = "n/a" if row["top5"] is None else f"{row['top5']:.1%}"
        lines.append(f"| {name} | {top5} | {row['fd_vs_real']:.1f} | {row['nfe_per_image']:g} | "
                     f"{row['time_vs_cfg']:.2f} |")
    lines.append(f"| real vs real, held out ({table['prompts']} images each; top-5: the judge's own held-out score) | "
                 f"{table['judge_held_out_top5']:.1%} | {table['fd_real_vs_real']:.1f} | | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--prompts", type=int, default=80, help="the table's prompts, one image per method each")
    parser.add_argument("--runs", type=int, default=9, help="the overhead part's interleaved runs")
    parser.add_argument("--skip-quality", action="store_true", help="leave out the method table")
    parser.add_argument("--skip-overhead", action="store_true", help="leave out the PAG overhead part")
    parser.add_argument("--tiny", action="store_true",
                        help="the overhead part on a seeded tiny model built in-process (quick); no table")
    parser.add_argument("--model", default=None, help="the overhead part's model (default: the embedded model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=None, help="the overhead part's side (default: the model's own)")
    parser.add_argument("--steps", type=int, default=25, help="the overhead part's steps")
    parser.add_argument("--sampler", default=None, help="the overhead part's sampler (default: the model's own)")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    if args.prompts < 2:
        parser.error(f"--prompts must be at least 2 (FD needs two images) but is {args.prompts}.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from pipelines.jobs.worker import DeviceWorker
    worker = DeviceWorker()
    report: dict = {}
    if not args.skip_overhead:
        report["pag_overhead"] = measure_overhead(args, worker)
    if args.tiny and not args.skip_quality:
        print("The method table is measured on the embedded model only: left out with --tiny.")
    elif not args.skip_quality:
        table = worker.call(measure_table, args, worker)
        command = ["python", "-m", "bench.guidance", *(sys.argv[1:] if argv is None else argv)]
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": shlex.join(command), **table, **report}
        from recipe.evaluate import _write_atomically
        _write_atomically(args.report, lambda partial: partial.write_text(json.dumps(report, indent=2) + "\n"))
        print(markdown_table(table))
        print(f"Wrote {args.report}.")
    return report


if __name__ == "__main__":
    main()
