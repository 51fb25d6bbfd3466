"""Recording a full reverse-process trace against a plain generation, same model and settings.

The trace keeps x_t, x̂_0 and the three noise predictions of every step on the CPU and decodes
frames lazily, so recording should cost little more than generating (goal: ratio <= 1.5).
Also times decoding every x_t and x̂_0 frame afterwards, which the UI does only on demand.

    python -m bench.explorer_trace            # the embedded model (tiny model if absent)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.timing import interleaved_medians
from pipelines.explorer.reverse import record_trace
from pipelines.generation.generator import Generator
from pipelines.models.manager import ModelManager
from pipelines.models.memory import MemoryManager
from pipelines.models.sources import EMBEDDED_MODEL, ModelSource
from pipelines.tasks.txt2img import Txt2ImgRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    manager = ModelManager(MemoryManager(device="cpu"))
    if args.model is None and not (EMBEDDED_MODEL / "model_index.json").exists():
        from recipe.tiny import build_tiny_pipeline
        folder = Path(tempfile.mkdtemp())
        manager.adopt(build_tiny_pipeline(folder), ModelSource("folder", str(folder), "tiny"))
    else:
        manager.load(args.model or "embedded")
    side = manager.current.native_side
    request = Txt2ImgRequest(prompt="grinning face", steps=args.steps, guidance_scale=7.5, width=side,
                             height=side, seed=1234)
    generator = Generator(manager, outputs_dir=None)

    def decode_all():
        trace = record_trace(manager, request)
        for index in range(len(trace.steps)):
            trace.frame(index, "x_t")
            trace.frame(index, "x0_pred")

    # on the device worker's thread, as in the studio (generate goes there itself); see pipelines/jobs/worker.py
    candidates = {"generate": lambda: generator.generate(request),
                  "record trace": lambda: manager.worker.call(record_trace, manager, request),
                  "record + decode all frames": lambda: manager.worker.call(decode_all)}
    median = interleaved_medians(candidates, args.runs)
    print(f"model {manager.current.name} · {side}x{side} · {args.steps} steps · CFG 7.5 · {args.runs} interleaved runs")
    for name, value in median.items():
        print(f"  {name:28s} median {value * 1000:8.1f} ms")
    print(f"record trace / generate              = {median['record trace'] / median['generate']:.3f}  (goal <= 1.5)")
    print(f"record + decode every frame / generate = {median['record + decode all frames'] / median['generate']:.3f}")


if __name__ == "__main__":
    main()
