"""Live mode (issue 22, part 3): every change regenerates with the fast model, a newer change supersedes the job
of an older one, nothing is saved, and with Live off a change runs nothing."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

import launch
from pipelines.io.metadata import parse_infotext
from studio.tabs.live import LiveRuns
from tests.test_server import browser, free_port  # noqa: F401  (a fixture, used by name)


class Job:
    cancelled = False

    def cancel(self):
        self.cancelled = True


def test_a_newer_change_cancels_the_job_of_the_one_it_supersedes_and_only_the_owners():
    runs = LiveRuns()
    assert runs.begin("ann", 1.0)
    job = Job()
    assert runs.attach("ann", 1.0, job) and runs.newest("ann", 1.0)
    other = Job()
    assert runs.begin("bob", 1.5) and runs.attach("bob", 1.5, other)
    assert runs.begin("ann", 2.0)                 # Ann types again: her running job is cancelled, Bob's is not
    assert job.cancelled and not other.cancelled and not runs.newest("ann", 1.0)
    late = Job()                                  # the older change's job, submitted after the newer change came
    assert not runs.attach("ann", 1.0, late) and late.cancelled
    assert not runs.begin("ann", 1.7)             # a change made before the newest, arriving after it: dropped
    assert runs.newest("ann", 2.0) and runs.attach("ann", 2.0, Job())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The studio on the embedded model (its shipped LCM-LoRA is what Live runs by default)."""
    outputs = tmp_path_factory.mktemp("outputs")
    args = launch.parse_args(["--device", "cpu", "--outputs", str(outputs), "--port", str(free_port())])
    from studio.app import serve

    app, context = launch.build(args)
    serve(app, server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
          allowed_paths=[str(outputs)])
    yield f"http://{args.host}:{args.port}/", context, outputs
    app.close()


@pytest.mark.slow
def test_live_follows_typing_and_mask_strokes_with_the_fast_model_and_saves_nothing(server, browser,  # noqa: F811
                                                                                    capfd):
    from tests.test_server import _paint_a_stroke

    url, context, outputs = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="load")
    prompt = page.locator("#txt2img-prompt textarea")
    prompt.wait_for()
    # Live off: typing runs nothing; the Generate that follows is the one job
    before = len(context.worker.jobs(active=False))
    prompt.press_sequentially("blue heart", delay=20)
    page.locator("#txt2img-generate").click()
    expect(page.locator("#txt2img-status")).to_contain_text("Seed", timeout=60_000)
    assert len(context.worker.jobs(active=False)) == before + 1
    # ... and raises nothing either: Live's handler, which a page's first change reaches even with Live off, once
    # answered "nothing to do" in a form Gradio refuses (an empty dict: "didn't return enough output values"), a
    # traceback in the server's terminal
    assert "Traceback" not in capfd.readouterr().err
    saved = sorted(outputs.rglob("*.png"))
    assert len(saved) == 1

    page.locator(".studio-live input").first.check()            # Live on: Fast comes on with it
    expect(page.locator(".studio-fast input").first).to_be_checked()
    prompt.fill("")
    prompt.press_sequentially("red apple", delay=30)
    infotext = page.locator("#txt2img-infotext textarea")
    expect(infotext).to_have_value(re.compile(r"^red apple <lora:emoji-ldm-lcm:1>\n"), timeout=30_000)
    expect(page.locator("#txt2img-status")).to_contain_text("Live", timeout=30_000)
    parameters = parse_infotext(infotext.input_value())[2]
    assert (parameters["Sampler"], parameters["Steps"], parameters["CFG scale"]) == ("LCM", "2", "1")   # Live's 2
    seed = page.locator("#txt2img-seed input")
    seed.fill("77")
    seed.press("Enter")
    expect(infotext).to_have_value(re.compile(r"Seed: 77,"), timeout=30_000)
    assert sorted(outputs.rglob("*.png")) == saved              # Live's drafts are shown, not saved

    # Inpainting, on the same page: each mask stroke regenerates
    page.get_by_role("tab", name="Inpainting").click()
    with page.expect_file_chooser() as chooser:
        page.locator("#inpaint-editor button[aria-label=Upload]").click()
    chooser.value.set_files(str(launch.ROOT / "assets" / "examples" / "noto-red-apple.png"))
    page.locator("#inpaint-prompt textarea").fill("sunglasses")
    tab = page.locator("#inpaint-status").locator("xpath=ancestor::div[contains(@class,'tabitem')]")
    tab.locator(".studio-live input").first.check()
    infotext = page.locator("#inpaint-infotext textarea")
    _paint_a_stroke(page, "#inpaint-editor")
    expect(infotext).to_have_value(re.compile(r"^sunglasses <lora:emoji-ldm-lcm:1>\n"), timeout=30_000)
    expect(page.locator("#inpaint-status")).to_contain_text("Live")
    first = infotext.input_value()
    _paint_a_stroke(page, "#inpaint-editor")                     # another stroke: another image
    expect(infotext).not_to_have_value(first, timeout=30_000)
    assert sorted(outputs.rglob("*.png")) == saved               # drafts, not saved
    assert "Traceback" not in capfd.readouterr().err              # superseded changes answered in Gradio's terms too
    page.close()
