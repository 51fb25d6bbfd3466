"""UI helpers that need no browser: restoring settings from infotexts, requests from controls, the error boundary."""

from __future__ import annotations

import gradio as gr
import pytest

from studio.errors import user_errors
from pipelines.core.guidance import GUIDANCE_FIELDS
from studio.tabs.generate import request_from_controls, settings_from_infotext

A1111 = ("a castle on a hill, sunset\nNegative prompt: blurry, lowres\n"
         "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3456, Size: 512x768, "
         "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    """What the tabs are built on, without a model."""
    from pipelines.generation.generator import Generator
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from studio.context import StudioContext

    folder = tmp_path_factory.mktemp("ui")
    models = ModelManager(MemoryManager(device="cpu"), models_dir=folder / "models")
    return StudioContext(models=models, generator=Generator(models, None), outputs_dir=folder)


@pytest.fixture(scope="module")
def blocks_and_tabs(context):
    """The generation tabs, built without a model, and the Blocks that holds them."""
    from studio.tabs.img2img import build_img2img_tab
    from studio.tabs.inpaint import build_inpaint_tab
    from studio.tabs.txt2img import build_txt2img_tab

    with gr.Blocks() as demo:
        tabs = build_txt2img_tab(context, {}), build_img2img_tab(context, {}), build_inpaint_tab(context, {})
    return demo, tabs


@pytest.fixture(scope="module")
def tabs(blocks_and_tabs):
    return blocks_and_tabs[1]


def test_a1111_infotext_restores_into_the_tab_controls_by_name(tabs):
    txt2img, img2img, inpaint = tabs
    restored = settings_from_infotext(A1111, txt2img)
    by_name = {name: restored[component] for name, component in txt2img.controls.items() if component in restored}
    off = {"guidance_rescale": 0.0, "cfg_method": "CFG", "cfg_start": 0.0, "cfg_end": 1.0, "pag_scale": 0.0,
           "pag_adaptive_scale": 0.0, "pag_layers": "mid", "classifier_class": "", "classifier_scale": 0.0,
           "schedule": "Default", "fast": False,   # left out of an infotext: off when the image was made
           "distilled_guidance": 3.5}              # (Flux's: its default where the image did not say)
    assert by_name == {"prompt": "a castle on a hill, sunset", "negative_prompt": "blurry, lowres",
                       "sampler": "DPM++ 2M Karras", "steps": 30, "guidance_scale": 6.5,
                       "width": 512, "height": 768, "seed": 3456} | off
    with_strength = settings_from_infotext(A1111 + ", Denoising strength: 0.4", img2img)
    assert with_strength[img2img.controls["strength"]] == 0.4
    assert "strength" not in {name for name, c in txt2img.controls.items()
                              if c in settings_from_infotext(A1111 + ", Denoising strength: 0.4", txt2img)}


@pytest.mark.parametrize("tab_index", [0, 2])
def test_guidance_settings_restore_into_every_generation_tab(tabs, tab_index):
    tab = tabs[tab_index]
    text = ("red apple\nSteps: 10, Sampler: Euler, Schedule type: Align Your Steps, CFG scale: 5, Seed: 3, "
            "Size: 64x64, CFG method: ICG, CFG interval start: 0.2, CFG interval end: 0.8, PAG scale: 3, "
            "PAG adaptive scale: 0.002, PAG layers: \"mid, up_blocks.1\", Classifier guidance class: flags, "
            "Classifier guidance scale: 4")
    restored = settings_from_infotext(text, tab)
    by_name = {name: restored[component] for name, component in tab.controls.items() if component in restored}
    assert {key: by_name[key] for key in ("sampler", "schedule", "cfg_method", "cfg_start", "cfg_end", "pag_scale",
                                          "pag_adaptive_scale", "pag_layers", "classifier_scale")} == {
        "sampler": "Euler", "schedule": "Align Your Steps", "cfg_method": "ICG", "cfg_start": 0.2, "cfg_end": 0.8,
        "pag_scale": 3.0, "pag_adaptive_scale": 0.002, "pag_layers": "mid, up_blocks.1", "classifier_scale": 4.0}


def test_a1111_inpainting_keys_restore_into_the_inpainting_tab(tabs):
    inpaint = tabs[2]
    text = A1111 + (", Denoising strength: 0.55, Mask blur: 9, Mask mode: Inpaint not masked, Masked content: "
                    "latent noise, Inpaint area: Only masked, Masked area padding: 48, Soft inpainting enabled: True")
    restored = settings_from_infotext(text, inpaint)
    by_name = {name: restored[component] for name, component in inpaint.controls.items() if component in restored}
    assert {key: by_name[key] for key in ("strength", "mask_blur", "mask_mode", "masked_content", "inpaint_area",
                                          "only_masked_padding", "soft_inpainting")} == {
        "strength": 0.55, "mask_blur": 9, "mask_mode": "Inpaint not masked", "masked_content": "latent noise",
        "inpaint_area": "Only masked", "only_masked_padding": 48, "soft_inpainting": True}


def test_a_restored_value_the_request_takes_but_the_slider_does_not_is_moved_onto_the_slider(tabs, monkeypatch):
    """A1111 runs CFG 25 and 100×100 px; a request takes them, the page's sliders (CFG 1-20, sizes 64 and up in
    steps of 8) would refuse the next Generate. They are moved onto the sliders, and the user is told."""
    from studio.tabs import generate

    warnings = []
    monkeypatch.setattr(generate.gr, "Warning", warnings.append)
    txt2img = tabs[0]
    text = A1111.replace("CFG scale: 6.5", "CFG scale: 25").replace("Size: 512x768", "Size: 100x16")
    restored = settings_from_infotext(text, txt2img)
    by_name = {name: restored[component] for name, component in txt2img.controls.items() if component in restored}
    assert (by_name["guidance_scale"], by_name["width"], by_name["height"]) == (20, 96, 64)
    assert any("CFG scale: 25 is not on this tab's slider (1 to 20); restored as 20." in w for w in warnings)
    request_from_controls("txt2img", by_name)      # the next Generate takes them


def test_the_sampler_menu_and_the_speculative_controls_come_from_the_tasks_registry_entry(context, tabs, monkeypatch):
    """Bug 14: the tab chose its sampler menu and the speculative controls by `task == "txt2img"`. A task whose
    registry entry lists the speculative sampler gets both, whatever its name; one that does not, neither."""
    from dataclasses import dataclass
    from typing import ClassVar

    from pipelines.core.registry import Task
    from pipelines.core.samplers import SAMPLER_NAMES, SPECULATIVE_SAMPLER, STEPWISE_SAMPLER_NAMES
    from pipelines.tasks import TASKS
    from pipelines.tasks.txt2img import Txt2ImgRequest
    from studio.tabs.generate import build_generation_tab

    @dataclass(kw_only=True)
    class SketchRequest(Txt2ImgRequest):
        task: ClassVar[str] = "sketch"

    monkeypatch.setitem(TASKS, "sketch", Task("sketch", "Sketch", SketchRequest, lambda base: base,
                                              samplers=SAMPLER_NAMES))
    with gr.Blocks():
        sketch = build_generation_tab(context, "sketch", {"sampler": SPECULATIVE_SAMPLER})
    menus = {tab.task: [value for _, value in tab.controls["sampler"].choices] for tab in (sketch, *tabs)}
    assert menus == {"sketch": list(SAMPLER_NAMES), "txt2img": list(SAMPLER_NAMES),
                     "img2img": list(STEPWISE_SAMPLER_NAMES), "inpaint": list(STEPWISE_SAMPLER_NAMES)}
    speculative = {tab.task: [name for name in ("draft", "draft_length") if name in tab.controls]
                   for tab in (sketch, *tabs)}
    assert speculative == {"sketch": ["draft", "draft_length"], "txt2img": ["draft", "draft_length"],
                           "img2img": [], "inpaint": []}
    assert sketch.controls["draft"].parent.visible       # shown: the tab opens on the speculative sampler


def test_with_auth_a_job_belongs_to_the_user_in_every_session_and_browser(context):
    """Bug 11: with --auth a job is the logged-in user's, whichever page or browser of theirs asks; another user's
    request is refused."""
    from studio.context import OWNER_COOKIE, session_of

    first_page = gr.Request(username="ada", session_hash="page-1", cookies={OWNER_COOKIE: "laptop"})
    other_browser = gr.Request(username="ada", session_hash="page-2", cookies={OWNER_COOKIE: "phone"})
    someone_else = gr.Request(username="eve", session_hash="page-3", cookies={OWNER_COOKIE: "laptop"})
    job = context.worker.submit(lambda job: job.stop.is_set(), kind="txt2img", owner=session_of(first_page))
    job.result(30)
    assert context.owned_job(job.id, other_browser) is job
    with pytest.raises(gr.Error, match=f"Job {job.id!r} belongs to another session"):
        context.owned_job(job.id, someone_else)
    assert context.owned_job("no-such-job", someone_else) is None


def test_text_without_parameters_is_refused_clearly(tabs):
    with pytest.raises(gr.Error, match="no `Steps"):
        settings_from_infotext("just a prompt", tabs[0])


def test_requests_are_built_from_controls_by_field_name():
    from PIL import Image

    from pipelines.tasks.img2img import Img2ImgRequest
    from pipelines.tasks.txt2img import Txt2ImgRequest

    request = request_from_controls("txt2img", {"prompt": "red apple", "steps": 12.0, "guidance_scale": 6,
                                                "seed": None, "width": 64.0})
    assert isinstance(request, Txt2ImgRequest)
    assert (request.steps, request.guidance_scale, request.seed, request.width) == (12, 6.0, -1, 64)
    assert isinstance(request.steps, int) and isinstance(request.guidance_scale, float)
    image = Image.new("RGB", (64, 64))
    assert isinstance(request_from_controls("img2img", {"prompt": "", "init_image": image, "strength": 0.3}),
                      Img2ImgRequest)
    with pytest.raises(ValueError, match="`steps` must be a whole number but is 12.5"):
        request_from_controls("txt2img", {"prompt": "x", "steps": 12.5})
    with pytest.raises(ValueError, match="`seed` must be a whole number but is 'abc'"):
        request_from_controls("txt2img", {"prompt": "x", "seed": "abc"})
    with pytest.raises(ValueError, match="needs an input image"):
        request_from_controls("img2img", {"prompt": "x", "init_image": None})
    with pytest.raises(ValueError, match="has no setting `strength`"):
        request_from_controls("txt2img", {"prompt": "x", "strength": 0.5})


def test_error_boundary_turns_bad_input_into_gr_error_and_keeps_generators_streaming():
    @user_errors
    def handler(value):
        if value < 0:
            raise ValueError(f"`value` must be positive but is {value}.")
        return value

    @user_errors
    def streaming(count):
        yield from range(count)
        raise RuntimeError("disk on fire")

    assert handler(2) == 2
    with pytest.raises(gr.Error, match="must be positive but is -1"):
        handler(-1)
    stream = streaming(2)
    assert [next(stream), next(stream)] == [0, 1]
    with pytest.raises(gr.Error, match="Unexpected error \\(RuntimeError: disk on fire\\).*still running"):
        next(stream)


# ----------------------------------------------------------------------------- the assembled app


@pytest.fixture
def app_on_tiny(studio, tmp_path):
    """The whole app around the `studio` fixture's tiny model, and its context."""
    from studio.app import build_app
    from studio.context import StudioContext

    context = StudioContext(models=studio.models, generator=studio, outputs_dir=tmp_path / "outputs",
                            startup_error="")
    return build_app(context), context


