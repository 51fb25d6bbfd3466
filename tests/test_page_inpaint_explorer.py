"""Issue 25, as a newcomer meets the page in Chromium: inpainting a picture larger than the processing size
(item 4), the explorer's playback and exported GIF (item 6), and small things (item 10): the Inpainting tab's
example images, the explorer's moments table (the training upload's thumbnails: test_server's LoRA training)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.io.metadata import infotext_to_settings, parse_infotext
from tests.test_server import _page_on_tab, _paint_a_stroke, browser, server  # noqa: F401 (fixtures)

QUEUE_JOIN = "/gradio_api/queue/join"


def _assert_the_gif_plays_on_the_page(page, button: str, image: str) -> None:
    """Item 6: an exported GIF was only a download link; pressing `button` shows it at `image`."""
    page.locator(button).click()
    shown = page.locator(image)
    shown.wait_for(state="visible", timeout=60_000)
    assert ".gif" in shown.get_attribute("src")


@pytest.mark.slow
def test_browser_inpaint_of_a_picture_larger_than_its_size_says_so_and_records_the_size_used(server, browser,
                                                                                            tmp_path):
    """Item 4: a 256×256 picture inpainted at Width × Height 64×64 is repainted as one 64-px region scaled back
    up. The infotext's Size is the processing size (A1111's meaning: what PNG Info's restore needs to give the
    same result back), and the page says why the repaint is coarse and what to do about it."""
    url, context = server
    rng = np.random.default_rng(25)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    page = _page_on_tab(browser, url, "Inpainting")
    with page.expect_file_chooser() as chooser:
        page.locator("#inpaint-editor button[aria-label=Upload]").click()
    chooser.value.set_files(str(tmp_path / "big.png"))
    _paint_a_stroke(page, "#inpaint-editor")
    steps = page.locator("#inpaint-steps input[type=number]")
    steps.fill("4")
    steps.press("Enter")
    page.locator("#inpaint-prompt textarea").fill("blue car")
    page.locator("#inpaint-seed input").fill("2504")
    page.locator("#inpaint-generate").click()
    page.locator("#inpaint-status").get_by_text("Seed 2504").wait_for(timeout=120_000)
    status = page.locator("#inpaint-status").inner_text()
    assert "256×256 picture was repainted as one 64×64 region" in status, status
    assert "Only masked" in status
    assert "Size: 64x64" in page.locator("#inpaint-infotext textarea").input_value()
    saved = Image.open(sorted(context.outputs_dir.rglob("*-2504.png"))[-1])
    assert saved.size == (256, 256)
    page.close()


def test_an_inpaint_restored_from_its_infotext_gives_the_same_result(studio):
    """Item 4's choice: `Size` is the processing size (A1111's), not the picture's. The same picture and mask with
    the settings read back from the infotext repaint the same pixels; read as the picture's 256×256, they would
    not (and would run 16 times the work)."""
    from pipelines.tasks.inpaint import InpaintRequest

    rng = np.random.default_rng(4)
    picture = Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[96:160, 80:176] = 255
    first = studio.generate(InpaintRequest(prompt="blue car", init_image=picture, mask=Image.fromarray(mask),
                                           width=64, height=64, steps=3, seed=41)).images[0]
    _, _, parameters = parse_infotext(first.infotext)
    assert parameters["Size"] == "64x64" and first.image.size == (256, 256)
    settings = infotext_to_settings(parameters)
    restored = {name: value for name, value in settings.items() if name in InpaintRequest.__dataclass_fields__}
    assert (restored["width"], restored["height"], restored["seed"]) == (64, 64, 41)
    again = studio.generate(InpaintRequest(prompt="blue car", init_image=picture, mask=Image.fromarray(mask),
                                           **restored)).images[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))


def _record(page, steps: int) -> None:
    page.get_by_role("tab", name="Reverse: denoising").click()
    page.locator("#explorer-prompt textarea").fill("red apple")
    page.locator("#explorer-seed input").fill("7")
    box = page.locator("#explorer-steps input[type=number]")
    box.fill(str(steps))
    box.press("Enter")
    page.locator("#explorer-record").click()
    page.locator("#explorer-final img").wait_for(state="visible", timeout=120_000)


@pytest.mark.slow
def test_browser_explorer_plays_each_frame_in_one_request_above_the_fold_and_shows_its_gif(server, browser):
    """Item 6: playback advanced at most 1/0.6 s a frame, through two queued events per frame (the timer's tick,
    then the slider's change rendering the step); the frames sat below the fold of a 1400×1000 window; the
    exported GIF was only a download link."""
    url, _ = server
    page = _page_on_tab(browser, url, "Diffusion Explorer")
    _record(page, 8)
    page.evaluate("window.scrollTo(0, 0)")
    for frame in ("#explorer-frame img", "#explorer-x0 img"):
        bottom = page.locator(frame).evaluate("e => e.getBoundingClientRect().bottom")
        assert bottom <= 1000, f"{frame} ends at {bottom} px, below the fold"

    joins = []
    page.on("request", lambda request: joins.append(request.url) if QUEUE_JOIN in request.url else None)
    page.locator("#explorer-play").click()
    page.wait_for_function("() => Number(document.querySelector('#explorer-step-slider input[type=number]').value)"
                           " === 7", timeout=60_000)
    last = page.locator("#explorer-step-info").get_by_text("Step 7 of 7")
    last.wait_for(timeout=30_000)                   # the last frame's views are on screen
    # the play click, then one tick per frame advanced (7), each bringing its step's views
    assert len(joins) <= 1 + 7, joins
    # the step buttons and a typed step still show their step's views
    page.locator("#explorer-step-prev").click()
    page.locator("#explorer-step-info").get_by_text("Step 6 of 7").wait_for(timeout=30_000)
    typed = page.locator("#explorer-step-slider input[type=number]")
    typed.fill("3")
    typed.press("Enter")
    page.locator("#explorer-step-info").get_by_text("Step 3 of 7").wait_for(timeout=30_000)

    page.get_by_text("Export the recorded frames").click()
    _assert_the_gif_plays_on_the_page(page, "#explorer-export-gif", "#explorer-export-preview img")
    page.close()


@pytest.mark.slow
def test_browser_inpainting_offers_example_pictures(server, browser):
    """Item 10: the Inpainting tab had no example picture to start from, where the explorer has some."""
    url, _ = server
    page = _page_on_tab(browser, url, "Inpainting")
    examples = page.locator("#inpaint-examples")
    examples.locator("img").first.wait_for(state="visible", timeout=30_000)
    examples.locator("img").first.click()
    # the example is in the editor: painting on it and inpainting works without an upload
    page.locator("#inpaint-editor canvas").last.wait_for(state="visible")
    _paint_a_stroke(page, "#inpaint-editor")
    steps = page.locator("#inpaint-steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    page.locator("#inpaint-seed input").fill("2510")
    page.locator("#inpaint-generate").click()
    page.locator("#inpaint-status").get_by_text("Seed 2510").wait_for(timeout=120_000)
    page.close()


@pytest.mark.slow
def test_browser_explorer_moments_table_keeps_its_headers_whole_and_the_forward_gif_shows(server, browser):
    """Item 10: the Markov check's table wrapped its header as 'in theor / y' (and item 6: the forward panel's
    GIF was only a download link too)."""
    url, _ = server
    page = _page_on_tab(browser, url, "Diffusion Explorer")
    page.locator("#explorer-forward-caption").get_by_text("t = 250").wait_for(timeout=60_000)
    page.locator("#explorer-forward-markov").click()
    header = page.locator("#explorer-forward-moments th", has_text="theory")
    header.wait_for(timeout=120_000)
    lines = header.evaluate("e => { const range = document.createRange(); range.selectNodeContents(e);"
                            " return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size; }")
    assert lines == 1, f"the header {header.inner_text()!r} wraps over {lines} lines"
    # item 6, here too: the exported GIF plays on the page
    _assert_the_gif_plays_on_the_page(page, "#explorer-forward-gif", "#explorer-forward-gif-shown img")
    page.close()
