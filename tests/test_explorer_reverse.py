"""Tests for the reverse half of the Diffusion Explorer (pipelines/explorer/reverse.py, trace.py, comparison.py,
the Explorer service in pipelines/explorer/service.py, studio/tabs/explorer*.py), on the seeded tiny model of
tests/conftest.py."""

from __future__ import annotations

import math
import threading

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.explorer import reverse as explorer_reverse
from pipelines.explorer.animation import export_trace
from pipelines.explorer.comparison import COMPARE_COLUMNS, compare, difference_map, parse_compare_lists
from pipelines.explorer.formulas import FORMULAS_REVERSE, LATEX_DELIMITERS
from pipelines.explorer.reverse import branch, record_trace
from pipelines.explorer.service import Explorer
from pipelines.explorer.trace import Trace
from pipelines.jobs.worker import JobState, Progress
from pipelines.tasks.txt2img import Txt2ImgRequest


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


def request(**overrides) -> Txt2ImgRequest:
    values = dict(prompt="red apple", negative_prompt="blurry", sampler="DPM++ 2M", steps=5, guidance_scale=5.0,
                  width=64, height=64, seed=1234)
    return Txt2ImgRequest(**(values | overrides))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


class Held:
    """A run of an explorer_reverse function that waits after reporting one step (see `hold_at`)."""

    def __init__(self):
        self.reached = threading.Event()    # the run has reported the step and waits
        self.release = threading.Event()    # the test lets it go on
        self.on_worker: list[bool] = []     # per run: whether it ran on the device worker's thread


def hold_at(monkeypatch, worker, name: str, step: int) -> Held:
    """Make `explorer_reverse.<name>` (record_trace or branch) wait after reporting `step`, until released,
    so a test can cancel its job mid-run without racing it."""
    held, original = Held(), getattr(explorer_reverse, name)

    def holding(*args, on_step, **kwargs):
        held.on_worker.append(worker.on_worker_thread())

        def report(done, total):
            on_step(done, total)
            if done == step:
                held.reached.set()
                held.release.wait(timeout=60)
        return original(*args, on_step=report, **kwargs)

    monkeypatch.setattr(explorer_reverse, name, holding)
    return held


# ----------------------------------------------------------------------------- recording


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler a", "Heun"])
def test_trace_final_image_is_bit_identical_to_text_to_image(studio, sampler):
    wanted = request(sampler=sampler)
    generated = studio.generate(wanted).images[0].image
    # on the device thread, as the explorer records in the app: a kernel's sums may split differently with
    # another thread count, and this thread runs with one (`one_torch_thread`)
    trace = studio.models.worker.call(record_trace, studio.models, wanted)
    assert np.array_equal(pixels(trace.final_image), pixels(generated))
    expected_records = 2 * wanted.steps - 1 if sampler == "Heun" else wanted.steps  # Heun: two UNet calls per step
    assert trace.num_steps == expected_records
    assert trace.request.seed == 1234 and not trace.stopped


def test_guided_prediction_is_the_cfg_combination_at_every_step(studio):
    wanted = request(guidance_scale=6.5)
    trace = record_trace(studio.models, wanted)
    for step in trace.steps:
        assert step.eps_uncond is not None
        assert not torch.allclose(step.eps_uncond, step.eps_cond)  # two different passes were recorded
        combined = step.eps_uncond + wanted.guidance_scale * (step.eps_cond - step.eps_uncond)
        torch.testing.assert_close(step.eps_guided, combined, rtol=1e-5, atol=1e-5)
    # frames: decoded x_t / x̂_0 and noise maps all at the image size
    for kind in ("x_t", "x0_pred", "eps_uncond", "eps_cond", "eps_guided"):
        assert trace.frame(2, kind).size == (64, 64)
    assert trace.frame(2, "x_t") is trace.frame(2, "x_t")  # decoded once, then cached


def test_cfg_one_records_no_unconditional_pass(studio):
    trace = record_trace(studio.models, request(guidance_scale=1.0))
    assert all(step.eps_uncond is None for step in trace.steps)
    assert all(torch.equal(step.eps_guided, step.eps_cond) for step in trace.steps)
    with pytest.raises(ValueError, match="CFG was off"):
        trace.frame(0, "eps_uncond")