def handler(app, name: str):
    (found,) = [block_fn.fn for block_fn in app.fns.values() if block_fn.name == name]
    return found


def test_what_one_user_does_is_not_the_header_every_user_reads(app_on_tiny):
    app, context = app_on_tiny
    context.startup_error = "The model named at launch could not be loaded."
    handler(app, "load_model")("embedded", "")
    assert "could not be loaded" not in context.status_markdown()      # loading a model ends the startup note
    handler(app, "unload_model")()
    header = context.status_markdown()
    assert header.startswith("**No model loaded.** Load one in")       # no other user's action in it


def test_after_a_model_loads_the_tabs_start_from_its_native_size(app_on_tiny, tiny_model_dir):
    from recipe.tiny import build_tiny_pipeline

    app, context = app_on_tiny
    bigger = build_tiny_pipeline(tiny_model_dir.parent / "bigger")
    bigger.unet.register_to_config(sample_size=32)                    # 32 latent px × VAE factor 4 = 128 px
    context.models.adopt(bigger, context.models.current.source)
    updates = handler(app, "refresh")()
    widths = {getattr(value, "value", value) for component, value in updates.items()
              if getattr(component, "label", "") == "Width"}
    assert widths == {128}                                    # in Text-to-Image, Image-to-Image and Inpainting
    sizes = {value for component, value in updates.items() if getattr(component, "label", "") == "Size (px)"}
    assert sizes == {128}                                     # and the explorer


