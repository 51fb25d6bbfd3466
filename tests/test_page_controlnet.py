"""The ControlNet tab in a real headless Chromium: the input its unit shows is the one used, the Draw tab's label
reads whole, and the Control X-ray is readable (issue 25, items 1, 8 and 10)."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.test_server import (_draw_a_circle, _page_on_tab, _tiny_controlnet, browser,  # noqa: F401 (module fixtures)
                               server)

RANGE = r"[-+\d.e]+ to [-+\d.e]+"     # a legend's "0.12 to 3.4"
XRAY = "#controlnet-xray img"


def _seeing_controlnet(context, tiny_model_dir, tmp_path, monkeypatch) -> str:
    """A seeded tiny ControlNet whose output depends on its control image, as models/controlnet/tiny-cn-sees.
    recipe/tiny.py's leaves the control image's embedding zero-initialised, as diffusers does: any image steers it
    alike (and a weak one barely), so it cannot tell a drawing from an upload."""
    import torch
    from diffusers import UNet2DConditionModel

    from recipe.tiny import build_tiny_controlnet

    monkeypatch.setattr(context.models, "models_dir", tmp_path / "models")
    controlnet = build_tiny_controlnet(UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet"), seed=3)
    with torch.no_grad():
        for layer in controlnet.controlnet_cond_embedding.modules():
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.normal_(0, 1.0)
    controlnet.save_pretrained(tmp_path / "models" / "controlnet" / "tiny-cn-sees")
    return "tiny-cn-sees"


def _pick_model(page, name: str) -> None:
    model = page.locator("#controlnet-0-model input")
    model.fill(name)
    model.press("Enter")


def _set_steps(page, steps: int) -> None:
    box = page.locator("#controlnet-steps input[type=number]")
    box.fill(str(steps))
    box.press("Enter")


def _shown(page, selector: str, *, replacing: str | None = None) -> tuple[np.ndarray, str]:
    """The picture the <img> at `selector` shows (the file it was served), in grey, and its address; with
    `replacing`, once it shows another file than that one (the legend beside it can be drawn first)."""
    page.wait_for_function("""([selector, old]) => {
        const image = document.querySelector(selector);
        return image !== null && image.complete && image.naturalWidth > 0 && image.src !== old;
    }""", arg=[selector, replacing], timeout=60_000)
    address = page.evaluate("selector => document.querySelector(selector).src", selector)
    served = page.request.get(address).body()
    return np.asarray(Image.open(io.BytesIO(served)).convert("L"), dtype=np.float32), address


def _generate(page, context, seed: int) -> np.ndarray:
    page.locator("#controlnet-seed input").fill(str(seed))
    page.locator("#controlnet-generate").click()
    page.locator("#controlnet-status").get_by_text(f"Seed {seed}").wait_for(timeout=120_000)
    return np.asarray(Image.open(max(context.outputs_dir.rglob(f"*-{seed}.png"))).convert("RGB"), np.int16)


@pytest.mark.slow
def test_browser_uses_the_drawing_when_the_draw_tab_shows_though_an_image_is_uploaded(
        server, browser, tiny_model_dir, tmp_path, monkeypatch):
    """Item 1: with an image uploaded, a unit switched to Draw previewed and generated from the upload."""
    from pipelines.tasks.controlnet import ControlNetRequest

    url, context = server
    controlnet = _seeing_controlnet(context, tiny_model_dir, tmp_path, monkeypatch)
    upload = Image.new("RGB", (64, 64), "white")
    upload.paste((0, 0, 0), (32, 0, 64, 64))                  # black on the right: inverted, white on the left
    upload.save(tmp_path / "half.png")
    page = _page_on_tab(browser, url, "ControlNet")
    page.locator("#controlnet-0-upload input[type=file]").set_input_files(str(tmp_path / "half.png"))
    page.locator("#controlnet-0-upload img").first.wait_for(state="visible", timeout=30_000)
    _pick_model(page, controlnet)
    page.locator("#controlnet-prompt textarea").fill("red apple")
    _set_steps(page, 4)
    page.get_by_role("tab", name="Draw").first.click()
    _draw_a_circle(page)

    page.locator("#controlnet-0-preview-button").click()
    preview, _ = _shown(page, "#controlnet-0-preview img")
    right = preview[:, preview.shape[1] // 2:]
    # the drawing inverted is a white ring on black; the upload inverted would be white on the whole right half
    assert right.mean() < 100, f"the preview shows the uploaded image (right half mean {right.mean():.0f})"

    steered = _generate(page, context, 5151)
    infotext = page.locator("#controlnet-infotext textarea").input_value()
    assert f'ControlNet 0: "Module: invert, Model: {controlnet}' in infotext
    from_upload = context.generator.generate(ControlNetRequest(
        prompt="red apple", control_image=upload, preprocessor="invert", model=controlnet, seed=5151,
        **{name: int(value) for name, value in re.findall(r"(steps|width|height): (\d+)", infotext.lower())}))
    from_upload = np.asarray(from_upload.images[0].image.convert("RGB"), np.int16)
    assert np.abs(steered - from_upload).mean() > 1, "the generation used the uploaded image, not the drawing"

    page.get_by_role("tab", name="Upload").first.click()      # back on Upload: the upload counts again
    assert np.abs(_generate(page, context, 5151) - from_upload).max() <= 1
    page.close()


@pytest.mark.slow
def test_browser_an_image_sent_to_controlnet_while_draw_shows_is_the_one_used(server, browser, tiny_model_dir,
                                                                              tmp_path, monkeypatch):
    """An image sent in by PNG Info's (or Text-to-Image's) Send to ControlNet lands on Upload: with Draw in front,
    the generation read the empty drawing and failed ("shows its Draw tab, with nothing drawn on it")."""
    from pipelines.tasks.txt2img import Txt2ImgRequest

    url, context = server
    _tiny_controlnet(context, tiny_model_dir, tmp_path, monkeypatch)
    context.generator.generate(Txt2ImgRequest(prompt="red apple", seed=77, steps=2))
    sent = max(context.outputs_dir.rglob("*-77.png"))
    page = _page_on_tab(browser, url, "ControlNet")
    page.get_by_role("tab", name="Draw").first.click()
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo-file input[type=file]").set_input_files(str(sent))
    expect(page.locator("#pnginfo-infotext textarea")).to_have_value(re.compile("Seed: 77"), timeout=30_000)
    page.locator("#pnginfo-to-controlnet").click()
    page.locator("#controlnet-0-upload img").first.wait_for(state="visible", timeout=30_000)
    expect(page.get_by_role("tab", name="Upload").first).to_have_attribute("aria-selected", "true")
    page.locator("#controlnet-0-enabled input").check()     # the PNG's settings had no unit: restored disabled
    _pick_model(page, "tiny-cn")
    _set_steps(page, 2)
    page.locator("#controlnet-seed input").fill("78")
    page.locator("#controlnet-generate").click()
    page.locator("#controlnet-status").get_by_text("Seed 78").wait_for(timeout=120_000)
    assert 'Model: tiny-cn' in page.locator("#controlnet-infotext textarea").input_value()
    page.close()


@pytest.mark.slow
def test_browser_shows_the_draw_tabs_label_whole(server, browser):
    """Item 10: the sketch pad's label ran under its toolbar, cut off at "(the invert prepro…"."""
    url, _ = server
    page = _page_on_tab(browser, url, "ControlNet")
    page.get_by_role("tab", name="Draw").first.click()
    sketch = page.locator("#controlnet-0-sketch")
    sketch.wait_for(state="visible")
    hidden = sketch.evaluate("""root => {
        const label = root.querySelector('[data-testid=block-label]').getBoundingClientRect();
        const overlaps = r => r.width > 0 && r.left < label.right && r.right > label.left
                              && r.top < label.bottom && r.bottom > label.top;
        return [...root.querySelectorAll('button')].filter(b => b.offsetParent !== null
                                                          && overlaps(b.getBoundingClientRect()))
                                                   .map(b => b.getAttribute('aria-label'));
    }""")
    assert hidden == [], f"the label runs under the sketch pad's buttons {hidden}"
    page.close()