def test_noise_level_falls_and_last_x0_prediction_is_the_final_latent(studio):
    # Euler's last step goes to sigma = 0, landing exactly on its x̂_0 = x - sigma eps
    euler = record_trace(studio.models, request(sampler="Euler", steps=6))
    levels = [step.noise_level for step in euler.steps]
    assert all(step.sigma_parametrised for step in euler.steps)
    assert levels == sorted(levels, reverse=True) and levels[0] > 1.0
    torch.testing.assert_close(euler.steps[-1].x0_pred, euler.final_latents.float(), rtol=1e-4, atol=1e-4)
    # DDIM (variance preserving) ends at abar_0 < 1: close to, not equal to, the last x̂_0
    ddim = record_trace(studio.models, request(sampler="DDIM", steps=6))
    assert not any(step.sigma_parametrised for step in ddim.steps)
    assert all(0.0 < step.noise_level < 1.0 for step in ddim.steps)
    error = (ddim.steps[-1].x0_pred - ddim.final_latents.float()).norm() / ddim.final_latents.float().norm()
    assert error < 0.05
    first_error = (ddim.steps[0].x0_pred - ddim.final_latents.float()).norm() / ddim.final_latents.float().norm()
    assert error < first_error  # the guess of x_0 improves as the noise goes


def test_stop_ends_the_recording_early(studio):
    import threading

    stop = threading.Event()

    def on_step(done, total):
        if done == 2:
            stop.set()

    trace = record_trace(studio.models, request(steps=8), stop=stop, on_step=on_step)
    assert trace.stopped and trace.num_steps == 2


def test_a_record_job_streams_progress_then_the_trace(studio):
    job = Explorer(studio.models).record(request(steps=3), owner="session-a")
    assert job.owner == "session-a" and job.kind == "explorer-record"
    events = list(job.stream())
    progress = [(e.done, e.total) for e in events[:-1]]
    # a follower that joined before the first step sees every step; one that joined late, the latest
    assert progress[-1] == (3, 3) and progress == sorted(set(progress)) and set(progress) <= {(1, 3), (2, 3), (3, 3)}
    assert events[-1].num_steps == 3 and job.state is JobState.DONE
    direct = studio.models.worker.call(record_trace, studio.models, request(steps=3))  # same thread, same numbers
    assert np.array_equal(pixels(events[-1].final_image), pixels(direct.final_image))


def test_a_cancelled_record_job_ends_with_a_stopped_trace(studio, monkeypatch):
    held = hold_at(monkeypatch, studio.models.worker, "record_trace", step=2)
    job = Explorer(studio.models).record(request(steps=8))
    assert held.reached.wait(timeout=60)
    reported = job.progress
    job.cancel()
    held.release.set()
    trace = job.result(timeout=60)
    assert (reported.done, reported.total) == (2, 8)
    assert trace.stopped and trace.num_steps == 2 and job.state is JobState.CANCELLED
    assert held.on_worker == [True]


def test_bad_requests_are_refused_with_clear_messages(studio):
    with pytest.raises(ValueError, match="batch_size is 2"):
        record_trace(studio.models, request(batch_size=2))
    with pytest.raises(ValueError, match="divisible by"):
        record_trace(studio.models, request(width=66))
    trace = record_trace(studio.models, request(steps=2))
    with pytest.raises(ValueError, match="from 0 to 1"):
        trace.frame(2, "x_t")
    with pytest.raises(ValueError, match="Unknown frame kind"):
        trace.frame(0, "x_T")


# ----------------------------------------------------------------------------- branching


def test_branch_without_changes_reproduces_the_original_bit_for_bit(studio):
    original = record_trace(studio.models, request(sampler="DPM++ 2M", steps=6))  # multistep: needs its history
    same = branch(studio.models, original, 3, {"guidance_scale": 5.0})
    assert np.array_equal(pixels(same.final_image), pixels(original.final_image))
    assert same.branched_at == 3 and same.changes == {}


def test_a_branch_of_a_branch_replays_its_whole_history(studio):
    original = record_trace(studio.models, request(sampler="UniPC", steps=6))
    first = branch(studio.models, original, 2, {"guidance_scale": 9.0})
    second = branch(studio.models, first, 4, {})  # no change: must reproduce `first`, not `first`'s settings from 0
    assert [(k, r.guidance_scale) for k, r in second.settings] == [(0, 5.0), (2, 9.0), (4, 9.0)]
    assert np.array_equal(pixels(second.final_image), pixels(first.final_image))


