"""A Flux.1 single file, read through the studio the way a user's `flux1-dev.safetensors` is: a transformer at the
released width (3,072: diffusers' reader of Black Forest Labs' layout splits at that width, so a tiny one cannot be
read) with one double and one single block, in BFL's layout (recipe/single_file_flux.py), loaded with
`--model-config` a diffusers Flux folder, from which the text encoders and VAE come. It must load into the folder's
very weights and draw the folder's image.

    python -m bench.flux_single_file            # about 2 GB of weights, 8 GB of RAM at the peak; a minute on 2 cores

Not a test: a full-width transformer is too big for the suite's time. It prints what it compared and the load times.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build(folder: Path) -> None:
    """The tiny Flux pipeline (recipe/tiny.py) with a full-width transformer of one double and one single block."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from recipe.tiny import build_tiny_flux_pipeline

    tiny = build_tiny_flux_pipeline(folder.parent / "build")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[16, 56, 56], guidance_embeds=True)
    FluxPipeline(**{**tiny.components, "transformer": transformer}).save_pretrained(folder)


def main(argv=None) -> dict:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from pipelines.tasks.txt2img import Txt2ImgRequest
    from recipe.single_file import main as export

    root = Path(tempfile.mkdtemp(prefix="flux-single-file-"))
    try:
        folder, path, config = root / "flux-full-width", root / "flux-full-width.safetensors", root / "config"
        build(folder)
        export([str(folder), str(path)])
        # the config folder lends everything but the transformer, which can only come from the file
        shutil.copytree(folder, config, ignore=lambda directory, names: [
            name for name in names if Path(directory).name == "transformer" and name.endswith(".safetensors")])
        managers, seconds = {}, {}
        for kind, spec, extra in (("folder", folder, {}), ("file", path, {"config": str(config)})):
            managers[kind] = ModelManager(MemoryManager(device="cpu"))
            start = time.perf_counter()
            managers[kind].load(str(spec), **extra)
            seconds[kind] = time.perf_counter() - start
        pipelines = {kind: manager.current.pipeline for kind, manager in managers.items()}
        different = {}
        for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            theirs = getattr(pipelines["folder"], component).state_dict()
            ours = getattr(pipelines["file"], component).state_dict()
            different[component] = [key for key in theirs if key not in ours or not torch.equal(ours[key], theirs[key])]
        request = Txt2ImgRequest(prompt="red apple", seed=3, steps=2, width=64, height=64, sampler="Euler")
        images = {kind: np.asarray(Generator(manager, None).generate(request).images[0].image)
                  for kind, manager in managers.items()}
        report = {"file_mib": round(path.stat().st_size / 2**20),
                  "pipeline": type(pipelines["file"]).__name__,
                  "weights_equal": {component: not keys for component, keys in different.items()},
                  "image_equal": bool(np.array_equal(images["folder"], images["file"])),
                  "load_s": {kind: round(value, 1) for kind, value in seconds.items()}}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"Flux.1 single file ({report['file_mib']} MiB, BFL's layout) read as {report['pipeline']} with "
          f"--model-config:")
    for component, equal in report["weights_equal"].items():
        print(f"  {component:<15} {'the same weights' if equal else 'DIFFERENT weights'}")
    print(f"  image           {'the same pixels' if report['image_equal'] else 'DIFFERENT pixels'}")
    print(f"  load            folder {report['load_s']['folder']} s, file {report['load_s']['file']} s")
    return report


if __name__ == "__main__":
    main()
