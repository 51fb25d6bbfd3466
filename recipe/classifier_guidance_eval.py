"""Classifier guidance measured on the embedded model: does the guidance scale s steer a sample into the category
asked for, and what does it cost in quality and time?

    python -m recipe.classifier_guidance_eval                            # scales 0 2.5 5 10 20 40, 6 seeds each
    python -m recipe.classifier_guidance_eval --scales 0 4 --seeds 2     # a quick look

For every scale s, every category c of the guidance classifier (assets/emoji-ldm-classifier) and seeds
50000 + 100 c + k (k < --seeds; seeds no other recipe uses, the same for every scale, so rows differ only by s),
one image through the studio's own generation path (recipe.evaluate.studio_generator, a Txt2ImgRequest with
`classifier_class=c, classifier_scale=s`) at the embedded model's defaults (its own sampler, 25 steps, 64x64), in
two modes:

    unconditional      prompt "", CFG 1.0: only the classifier steers
    weakly prompted    prompt "emoji", CFG 3: the text says nothing about the category

Figures per (mode, s), all from the INDEPENDENT shipped judge (assets/eval/emoji-classifier.safetensors, trained on
real images only, which names the base emoji): class accuracy is how often the judge's top-1 base emoji belongs to
the category asked for (its category from recipe/data.py's records), never the guidance classifier's own opinion;
the judge's confidence is its mean top-1 probability; FD is the Fréchet distance between the samples and real
images in the judge's 256-d feature layer, the reference being category-balanced real images of the emoji the
guidance classifier never trained on (the judge trained on most of them), with FD between a second such real draw
and the reference, at the samples' size, as its scale. s/image is the median wall time of one request. With 6 seeds
a row is 54 images: an accuracy near 40% is known to about ±7 points (one standard error), so read the trend.

Writes assets/classifier-guidance-eval.json (figures, settings, date, command) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipelines.guidance.classifier import EMBEDDED_CLASSIFIER, load_guidance_classifier
from recipe import classifier as classifier_recipe
from recipe import data, evaluate

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "assets" / "classifier-guidance-eval.json"
FIRST_SEED = 50_000          # category c, draw k: seed FIRST_SEED + SEEDS_PER_CATEGORY * c + k
SEEDS_PER_CATEGORY = 100
STEPS = 25
REFERENCE_PER_CATEGORY = 20  # real images per category in FD's reference set
MODES = {"unconditional": ("", 1.0), "weakly prompted": ("emoji", 3.0)}   # name -> (prompt, CFG)


def guided_request(prompt: str, guidance_scale: float, seed: int, category: str, scale: float, sampler: str):
    """One classifier-guided text-to-image request at the embedded model's defaults."""
    from pipelines.tasks.txt2img import Txt2ImgRequest

    return Txt2ImgRequest(prompt=prompt, guidance_scale=guidance_scale, seed=seed, steps=STEPS, sampler=sampler,
                          width=64, height=64, classifier_class=category, classifier_scale=scale)