def test_branch_with_other_cfg_or_prompt_keeps_the_past_and_changes_the_future(studio):
    original = record_trace(studio.models, request(steps=6))
    stronger = branch(studio.models, original, 3, {"guidance_scale": 12.0})
    assert stronger.request.guidance_scale == 12.0 and stronger.changes == {"guidance_scale": 12.0}
    for before, after in zip(original.steps[:3], stronger.steps[:3]):
        assert torch.equal(before.latents, after.latents)
    assert torch.equal(original.steps[3].latents, stronger.steps[3].latents)  # same x_t where the branch starts
    assert not torch.equal(original.steps[3].eps_guided, stronger.steps[3].eps_guided)  # new guidance from there
    assert not np.array_equal(pixels(stronger.final_image), pixels(original.final_image))
    difference = pixels(difference_map(original.final_image, stronger.final_image))
    assert difference.std() > 0

    reprompted = branch(studio.models, original, 2, {"prompt": "a cat", "guidance_scale": 1.0})  # CFG off mid-way
    assert reprompted.steps[1].eps_uncond is not None and reprompted.steps[2].eps_uncond is None
    assert not np.array_equal(pixels(reprompted.final_image), pixels(original.final_image))


def test_branch_to_another_sampler_continues_from_the_same_x_t(studio):
    original = record_trace(studio.models, request(sampler="DDIM", steps=6))
    switched = branch(studio.models, original, 3, {"sampler": "Euler"})
    assert switched.request.sampler == "Euler" and switched.num_steps == 6
    assert switched.steps[3].sigma_parametrised and not original.steps[3].sigma_parametrised
    # carried over in the variance-preserving frame: the UNet is shown the same x_t
    torch.testing.assert_close(switched.steps[3].model_input.float(), original.steps[3].model_input.float(),
                               rtol=1e-5, atol=1e-5)
    assert not np.array_equal(pixels(switched.final_image), pixels(original.final_image))
    with pytest.raises(ValueError, match="warm-up"):
        branch(studio.models, original, 3, {"sampler": "PNDM"})
    with pytest.raises(ValueError, match="can change"):
        branch(studio.models, original, 3, {"seed": 5})
    with pytest.raises(ValueError, match="from 0 to 5"):
        branch(studio.models, original, 6, {})


def test_a_branch_job_stops_when_its_owner_cancels(studio, monkeypatch):
    explorer = Explorer(studio.models)
    original = record_trace(studio.models, request(steps=6))
    with pytest.raises(ValueError, match="Record a run first"):
        explorer.branch(None, 3, {})
    held = hold_at(monkeypatch, studio.models.worker, "branch", step=4)
    job = explorer.branch(original, 3.0, {"guidance_scale": 12.0}, owner="session-b")
    assert held.reached.wait(timeout=60)
    assert studio.models.worker.cancel(owner="session-b") == [job]  # a session's Stop
    held.release.set()
    branched = job.result(timeout=60)
    assert branched.stopped and branched.num_steps == 4 and job.state is JobState.CANCELLED
    assert branched.branched_at == 3 and branched.changes == {"guidance_scale": 12.0}
    assert held.on_worker == [True]


def test_difference_map_of_identical_images_is_uniform():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    same = pixels(difference_map(image, image))
    assert (same == same[0, 0]).all()
    brighter = Image.fromarray(np.clip(pixels(image).astype(int) + 8, 0, 255).astype(np.uint8))
    shifted = pixels(difference_map(image, brighter))
    assert (shifted != same[0, 0]).any()  # a small difference, amplified, is visible
    with pytest.raises(ValueError, match="same size"):
        difference_map(image, image.resize((8, 8)))


# ----------------------------------------------------------------------------- comparing


def test_compare_grid_cells_counts_and_reference(studio):
    grid, rows = compare(studio.models, request(), samplers=["DDIM", "Euler"], steps=[2, 4], cfgs=[1.0, 3.0],
                         reference_steps=4)
    assert len(rows) == 8
    assert [(r.sampler, r.steps, r.guidance_scale) for r in rows[:4]] == [
        ("DDIM", 2, 1.0), ("DDIM", 2, 3.0), ("DDIM", 4, 1.0), ("DDIM", 4, 3.0)]
    for row in rows:
        assert row.unet_calls == row.steps
        assert row.model_evaluations == row.steps * (2 if row.guidance_scale > 1 else 1)
        assert isinstance(row.seconds, float) and math.isfinite(row.seconds)  # timed, never compared
        assert len(row.values()) == len(COMPARE_COLUMNS)
        assert row.values()[:3] == [row.sampler, row.steps, row.guidance_scale]
    # DDIM at the reference's step count is the reference
    assert [r.rms_to_reference for r in rows if r.sampler == "DDIM" and r.steps == 4] == [0.0, 0.0]
    assert all(r.rms_to_reference > 0 for r in rows if r.sampler == "Euler")
    # 2 rows (samplers) × 4 columns (steps × CFG), each cell with an image above its label
    array = pixels(grid)
    cell_width, cell_height = grid.width // 4, grid.height // 2
    assert grid.width == 4 * cell_width and grid.height == 2 * cell_height
    for row in range(2):
        for column in range(4):
            cell = array[row * cell_height:(row + 1) * cell_height, column * cell_width:(column + 1) * cell_width]
            assert cell[4:132].std() > 0 and (cell[-12:] < 128).any()  # picture, then dark label text


