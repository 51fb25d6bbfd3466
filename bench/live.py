"""Live mode's latency in a real browser: a change on the page to its image shown, on the embedded model.

One studio as `python launch.py` serves it (the embedded model, its shipped LCM-LoRA), headless Chromium
on the Text-to-Image tab with Live on (Fast, 4 steps, comes on with it). Each change is one key typed
into the prompt (alternately a letter and its deletion, so the prompt stays a real one), after the page
has shown the last change's image. The page itself times it: from the key's `keydown` to the moment the
gallery holds a new image that has finished loading (a MutationObserver and the image's `load` event,
both on the page's clock). Prints every change's milliseconds, the median and the 95th percentile
(aim: median <= 250 ms), then a burst: 16 keys typed 40 ms apart, and the time from the last key to the
image of the whole text (the ones it superseded were cancelled, not queued).

    python -m bench.live                 # 30 changes, at Live's 2 steps
    python -m bench.live --changes 60 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import launch
from tests.test_server import CHROMIUM, CHROMIUM_FLAGS, free_port

WATCH = """() => {
  window.__shown = [];
  const gallery = document.querySelector('#txt2img-gallery');
  const seen = new Set();
  const check = () => {
    for (const img of gallery.querySelectorAll('img')) {
      if (seen.has(img.src)) continue;
      seen.add(img.src);
      const done = () => window.__shown.push({src: img.src, at: performance.now()});
      if (img.complete && img.naturalWidth > 0) done(); else img.addEventListener('load', done, {once: true});
    }
  };
  new MutationObserver(check).observe(gallery, {subtree: true, childList: true, attributes: true,
                                               attributeFilter: ['src']});
  const prompt = document.querySelector('#txt2img-prompt textarea');
  prompt.addEventListener('keydown', () => { window.__keyAt = performance.now(); });
}"""


def _shown_after(page, expected_prompt: str, timeout_ms: int = 30_000) -> float:
    """Wait until the infotext is the one of `expected_prompt` and an image loaded after the last key; ms."""
    try:
        page.wait_for_function(
            """(prompt) => {
                 const text = document.querySelector('#txt2img-infotext textarea').value;
                 return text.startsWith(prompt + ' <lora:') &&
                        window.__shown.some(s => s.at > window.__keyAt);
               }""", arg=expected_prompt, timeout=timeout_ms)
    except Exception:
        state = page.evaluate("() => [document.querySelector('#txt2img-infotext textarea').value, window.__keyAt, "
                              "JSON.stringify(window.__shown.slice(-3)), "
                              "document.querySelector('#txt2img-status').innerText]")
        raise RuntimeError(f"No image of {expected_prompt!r} was shown; the page has {state}") from None
    return page.evaluate("() => Math.min(...window.__shown.filter(s => s.at > window.__keyAt).map(s => s.at))"
                         " - window.__keyAt")


def measure(url: str, changes: int, steps: int) -> tuple[list[float], float]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, wait_until="load")
        prompt = page.locator("#txt2img-prompt textarea")
        prompt.wait_for()
        page.evaluate(WATCH)
        prompt.fill("red apple")
        page.evaluate("() => { window.__keyAt = performance.now(); }")
        page.locator(".studio-live input").first.check()      # Live on: its first image (a warm-up)
        _shown_after(page, "red apple")
        steps_box = page.locator("#txt2img-steps input[type=number]")
        page.evaluate("() => { window.__keyAt = performance.now(); }")
        steps_box.fill(str(steps))
        steps_box.press("Enter")
        _shown_after(page, "red apple")
        prompt.press("End")
        prompt.press_sequentially("s")            # warm-up change
        _shown_after(page, "red apples")
        text, latencies = "red apples", []
        for index in range(changes):
            if index % 2 == 0:
                prompt.press("Backspace")
                text = text[:-1]
            else:
                prompt.press_sequentially("s")
                text += "s"
            latencies.append(_shown_after(page, text))
        prompt.press_sequentially(" and green heart", delay=40)
        burst = _shown_after(page, text + " and green heart")
        browser.close()
    return latencies, burst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--steps", type=int, default=2, help="Fast's steps (Live sets 2)")
    options = parser.parse_args()
    outputs = Path(tempfile.mkdtemp())
    args = launch.parse_args(["--device", "cpu", "--outputs", str(outputs), "--port", str(free_port())])
    from studio.app import serve

    app, _ = launch.build(args)
    serve(app, server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True)
    try:
        latencies, burst = measure(f"http://{args.host}:{args.port}/", options.changes, options.steps)
    finally:
        app.close()
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    print(f"Live, embedded model, Fast {options.steps} steps, headless Chromium · {len(latencies)} changes")
    print("  ms per change: " + " ".join(f"{value:.0f}" for value in latencies))
    print(f"  change -> image shown: median {statistics.median(latencies):.0f} ms, p95 {p95:.0f} ms "
          "(aim: median <= 250)")
    print(f"  a burst of 16 keys 40 ms apart: last key -> final image {burst:.0f} ms")


if __name__ == "__main__":
    main()