def judge_categories(judge, judge_classes: list[str], records: Sequence[data.EmojiRecord], categories: list[str],
                     images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The category of the judge's top-1 base emoji for each image, and the judge's top-1 probability."""
    category_of_class = {record.class_index: categories.index(record.category) for record in records}
    if len(category_of_class) != len(judge_classes):
        raise ValueError(f"The judge names {len(judge_classes)} base emoji but the records have "
                         f"{len(category_of_class)}: they are not from the same data.")
    probabilities = torch.from_numpy(evaluate.classify(judge, images)).softmax(dim=1).numpy()
    top1 = probabilities.argmax(1)
    return np.array([category_of_class[int(c)] for c in top1]), probabilities.max(1)


def balanced_real_draws(records: Sequence[data.EmojiRecord], index: np.ndarray, categories: list[str],
                        sizes: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    """Disjoint seeded draws from `index`, `sizes[i]` images of every category each."""
    rng = np.random.default_rng(seed)
    draws = [[] for _ in sizes]
    for category in categories:
        pool = rng.permutation([i for i in index if records[i].category == category])
        if len(pool) < sum(sizes):
            raise ValueError(f"FD needs {sum(sizes)} real held-out images of {category!r} but there are {len(pool)}; "
                             "use fewer --seeds.")
        start = 0
        for draw, size in zip(draws, sizes):
            draw.extend(pool[start:start + size].tolist())
            start += size
    return [np.sort(np.array(draw)) for draw in draws]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 2.5, 5.0, 10.0, 20.0, 40.0],
                        help="classifier scales s (a first look with one seed: the unconditional samples follow the "
                             "class from about s = 4, the weakly prompted ones need more)")
    parser.add_argument("--seeds", type=int, default=6, help="seeds per category and scale")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    if not 1 <= args.seeds <= SEEDS_PER_CATEGORY:
        parser.error(f"--seeds must be from 1 to {SEEDS_PER_CATEGORY} but is {args.seeds}.")
    torch.set_num_threads(args.threads)
    # The judge and the generator on one device worker's thread (one OpenMP thread team, as recipe.evaluate).
    from pipelines.jobs.worker import DeviceWorker
    worker = DeviceWorker()
    return worker.call(_evaluate, args, argv, worker)


def _evaluate(args: argparse.Namespace, argv: Sequence[str] | None, worker) -> dict:
    # 1. The guidance classifier's categories, the judge, the real reference images
    guidance = load_guidance_classifier(EMBEDDED_CLASSIFIER)
    categories = guidance.class_names
    records, _ = data.load_records(data.fetch())
    if classifier_recipe.categories(records) != categories:
        raise ValueError(f"The guidance classifier's classes {categories} are not the data's categories "
                         f"{classifier_recipe.categories(records)}.")
    judge, judge_classes = evaluate.load_judge()
    _, held_out = classifier_recipe.held_out_split(records, classifier_recipe.Settings.held_out_fraction,
                                                   classifier_recipe.Settings.seed)
    reference_index, second_index = balanced_real_draws(records, held_out, categories,
                                                        (REFERENCE_PER_CATEGORY, args.seeds))
    real = data.load_images([records[i] for i in np.concatenate([reference_index, second_index])])
    reference_features = evaluate.features(judge, real[:len(reference_index)])
    real_vs_real = evaluate.frechet_distance(evaluate.features(judge, real[len(reference_index):]),
                                             reference_features)

    # 2. Samples through the studio's own generation path
    generator, loaded = evaluate.studio_generator("embedded", "cpu", worker)
    sampler = evaluate.studio_defaults(loaded)["sampler"]
    targets = np.repeat(np.arange(len(categories)), args.seeds)
    seeds = [FIRST_SEED + SEEDS_PER_CATEGORY * c + k for c in range(len(categories)) for k in range(args.seeds)]
    rows: dict = {mode: {} for mode in args.modes}
    started = time.perf_counter()
    for mode in args.modes:
        prompt, cfg = MODES[mode]
        for scale in args.scales:
            pictures, seconds = [], []
            for target, seed in zip(targets, seeds):
                begin = time.perf_counter()
                done = generator.generate(guided_request(prompt, cfg, seed, categories[target], scale, sampler))
                seconds.append(time.perf_counter() - begin)
                pictures.append(done.images[0].image)
            images = evaluate.as_array(pictures, judge.image_size)
            judged, confidence = judge_categories(judge, judge_classes, records, categories, images)
            hits = judged == targets
            rows[mode][str(scale)] = {
                "class_accuracy": round(float(hits.mean()), 4),
                "per_category_accuracy": {name: round(float(hits[targets == c].mean()), 4)
                                          for c, name in enumerate(categories)},
                "judge_confidence": round(float(confidence.mean()), 4),
                "fd_vs_real": round(evaluate.frechet_distance(evaluate.features(judge, images), reference_features), 2),
                "seconds_per_image": round(float(np.median(seconds)), 3)}
            print(f"{mode}, s={scale:g}: {rows[mode][str(scale)]} ({time.perf_counter() - started:.0f} s)",
                  flush=True)

    # 3. Report
    report = {
        "what": "classifier guidance (Dhariwal & Nichol 2021, Algorithm 1) on the embedded model: class accuracy "
                "by the independent judge, FD in its feature layer, time",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "recipe.classifier_guidance_eval",
                               *(sys.argv[1:] if argv is None else argv)]),
        "settings": {"scales": args.scales, "seeds_per_category": args.seeds, "categories": categories,
                     "seeds": f"{FIRST_SEED} + {SEEDS_PER_CATEGORY} * category + k", "steps": STEPS,
                     "sampler": sampler, "size": 64, "modes": {m: {"prompt": MODES[m][0], "cfg": MODES[m][1]}
                                                               for m in args.modes},
                     "threads": args.threads, "device": "cpu"},
        "chance_accuracy": round(1 / len(categories), 4),
        "guidance_classifier": {"path": "assets/emoji-ldm-classifier",
                                "held_out_accuracy": guidance.provenance.get("held_out_accuracy")},
        "judge": {"path": "assets/eval/emoji-classifier.safetensors", "names": f"{len(judge_classes)} base emoji",
                  "category": "the category of its top-1 base emoji (recipe/data.py records)"},
        "fd_reference": {"images": len(reference_index), "per_category": REFERENCE_PER_CATEGORY,
                         "pool": "real images of the emoji the guidance classifier held out",
                         "real_vs_real": round(real_vs_real, 2), "real_vs_real_images": len(second_index)},
        "rows": rows,
    }
    evaluate._write_atomically(args.report, lambda partial: partial.write_text(json.dumps(report, indent=2) + "\n"))
    print(markdown_table(report))
    print(f"Wrote {args.report}.")
    return report


def markdown_table(report: dict) -> str:
    rows, modes = report["rows"], list(report["rows"])
    scales = list(next(iter(rows.values())))
    heads = [f"accuracy, {m}" for m in modes] + [f"FD, {m}" for m in modes] + \
        [f"judge confidence, {m}" for m in modes] + [f"s/image, {m}" for m in modes]
    lines = ["| scale s | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for scale in scales:
        cells = [f"{rows[m][scale]['class_accuracy']:.1%}" for m in modes] + \
            [f"{rows[m][scale]['fd_vs_real']:.1f}" for m in modes] + \
            [f"{rows[m][scale]['judge_confidence']:.2f}" for m in modes] + \
            [f"{rows[m][scale]['seconds_per_image']:.2f}" for m in modes]
        lines.append(f"| {float(scale):g} | " + " | ".join(cells) + " |")
    reference = report["fd_reference"]
    lines.append(f"\nChance accuracy {report['chance_accuracy']:.1%}; FD between two real draws "
                 f"({reference['real_vs_real_images']} vs {reference['images']} images): {reference['real_vs_real']:.1f}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
