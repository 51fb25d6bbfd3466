"""Training from the command line: the tab's loop (pipelines/training/loop.py) with a settings file the tab
exports, on one process or data-parallel on several under Hugging Face accelerate.

    python -m pipelines.training --settings my-style.json --data models/datasets/my-style
    accelerate launch --num_processes 4 -m pipelines.training --settings my-style.json --data DATASET
    torchrun --nproc_per_node 2 -m pipelines.training --settings my-style.json --data DATASET   # CPU: also set
                                                                                               # ACCELERATE_USE_CPU=1

Every process loads the model and the data; each trains on its share of every batch (the batch size is the
whole batch, split over the processes), DDP averages their gradients, and the first process alone writes
checkpoints and the file. The loss curve is the one-process curve: every process draws the same batches.
(`accelerate launch --cpu --num_processes 2` starts one process only; on CPUs use torchrun as above.)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

from pipelines.core.paths import DEFAULT_MODELS_DIR
from pipelines.training.request import LossPoint, TrainingWarning


class ConsoleJob:
    """What the loop reports to, outside the studio: progress and warnings printed by the first process, the
    loss curve kept; nothing else runs between its steps."""

    def __init__(self, *, main: bool, print_every: int):
        self.main, self.print_every = main, print_every
        self.stop = threading.Event()
        self.losses: list[LossPoint] = []

    def emit(self, event, **_) -> None:
        if isinstance(event, LossPoint):
            self.losses.append(event)
        elif isinstance(event, TrainingWarning) and self.main:
            print(f"warning: {event.message}", file=sys.stderr)

    def report(self, done: int, total: int, message: str = "") -> None:
        if self.main and (done == total or done % self.print_every == 0):
            print(f"step {done}/{total}: {message}", flush=True)

    def checkpoint(self) -> bool:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True, type=Path, help="the settings file (the tab's Export)")
    parser.add_argument("--data", required=True, type=Path,
                        help="a folder of images (or .zip files), each caption in a .txt of the same name")
    parser.add_argument("--model", default="embedded", help="a model folder, .safetensors file or hub id")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                        help="where the file goes (lora/ or embeddings/ under it)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="checkpoints and class images (default: MODELS_DIR/lora/.runs)")
    parser.add_argument("--losses", type=Path, default=None, help="write the loss curve here as JSON")
    parser.add_argument("--print-every", type=int, default=10)
    args = parser.parse_args(argv)

    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from pipelines.training.data import read_dataset
    from pipelines.training.loop import make_accelerator, train
    from pipelines.training.presets import read_settings
    from pipelines.training.request import TrainingRequest

    settings = read_settings(args.settings.read_text(), source=str(args.settings))
    files = sorted(path for path in args.data.iterdir() if path.is_file()) if args.data.is_dir() else [args.data]
    dataset = read_dataset(files)
    request = TrainingRequest(**settings, images=[item.image for item in dataset],
                              captions=[item.caption for item in dataset])
    accelerator = make_accelerator()
    models = ModelManager(MemoryManager(device=accelerator.device.type), models_dir=args.models_dir)
    models.load(args.model)
    job = ConsoleJob(main=accelerator.is_main_process, print_every=args.print_every)
    result = train(models, request, job, cache_dir=args.cache_dir or models.lora_dir / ".runs",
                   accelerator=accelerator)
    if accelerator.is_main_process:
        print(f"{result.path} · {result.steps} steps on {accelerator.num_processes} process(es) · "
              f"final loss {result.final_loss:.4f}")
        if args.losses:
            args.losses.write_text(json.dumps({"processes": accelerator.num_processes,
                                               "losses": [point.loss for point in job.losses]}) + "\n")
    accelerator.wait_for_everyone()      # the first process samples after the others are done
    accelerator.end_training()
    models.worker.close(wait=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