@pytest.mark.slow
def test_browser_xray_shows_each_step_on_a_colour_scale_with_a_legend(
        server, browser, tiny_model_dir, tmp_path, monkeypatch):
    """Item 8: the X-ray was a faint tint on one scale for all steps, with no legend. Each step's map now spans a
    colour scale whose legend says its range, and a view shows what changed since the previous step."""
    url, context = server
    _tiny_controlnet(context, tiny_model_dir, tmp_path, monkeypatch)      # its push grows step by step
    controlnet = "tiny-cn"
    control = Image.new("RGB", (64, 64), "black")
    control.paste((255, 255, 255), (16, 16, 48, 48))
    control.save(tmp_path / "square.png")
    page = _page_on_tab(browser, url, "ControlNet")
    page.locator("#controlnet-0-upload input[type=file]").set_input_files(str(tmp_path / "square.png"))
    page.locator("#controlnet-0-upload img").first.wait_for(state="visible", timeout=30_000)
    _pick_model(page, controlnet)
    _set_steps(page, 6)
    page.locator("#controlnet-seed input").fill("7")   # a drawn seed's map spans more or less of the scale
    page.get_by_text("Control X-ray").click()
    page.locator("#controlnet-xray-button").click()
    summary = page.locator("#controlnet-xray-text")
    summary.get_by_text("the units acted at steps").wait_for(timeout=120_000)
    final = int(re.search(r"(\d+) steps", summary.inner_text())[1]) - 1       # PNDM: one more call than steps

    legend = page.locator("#controlnet-xray-legend")
    legend.get_by_text(f"Step 0 of {final}").wait_for(timeout=30_000)
    (first, first_address), first_range = _shown(page, XRAY), re.search(RANGE, legend.inner_text())[0]
    step = page.locator("#controlnet-xray-step input[type=number]")
    step.fill(str(final))
    step.press("Enter")
    legend.get_by_text(f"Step {final} of {final}").wait_for(timeout=30_000)
    (last, last_address), last_range = (_shown(page, XRAY, replacing=first_address),
                                        re.search(RANGE, legend.inner_text())[0])
    assert first_range != last_range           # the legend names each step's own range
    for shown in (first, last):       # each step's map (left of its colour bar) spans dark to bright
        on_image = shown[:, : shown.shape[0]]
        assert np.percentile(on_image, 99) - np.percentile(on_image, 1) > 120

    page.get_by_label("Change from the previous step").check()
    legend.get_by_text(f"change since step {final - 1}").wait_for(timeout=30_000)
    change, _ = _shown(page, XRAY, replacing=last_address)
    assert change.shape == last.shape and np.abs(change - last).mean() > 2
    page.close()