def test_speculative_settings_restore_and_come_last_in_the_api(tabs):
    txt2img = tabs[0]
    # positional API callers keep their order: the speculative sampler's settings, then what came after them
    names = list(txt2img.controls)
    assert names[-4 - len(GUIDANCE_FIELDS):] == ["draft", "draft_length", *GUIDANCE_FIELDS, "fast",
                                                 "distilled_guidance"]
    assert names[:12] == ["prompt", "negative_prompt", "sampler", "steps", "guidance_scale", "guidance_rescale",
                          "width", "height", "seed", "batch_size", "batch_count", "preview_every"]
    text = ("red apple\nSteps: 100, Sampler: DDPM speculative, CFG scale: 7.5, Seed: 3, Size: 64x64, "
            "Draft: draft model, Draft length: 8, Target calls: 41, Draft acceptance: 0.640")
    restored = settings_from_infotext(text, txt2img)
    by_name = {name: restored[component] for name, component in txt2img.controls.items() if component in restored}
    assert (by_name["sampler"], by_name["draft"], by_name["draft_length"]) == ("DDPM speculative", "draft model", 8)
    assert by_name["fast"] is False     # an infotext never says Fast (its request is written out): restored as off


def test_every_generation_endpoint_takes_the_guidance_fields_last(blocks_and_tabs):
    """Positional API callers keep their order: what came later (guidance, schedule) follows every parameter an
    endpoint took before, the outpainting sides included."""
    endpoints = blocks_and_tabs[0].get_api_info()["named_endpoints"]
    for name in ("/txt2img", "/img2img", "/inpaint", "/outpaint"):
        parameters = [parameter["parameter_name"] for parameter in endpoints[name]["parameters"]]
        later = [*GUIDANCE_FIELDS, "fast"] if "fast" in parameters else list(GUIDANCE_FIELDS)   # then Fast (4 steps)
        later.append("distilled_guidance")     # then Flux's distilled guidance
        assert parameters[-len(later):] == later, name