def test_compare_refuses_too_many_cells_and_parses_lists(studio):
    with pytest.raises(ValueError, match="at most 24"):
        compare(studio.models, request(), steps=list(range(1, 30)))
    assert parse_compare_lists("euler, DDIM", "10,20", "") == {"samplers": ["Euler", "DDIM"], "steps": [10, 20],
                                                                "cfgs": None}
    with pytest.raises(ValueError, match="Unknown sampler 'Eulr'"):
        parse_compare_lists("Eulr", "", "")
    with pytest.raises(ValueError, match="whole numbers"):
        parse_compare_lists("", "10, many", "")


def test_a_compare_job_reports_each_image_then_the_grid(studio):
    job = Explorer(studio.models).compare(request(), samplers=["DDIM", "Euler"], steps=[2], reference_steps=2)
    events = list(job.stream())
    grid, rows = events[-1]
    assert events[-2] == Progress(2, 2) and job.kind == "explorer-compare"
    assert [(row.sampler, row.steps, row.guidance_scale) for row in rows] == [("DDIM", 2, 5.0), ("Euler", 2, 5.0)]
    assert rows[0].rms_to_reference == 0.0 and grid.height > grid.width  # a row per sampler, one column


# ----------------------------------------------------------------------------- export and formulas


def test_exported_gif_and_mp4_have_one_frame_per_step(studio, tmp_path):
    trace = record_trace(studio.models, request(steps=4))
    gif = export_trace(trace, "x_t", tmp_path / "x_t.gif", fps=4)
    with Image.open(gif) as animation:
        assert animation.n_frames == trace.num_steps + 1  # the steps' x_t, then the final image
    mp4 = export_trace(trace, "x0_pred", tmp_path / "x0.mp4", fps=4)
    reader = imageio.get_reader(mp4)
    try:
        assert reader.count_frames() == trace.num_steps
        assert reader.get_data(0).shape[0] >= 256  # upscaled for players
    finally:
        reader.close()


def test_step_views_decode_on_the_worker_and_clamp_the_step(studio, monkeypatch):
    explorer = Explorer(studio.models)
    trace = record_trace(studio.models, request(steps=3, guidance_scale=1.0))
    decoded_on_worker = []
    decode = Trace._decode

    def spy(self, latents):
        decoded_on_worker.append(studio.models.worker.on_worker_thread())
        return decode(self, latents)

    monkeypatch.setattr(Trace, "_decode", spy)
    views = explorer.step_views(trace, 7, "eps_uncond")  # past the end: the last step
    assert views.info.startswith("**Step 2 of 2** · t = ") and "CFG is off at this step" in views.info
    assert views.noise is None  # CFG 1 made no unconditional pass
    assert views.x_t is trace.frame(2, "x_t") and views.x0_pred is trace.frame(2, "x0_pred")
    assert decoded_on_worker == [True, True]
    guided = explorer.step_views(trace, 0, "eps_guided")
    assert guided.noise.size == (64, 64) and "CFG is off" not in guided.info
    with pytest.raises(ValueError, match="Unknown noise prediction 'x_t'"):
        explorer.step_views(trace, 0, "x_t")


def test_export_trace_writes_every_frame(studio):
    explorer = Explorer(studio.models)
    with pytest.raises(ValueError, match="Record a run first, then export its frames"):
        explorer.export_trace(None, "x_t", fps=8, suffix=".gif")
    trace = record_trace(studio.models, request(steps=3))
    path = explorer.export_trace(trace, "x0_pred", fps=8.0, suffix=".gif")
    assert path.name == "reverse-x0_pred-seed1234.gif"
    with Image.open(path) as animation:
        assert animation.n_frames == trace.num_steps


def test_formulas_are_display_math_for_gradio_markdown():
    assert {"ddpm_update", "ddim_update", "x0_from_eps", "cfg"} <= set(FORMULAS_REVERSE)
    for text in FORMULAS_REVERSE.values():
        assert text.count("$$") == 2 and text.split("$$")[0].strip()  # an English sentence, then the formula
    assert {"left": "$$", "right": "$$", "display": True} in LATEX_DELIMITERS


