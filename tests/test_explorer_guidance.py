"""The explorer's guidance panel (pipelines/explorer/guidance.py, guidance_view.py, studio/tabs/explorer_guidance.py)
on the seeded tiny model of tests/conftest.py: each method's directions are recorded at every model call and are
what its equation says, CFG's final image is the studio's own, classifier guidance is left out where there is no
classifier and says why, the judge and the held-out table are read, and the endpoint answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from pipelines.core.call import prepare
from pipelines.core.denoiser import Denoiser, NoisePrediction
from pipelines.core.guidance import classifier_guided
from pipelines.explorer.guidance import (CFG, CFG_DIRECTION, CFG_PAG, CLASSIFIER, CLASSIFIER_DIRECTION,
                                         CLASSIFIER_GRADIENT, GUIDANCE_METHODS, ICG, ICG_DIRECTION, INTERVAL,
                                         NO_JUDGE_CLASS, NONE, PAG, PAG_DIRECTION, GuidanceComparison, MethodRun,
                                         compare_guidance, guidance_directions, judge_class, read_held_out, rms)
from pipelines.explorer.guidance_view import direction_image, guidance_view
from pipelines.tasks.txt2img import Txt2ImgRequest

SETTINGS = {"prompt": "red apple", "seed": 1234, "steps": 5, "sampler": "Euler", "guidance_scale": 5.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


def _compare(studio, **options):
    settings = SETTINGS | {"pag_scale": 3.0, "cfg_start": 0.4, "cfg_end": 0.8, "shown_calls": 5} | options
    return studio.models.worker.call(lambda: compare_guidance(studio.models, **settings))


def test_each_method_records_what_its_equation_adds_at_every_model_call(studio, tmp_path):
    comparison = _compare(studio, methods=[NONE, CFG, INTERVAL, ICG, PAG, CFG_PAG], held_out_path=tmp_path / "none")
    runs = {run.method: run for run in comparison.runs}
    assert list(runs) == [NONE, CFG, INTERVAL, ICG, PAG, CFG_PAG] and comparison.shown_calls == [0, 1, 2, 3, 4]
    for run in comparison.runs:
        assert len(run.timesteps) == 5 and set(run.norms) == set(run.components)
        assert all(len(norms) == 5 for norms in run.norms.values())
        assert run.final_image.size == (64, 64) and run.judge is not None
    assert runs[NONE].components == () and runs[NONE].model_evaluations == 5

    # CFG: w (ε_c − ε_u), recomputed here from the Denoiser's own prediction at the first call
    request = Txt2ImgRequest(**SETTINGS, width=64, height=64)

    def first_prediction():
        call = prepare(studio.models, request)
        scheduler = call.pipeline.scheduler
        scheduler.set_timesteps(request.steps)
        x_T = call.initial_noise(call.generators(0)) * scheduler.init_noise_sigma
        return Denoiser(call).predict(x_T, scheduler.timesteps[0], index=0, count=request.steps)

    prediction = studio.models.worker.call(first_prediction)
    expected = 5.0 * (prediction.eps_cond - prediction.eps_uncond)
    torch.testing.assert_close(runs[CFG].directions[0][CFG_DIRECTION], expected, rtol=1e-5, atol=1e-6)
    assert runs[CFG].norms[CFG_DIRECTION][0] == pytest.approx(float(expected.square().mean().sqrt()), rel=1e-5)
    assert runs[CFG].model_evaluations == 10

    # The interval [0.4, 0.8) of 5 calls is calls 2 and 3: zero outside, CFG's own direction inside
    inside = runs[INTERVAL].norms[CFG_DIRECTION]
    assert [norm > 0 for norm in inside] == [False, False, True, True, False]
    assert all(not runs[INTERVAL].directions[call][CFG_DIRECTION].any() for call in (0, 1, 4))
    assert runs[INTERVAL].model_evaluations == 5 + 2

    # PAG (alone, and beside CFG) adds s (ε_c − ε̃_c) ≠ 0 at every call; ICG's random prompt differs from ""
    assert all(norm > 0 for norm in runs[PAG].norms[PAG_DIRECTION] + runs[CFG_PAG].norms[PAG_DIRECTION])
    assert runs[PAG].model_evaluations == 10 and runs[CFG_PAG].model_evaluations == 15
    assert runs[CFG_PAG].norms[CFG_DIRECTION][0] == pytest.approx(runs[CFG].norms[CFG_DIRECTION][0], rel=1e-5)
    assert not torch.allclose(runs[ICG].directions[0][ICG_DIRECTION], runs[CFG].directions[0][CFG_DIRECTION])
    # ... and each moved the image away from the baseline's
    baseline = np.asarray(runs[NONE].final_image, dtype=np.int16)
    assert all(np.abs(np.asarray(runs[m].final_image, dtype=np.int16) - baseline).max() > 0 for m in (CFG, PAG))

    # The view: a gallery captioned with the judge's numbers, one line per added direction, a row per method
    view = guidance_view(comparison)
    assert [caption.split(" · ")[0] for _, caption in view.gallery] == [NONE, CFG, INTERVAL, ICG, PAG, CFG_PAG]
    assert "“red apple” ranks" in view.gallery[1][1] and "evaluations" in view.gallery[1][1]
    assert isinstance(view.figure, Figure) and len(view.figure.axes[0].get_lines()) == 6 + 5   # + the dotted calls
    assert view.grid.height > 5 * 96 and "| CFG + PAG |" in view.run_table
    assert "run `python -m bench.guidance`" in view.held_out_table
    numbers = comparison.numbers()
    assert numbers["methods"][CFG]["rms"][CFG_DIRECTION] == runs[CFG].norms[CFG_DIRECTION]
    json.dumps(numbers)


def test_cfg_s_final_image_is_the_one_text_to_image_generates(studio):
    settings = {"prompt": "red apple", "seed": 4321, "steps": 6, "sampler": "DPM++ 2M", "guidance_scale": 7.5}
    comparison = _compare(studio, **settings, methods=[CFG])
    done = studio.generate(Txt2ImgRequest(**settings, width=64, height=64))
    ours = np.asarray(comparison.runs[0].final_image.convert("RGB"), dtype=np.int16)
    theirs = np.asarray(done.images[0].image.convert("RGB"), dtype=np.int16)
    assert np.abs(ours - theirs).max() <= 1 and theirs.std() > 2.0


def test_classifier_guidance_is_left_out_where_no_classifier_fits_and_says_why(studio, tmp_path):
    comparison = _compare(studio, steps=2, methods=[CFG, CLASSIFIER], classifier_class="food & drink",
                          held_out_path=tmp_path / "none")
    assert [run.method for run in comparison.runs] == [CFG]
    (note,) = [note for note in comparison.notes if CLASSIFIER in note]
    assert "left out" in note and "embedded model only" in note
    no_class = _compare(studio, steps=2, methods=[CFG, CLASSIFIER], classifier_class="")
    assert any("needs a class" in note for note in no_class.notes)
    with pytest.raises(ValueError, match="embedded model only"):
        _compare(studio, steps=2, methods=[CLASSIFIER], classifier_class="food & drink")
    with pytest.raises(ValueError, match=r"Unknown guidance method.*'CFG\+\+'"):
        _compare(studio, methods=["CFG++"])
    with pytest.raises(ValueError, match="Tick at least one guidance method"):
        _compare(studio, methods=[])


class FakeClassifier:
    """∇log p(y|x_t) = a fixed field: enough for the guidance arithmetic, which is all this checks."""

    def __init__(self, gradient: torch.Tensor):
        self.gradient = gradient

    def log_prob_gradient(self, x_t, timestep, class_index):
        return self.gradient, torch.zeros(len(x_t))


def test_the_classifier_s_direction_is_what_the_denoiser_adds_and_is_drawn_beside_cfg_s():
    generator = torch.Generator().manual_seed(0)
    eps_cond, eps_uncond, gradient = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    request = Txt2ImgRequest(**SETTINGS, classifier_class="flags", classifier_scale=4.0)
    guided = eps_uncond + 5.0 * (eps_cond - eps_uncond)
    eps_hat, _ = classifier_guided(guided, eps_cond, 640.5, alphas_cumprod, FakeClassifier(gradient), 0, 4.0)
    prediction = NoisePrediction(eps_cond=eps_cond, eps_uncond=eps_uncond, eps_guided=eps_hat,
                                 classifier_gradient=gradient)
    directions = guidance_directions(CLASSIFIER, request, prediction, 640.5, alphas_cumprod)
    assert list(directions) == [CFG_DIRECTION, CLASSIFIER_DIRECTION, CLASSIFIER_GRADIENT]
    # ε̂ = ε_c + (w − 1)(ε_c − ε_u) + the classifier's term: what the Denoiser used, term by term
    torch.testing.assert_close(eps_hat - guided, directions[CLASSIFIER_DIRECTION])
    torch.testing.assert_close(directions[CLASSIFIER_GRADIENT], gradient)

    run = MethodRun(method=CLASSIFIER, request=request, timesteps=[640.5],
                    norms={name: [rms(direction)] for name, direction in directions.items()},
                    directions={0: directions}, cosines=[0.25], final_image=Image.new("RGB", (64, 64)))
    view = guidance_view(GuidanceComparison(seed=1, runs=[run], shown_calls=[0], held_out=[], held_out_about="",
                                            notes=[], latent_to_rgb=torch.eye(5, 3)))
    assert view.grid.width > 3 * 96 and len(view.figure.axes[0].get_lines()) == 2 + 1   # ∇log p is not plotted
    assert "no judge" in view.gallery[0][1]


def test_the_judge_s_class_is_matched_and_the_held_out_table_read_defensively(tmp_path):
    names = ["red apple", "waving hand", "dog face"]
    assert judge_class("Red Apple ", names) == "red apple"
    assert judge_class("waving hand, medium skin tone", names) == "waving hand"
    assert judge_class("a photo of a cat", names) is None and NO_JUDGE_CLASS == "prompt names no judge class"

    rows, about = read_held_out(tmp_path / "guidance-eval.json")
    assert rows == [] and "run `python -m bench.guidance`" in about
    (tmp_path / "guidance-eval.json").write_text(json.dumps({
        "command": "python -m bench.guidance", "prompts": 64, "fd_real_vs_real": 40.1,
        "methods": {"CFG": {"settings": {"guidance_scale": 7.5}, "top5": 0.77, "fd_vs_real": 31.6, "nfe_per_image": 50,
                            "time_vs_cfg": 1.0},
                    "PAG": {"settings": {"pag_scale": 3.0}, "top5": None, "fd_vs_real": 33.0, "nfe_per_image": 75,
                            "time_vs_cfg": 1.48, "per_prompt": [1, 2]}}}))
    rows, about = read_held_out(tmp_path / "guidance-eval.json")
    assert [row["method"] for row in rows] == ["CFG", "PAG"] and rows[1]["time_vs_cfg"] == 1.48
    assert rows[0]["settings"] == "guidance_scale=7.5" and "per_prompt" not in rows[1]
    assert "prompts: 64" in about and "fd_real_vs_real: 40.1" in about
    (tmp_path / "guidance-eval.json").write_text("{not json")
    assert "could not be read" in read_held_out(tmp_path / "guidance-eval.json")[1]


def test_a_direction_is_drawn_grey_at_zero_and_symmetric_about_it():
    matrix = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.3, 0.3, 0.3]])
    zero = np.asarray(direction_image(torch.zeros(1, 4, 8, 8), matrix))
    assert zero.shape == (96, 96, 3) and (zero == 128).all()
    direction = torch.zeros(1, 4, 8, 8)
    direction[0, 0, 0, 0] = 2.0                     # ε pushed up in channel 0 (red): x̂_0 goes down in red
    drawn = np.asarray(direction_image(direction, matrix))
    assert tuple(drawn[0, 0]) == (0, 128, 128) and tuple(drawn[-1, -1]) == (128, 128, 128)
    assert tuple(np.asarray(direction_image(direction, matrix, moves_image=True))[0, 0]) == (255, 128, 128)


def test_the_panel_builds_and_its_endpoint_answers(studio):
    import gradio as gr

    from pipelines.explorer.service import Explorer
    from studio.tabs.explorer_guidance import layout_guidance, wire_guidance

    with gr.Blocks() as blocks:
        panel = layout_guidance()
        wire_guidance(Explorer(studio.models), panel)
    endpoint = blocks.get_api_info()["named_endpoints"]["/compare_guidance"]
    names = [parameter["parameter_name"] for parameter in endpoint["parameters"]]
    assert names == ["prompt", "negative_prompt", "seed", "steps", "sampler", "guidance_scale", "methods", "pag_scale",
                     "cfg_start", "cfg_end", "classifier_class", "classifier_scale", "shown_calls"]
    assert [p["parameter_name"] for p in endpoint["parameters"] if not p["parameter_has_default"]] == ["prompt"]
    assert [value for _, value in panel.inputs["methods"].choices] == list(GUIDANCE_METHODS)
    (handler,) = [fn.fn for fn in blocks.fns.values() if fn.api_name == "compare_guidance"]
    shown = list(handler("red apple", steps=3, methods=[NONE, CFG, PAG], shown_calls=2))[-1]
    assert [caption.split(" · ")[0] for _, caption in shown[panel.gallery]] == [NONE, CFG, PAG]
    assert isinstance(shown[panel.plot], Figure) and isinstance(shown[panel.grid], Image.Image)
    assert shown[panel.status].startswith("Seed 1234 · 3 method(s) · 3 model calls each")
    assert set(shown[panel.numbers]["methods"]) == {NONE, CFG, PAG} and "bench.guidance" in shown[panel.held_out]
    with pytest.raises(gr.Error, match="Unknown guidance method"):
        list(handler("red apple", methods=["CFG++"]))
