"""Start the Diffusion Studio: parse flags, load the model, build the app, serve it."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Diffusion Studio: generate images, watch diffusion step by "
                                                 "step, train small LoRAs. Serves a web UI.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it "
                             "to your network, use --auth then)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--model", default="embedded",
                        help="model to load at start: 'embedded' (the default, ships in assets/), a diffusers "
                             "folder, a single .safetensors file, or a Hugging Face hub id (from the local cache "
                             "when offline); 'none' starts without a model")
    parser.add_argument("--model-config", default=None,
                        help="for a single-file checkpoint: a diffusers folder (or hub id) with the same "
                             "architecture's config, needed offline (a part missing from the file, such as the "
                             "text encoder, is then taken from this folder)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                        help="where to run: auto picks cuda > mps > cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                        help="weights' precision: auto is fp16 on GPUs (VAE upcast on NaN) and fp32 on the CPU")
    parser.add_argument("--memory", default="auto", choices=["auto", "high", "balanced", "low", "sequential"],
                        help="GPU memory mode: high keeps all on the GPU; balanced offloads idle models to the "
                             "CPU; low adds attention slicing and VAE tiling; sequential offloads layer by "
                             "layer (slowest, least VRAM); auto chooses by free VRAM and image size")
    parser.add_argument("--outputs", default=str(ROOT / "outputs"),
                        help="folder for generated images (default ./outputs), saved as <date>/<n>-<seed>.png")
    parser.add_argument("--min-free-disk-mb", type=float, default=None, metavar="MB",
                        help="refuse to save images when the outputs folder's disk would keep less than this free "
                             "(default 200)")
    parser.add_argument("--auth", default=None, metavar="USER:PASS",
                        help="require this user name and password in the browser and the API (the REST API "
                             "takes them as HTTP basic auth)")
    parser.add_argument("--api", action="store_true",
                        help="also serve AUTOMATIC1111's REST API (/sdapi/v1/txt2img, img2img, options, progress, "
                             "...) on the same server, for programs that speak it")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (off by default; needs internet)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickled checkpoints (.ckpt/.pt/.bin), which can run code when loaded; off "
                             "by default: only .safetensors are loaded")
    return parser.parse_args(argv)


def build(args: argparse.Namespace):
    """The Gradio app and its context, from parsed flags (no serving)."""
    from pipelines.core.paths import ModelLoadError
    from pipelines.generation.generator import Generator
    from pipelines.io.metadata import MIN_FREE_DISK_MB
    from pipelines.jobs.worker import DeviceWorker
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from studio.app import build_app
    from studio.context import StudioContext

    memory = MemoryManager(device=args.device, dtype=args.dtype, memory=args.memory)
    # The one thread all model work runs on (pipelines/jobs/worker.py)
    models = ModelManager(memory, worker=DeviceWorker(), allow_pickle=args.allow_pickle,
                          models_dir=ROOT / "models")
    outputs = Path(args.outputs).resolve()
    margin = MIN_FREE_DISK_MB if args.min_free_disk_mb is None else args.min_free_disk_mb
    if not margin >= 0:     # NaN too: a margin that could never be met or never checked is a typo
        raise SystemExit(f"--min-free-disk-mb must be 0 or more MB but is {args.min_free_disk_mb}.")
    context = StudioContext(models=models, generator=Generator(models, outputs, min_free_disk_mb=margin),
                            outputs_dir=outputs)
    if args.model != "none":
        try:
            models.load(args.model, config=args.model_config)
        except ModelLoadError as error:
            context.startup_error = str(error)
            logging.getLogger("studio").warning("no model loaded: %s", error)
    else:
        context.startup_error = "Started with --model none."
    return build_app(context), context


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """(user, password) from --auth USER:PASS."""
    if not text:
        return None
    user, _, password = text.partition(":")
    if not user or not password:
        raise SystemExit("--auth takes USER:PASS, both non-empty.")
    return user, password


def start(app, context, args: argparse.Namespace):
    """Serve the built app without blocking; with --api, the REST API joins it on the same server (Gradio's
    FastAPI app, which exists once launched). Returns that FastAPI app."""
    from studio.app import serve

    auth = parse_auth(args.auth)
    server_app, *_ = serve(app, server_name=args.host, server_port=args.port, auth=auth, share=args.share,
                           allowed_paths=[str(context.outputs_dir)], show_error=True, quiet=True,
                           prevent_thread_lock=True)
    if args.api:
        from studio.rest_api import mount_rest_api
        mount_rest_api(server_app, context, auth=auth)
    return server_app


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parse_auth(args.auth)   # a malformed --auth stops us before the model loads

    app, context = build(args)
    Path(context.outputs_dir).mkdir(parents=True, exist_ok=True)
    url = f"http://{args.host}:{args.port}/"
    print(f"Diffusion Studio: {url}  (--share for a public link, --help for all flags)", flush=True)
    start(app, context, args)
    if args.api:
        print(f"AUTOMATIC1111-compatible REST API: {url}sdapi/v1/ (txt2img, img2img, options, progress, ...)",
              flush=True)
    app.block_thread()


if __name__ == "__main__":
    main()