# ----------------------------------------------------------------------------- the tab


def handlers(demo) -> dict:
    """The tab's event handlers by function name, as Gradio calls them."""
    return {block_fn.name: block_fn.fn for block_fn in demo.fns.values()}


def test_explorer_tab_builds_with_its_components_and_device_queue(studio, tmp_path, monkeypatch):
    import gradio as gr

    from studio.context import StudioContext
    from studio.tabs.explorer import build_explorer_tab

    context = StudioContext(models=studio.models, generator=studio, outputs_dir=tmp_path)
    with gr.Blocks() as demo:
        tab = build_explorer_tab(context)
    elem_ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"explorer-record", "explorer-frame", "explorer-play", "explorer-pause", "explorer-step-slider",
            "explorer-branch", "explorer-compare", "explorer-forward-image", "explorer-final", "explorer-prompt",
            "explorer-seed", "explorer-steps"} <= elem_ids
    markdowns = [b for b in demo.blocks.values() if isinstance(b, gr.Markdown) and "$$" in str(b.value)]
    assert markdowns and all({"left": "$$", "right": "$$", "display": True} in b.latex_delimiters for b in markdowns)
    record = [f for f in demo.fns.values() if f.name == "record_reverse"]
    assert record and record[0].api_name == "explorer_record"
    assert record[0].concurrency_id == "device" and record[0].concurrency_limit == 1
    assert tab.reverse.settings["size"].value == studio.models.current.native_side

    # Record, then Stop while it runs: the session's job stops, and the tab shows the partial trace
    held = hold_at(monkeypatch, studio.models.worker, "record_trace", step=1)
    found = handlers(demo)
    recording = found["record_reverse"](noise_kind="eps_guided", prompt="red apple", negative_prompt="blurry",
                                        sampler="Euler", steps=6, guidance_scale=5.0, seed=1234, size=64)
    job_id = next(recording)[tab.reverse.job_id]
    assert held.reached.wait(timeout=60)
    found["stop_job"](job_id=job_id)
    held.release.set()
    shown = list(recording)[-1]
    player, trace = tab.reverse.player, shown[tab.reverse.trace]
    assert trace.stopped and trace.num_steps == 1 and context.find_job(job_id).state is JobState.CANCELLED
    assert shown[player.final] is trace.final_image and shown[player.x_t] is trace.frame(0, "x_t")
    assert shown[tab.reverse.status].startswith("Recorded 1 UNet evaluations (steps 0–0) · seed 1234 · Euler, CFG 5")
    assert "Stopped after 1 step(s)" in shown[tab.reverse.status]
    assert shown[tab.reverse.branch.changes["prompt"]] == "red apple"


def test_explorer_tab_without_a_model_falls_back_and_explains(tmp_path, worker):
    import gradio as gr

    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from studio.context import StudioContext
    from studio.tabs.explorer import build_explorer_tab

    models = ModelManager(MemoryManager(device="cpu"), worker=worker, models_dir=tmp_path / "models")
    context = StudioContext(models=models, generator=Generator(models, None), outputs_dir=tmp_path)
    with gr.Blocks() as demo:
        tab = build_explorer_tab(context)
    assert tab.reverse.settings["size"].value == 512  # no model to take the native size from
    found = handlers(demo)

    # Forward works on pixels alone, and says what a model would add
    image = Image.new("RGB", (40, 40), "red")
    shown = found["show_forward"](image=image, schedule_names=["linear"], num_steps=1000, t=250, seed=0)
    assert shown[tab.forward.pixel]["value"].size == (128, 128) and shown[tab.forward.latent]["value"] is None
    assert "Load a model to see the same t in its latent space" in shown[tab.forward.caption]
    with pytest.raises(gr.Error, match='Schedule "model" needs a loaded model'):
        found["show_forward"](image=image, schedule_names=["model"], num_steps=1000, t=250, seed=0)
    empty = found["show_forward"](image=None, schedule_names=["linear"], num_steps=1000, t=250, seed=0)
    assert empty[tab.forward.pixel] is None and empty[tab.forward.caption].startswith("Upload an image")

    # Reverse explains what is missing
    scrubbed = found["render_step"](trace=None, step=0, noise_kind="eps_guided")
    assert scrubbed[tab.reverse.player.info] == "Record a run to scrub through its steps."
    recording = found["record_reverse"](noise_kind="eps_guided", prompt="red apple", negative_prompt="",
                                        sampler="Euler", steps=2, guidance_scale=7.5, seed=1, size=64)
    with pytest.raises(gr.Error, match="No model is loaded"):
        list(recording)
