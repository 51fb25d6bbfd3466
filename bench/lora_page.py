"""LoRA training from the page against the same training through the API, side by side in one studio.

One studio on the embedded model (as `python launch.py` serves it); the same 12 example images with their
captions (assets/lora-example/) and the same settings; trained through `/train_lora` by gradio_client, and from
the LoRA tab in headless Chromium (drop the files, name it, press Train, wait for "Saved"), alternately, `--runs`
times each. Prints each run's seconds, the medians, their ratio (goal: page / API <= 1.1) and the CPU seconds
Chromium used while the page trained. Each run's own LoRA name, so none resumes another's checkpoint.

    python -m bench.lora_page                      # the defaults: 300 steps, 3 runs each (about 5 minutes here)
    python -m bench.lora_page --steps 100 --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psutil

import launch
from tests.test_server import CHROMIUM, CHROMIUM_FLAGS, free_port

DATASET = Path(__file__).resolve().parent.parent / "assets" / "lora-example"


def _chromium_cpu_seconds() -> float:
    """CPU seconds used so far by this process's Chromium descendants (browser, renderer, GPU processes)."""
    total = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            if "chrom" in process.name().lower():
                times = process.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def train_through_api(url: str, files: list[Path], name: str, steps: int) -> float:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    started = time.perf_counter()
    status, *_ = client.predict(images=[handle_file(str(path)) for path in files], name=name, steps=steps,
                                api_name="/train_lora")
    seconds = time.perf_counter() - started
    assert "Saved" in status, status
    return seconds


def train_from_the_page(browser, url: str, files: list[Path], name: str, steps: int) -> tuple[float, float]:
    """Seconds from the click on Train to "Saved" on the page, and the CPU seconds Chromium used meanwhile."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="load")
    page.get_by_role("tab", name="Training").click()
    page.locator("#lora-files input[type=file]").set_input_files([str(path) for path in files])
    page.locator("#lora-thumbnails img").nth(len([p for p in files if p.suffix == ".png"]) - 1).wait_for()
    page.locator("#lora-name textarea").fill(name)
    field = page.locator("#lora-steps input[type=number]")
    field.fill(str(steps))
    field.press("Enter")
    started, chromium = time.perf_counter(), _chromium_cpu_seconds()
    page.locator("#lora-train").click()
    page.locator("#lora-status").get_by_text("Saved").wait_for(timeout=3_600_000)
    seconds, chromium = time.perf_counter() - started, _chromium_cpu_seconds() - chromium
    page.close()
    return seconds, chromium


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: the tab's default, 300)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each, alternating (default 3)")
    options = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from studio.app import serve

    work = Path(tempfile.mkdtemp(prefix="bench-lora-page-"))
    args = launch.parse_args(["--outputs", str(work / "outputs"), "--port", str(free_port())])
    app, context = launch.build(args)
    context.models.models_dir = work / "models"      # the benchmark's LoRAs and checkpoints stay out of models/
    serve(app, server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
          allowed_paths=[str(context.outputs_dir)])
    url = f"http://{args.host}:{args.port}/"
    files = sorted(path for path in DATASET.iterdir() if path.suffix in (".png", ".txt"))
    times: dict[str, list[float]] = {"api": [], "page": []}
    chromium_seconds = 0.0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        for run in range(options.runs):
            times["api"].append(train_through_api(url, files, f"bench-api-{run}", options.steps))
            seconds, chromium = train_from_the_page(browser, url, files, f"bench-page-{run}", options.steps)
            times["page"].append(seconds)
            chromium_seconds += chromium
            print(f"run {run + 1}: API {times['api'][-1]:.1f} s, page {times['page'][-1]:.1f} s", flush=True)
        browser.close()
    app.close()
    api, page = statistics.median(times["api"]), statistics.median(times["page"])
    print(f"{options.steps} steps, {len([p for p in files if p.suffix == '.png'])} images, the embedded model, "
          f"{psutil.cpu_count()} CPU cores")
    print(f"median: API {api:.1f} s, page {page:.1f} s; page / API = {page / api:.2f} (goal <= 1.1)")
    print(f"Chromium used {chromium_seconds / options.runs:.1f} CPU-seconds per page run, while it trained")


if __name__ == "__main__":
    main()