def test_a_page_load_leaves_the_explorer_alone_and_its_forward_view_is_drawn_when_shown(app_on_tiny):
    """Each page's load reads the header and resumes its tabs' jobs; the explorer's forward view (its plots and a VAE
    pass, most of a second of the device thread's CPU) is drawn when the Diffusion Explorer tab is shown."""
    app, _ = app_on_tiny
    on_load = [fn for fn in app.fns.values() if any(event == "load" for _, event in fn.targets)]
    assert on_load and not [fn.name for fn in on_load
                            if any(str(getattr(block, "elem_id", "")).startswith("explorer") for block in fn.outputs)]
    (forward,) = [fn for fn in app.fns.values() if fn.name == "show_forward"
                  and any(event == "select" for _, event in fn.targets)]
    assert [app.blocks[block].label for block, _ in forward.targets] == ["Diffusion Explorer"]
    assert "explorer-forward-pixel" in [block.elem_id for block in forward.outputs]


def test_after_an_edm_model_loads_each_menu_holds_only_its_samplers(app_on_tiny, tiny_model_dir):
    """An SDXL model of the EDM formulation (Playground v2.5's layout) runs two samplers: the generation tabs' menus
    and the explorer's hold those alone, on the model's own, as the page's refresh after a load sets them."""
    from pipelines.models.sources import ModelSource
    from recipe.tiny import build_tiny_playground_pipeline

    app, context = app_on_tiny
    before = context.models.current
    context.models.adopt(build_tiny_playground_pipeline(tiny_model_dir.parent / "playground"),
                         ModelSource("folder", str(tiny_model_dir.parent / "playground"), "tiny-playground"))
    try:
        updates = handler(app, "refresh")()
    finally:
        context.models.adopt(before.pipeline, before.source)
    menus = [(component.elem_id, [value for _, value in update.choices], update.value)
             for component, update in updates.items() if getattr(component, "label", "") == "Sampler"]
    assert len(menus) == 5 and "explorer-sampler" in [elem_id for elem_id, _, _ in menus]  # 4 tabs and the explorer
    assert {(tuple(choices), value) for _, choices, value in menus} == {(("Euler", "DPM++ 2M Karras"),
                                                                         "DPM++ 2M Karras")}
