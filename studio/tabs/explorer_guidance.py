"""The Diffusion Explorer's guidance panel: one seed under each guidance method (none, CFG, the guidance interval,
ICG, PAG, classifier guidance), with what each method adds to the noise prediction at every model call, as a plot
of its size and as images at a few calls, and the final images with the emoji judge's numbers; also
`/compare_guidance`, the same for API clients, with the numbers behind the plot.

The handler calls the `Explorer` service (pipelines/explorer/service.py: guidance.py runs, guidance_view.py draws)
and renders what comes back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from pipelines.core.checks import MAX_CLASSIFIER_SCALE, MAX_GUIDANCE_SCALE, MAX_PAG_SCALE, MAX_STEPS
from pipelines.core.samplers import DEFAULT_SAMPLER, STEPWISE_SAMPLER_NAMES
from pipelines.explorer.guidance import (CFG, CFG_PAG, CLASSIFIER, DEFAULT_CLASSIFIER_SCALE, DEFAULT_INTERVAL,
                                         DEFAULT_PAG_SCALE, DEFAULT_SHOWN_CALLS, GUIDANCE_METHODS, ICG, INTERVAL,
                                         MAX_SHOWN_CALLS, NONE)
from pipelines.explorer.service import Explorer
from pipelines.guidance.classifier import classifier_class_names
from studio.context import session_of
from studio.errors import user_errors
from studio.tabs.explorer_shared import DEVICE_QUEUE, follow

EXAMPLE_PROMPT, DEFAULT_SEED, DEFAULT_STEPS, DEFAULT_CFG = "red apple", 1234, 25, 7.5
NUMBERS_LABEL = "Per method: RMS of each guidance direction at each model call, the judge's numbers"
INTRO = """What each method adds to ε_c, the model's prediction for the prompt, at every model call, run on one seed:
**CFG** w(ε_c − ε_u) · **CFG + interval** the same inside [start, end) of the steps, nothing outside ·
**ICG** w(ε_c − ε(ĉ)), ĉ a random prompt in place of the negative one · **PAG** s(ε_c − ε̃_c), ε̃_c with
self-attention set to the identity · **classifier** −√(1−ᾱ_t)·s·∇log p(y|x_t), drawn beside ε_c − ε_u (which CFG
reads as an implicit classifier's −√(1−ᾱ_t)·∇log p(c|x_t)) · **none**: CFG 1, ε_c alone. The final images are
scored by the emoji judge; the size is the model's own."""


@dataclass
class GuidancePanel:
    inputs: dict[str, gr.components.Component]   # /compare_guidance's parameters -> their controls
    button: gr.Button
    status: gr.Markdown
    gallery: gr.Gallery
    plot: gr.Plot
    grid: gr.Image
    run_table: gr.Markdown
    held_out: gr.Markdown
    notes: gr.Markdown
    numbers: gr.JSON

    @property
    def outputs(self) -> list:
        return [self.gallery, self.plot, self.grid, self.run_table, self.held_out, self.notes, self.numbers,
                self.status]


def default_methods(classes: list[str]) -> list[str]:
    """What the panel runs unless told otherwise: the baseline, CFG and three changes to it, and classifier
    guidance where a classifier is installed."""
    return [NONE, CFG, INTERVAL, ICG, CFG_PAG, *([CLASSIFIER] if classes else [])]


def layout_guidance() -> GuidancePanel:
    classes = classifier_class_names()
    gr.Markdown(INTRO)
    inputs: dict[str, gr.components.Component] = {}
    with gr.Row():
        inputs["prompt"] = gr.Textbox(label="Prompt", placeholder=f"e.g. {EXAMPLE_PROMPT}",
                                      info="a base emoji's name gets the judge's rank of it",
                                      elem_id="explorer-guidance-prompt")
        inputs["negative_prompt"] = gr.Textbox(label="Negative prompt", info="ε_u's prompt (ICG replaces it)")
    with gr.Row():
        inputs["seed"] = gr.Number(value=DEFAULT_SEED, precision=0, label="Seed", info="-1: draw one")
        inputs["steps"] = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, precision=0, label="Steps",
                                    elem_id="explorer-guidance-steps")
        inputs["sampler"] = gr.Dropdown(list(STEPWISE_SAMPLER_NAMES), value=DEFAULT_SAMPLER, label="Sampler")
        inputs["guidance_scale"] = gr.Slider(0.0, MAX_GUIDANCE_SCALE, value=DEFAULT_CFG, step=0.5,
                                             label="CFG scale w")
    inputs["methods"] = gr.CheckboxGroup(list(GUIDANCE_METHODS), value=default_methods(classes), label="Methods",
                                         elem_id="explorer-guidance-methods")
    with gr.Row():
        inputs["pag_scale"] = gr.Slider(0.0, MAX_PAG_SCALE, value=DEFAULT_PAG_SCALE, step=0.1, label="PAG scale s",
                                        info="on the mid block's self-attention")
        inputs["cfg_start"] = gr.Slider(0.0, 1.0, value=DEFAULT_INTERVAL[0], step=0.05, label="Interval from",
                                        info="share of the steps")
        inputs["cfg_end"] = gr.Slider(0.0, 1.0, value=DEFAULT_INTERVAL[1], step=0.05, label="Interval until")
    with gr.Row():
        inputs["classifier_class"] = gr.Dropdown(
            classes or [""], value=classes[0] if classes else "", label="Classifier guidance: class",
            info="a class of the model's noise-aware classifier" if classes else "no guidance classifier is installed",
            interactive=bool(classes))
        inputs["classifier_scale"] = gr.Slider(0.0, MAX_CLASSIFIER_SCALE, value=DEFAULT_CLASSIFIER_SCALE, step=0.5,
                                               label="Classifier scale s")
        inputs["shown_calls"] = gr.Slider(1, MAX_SHOWN_CALLS, value=DEFAULT_SHOWN_CALLS, step=1, precision=0,
                                          label="Model calls drawn", info="spread from the first to the last")
        button = gr.Button("Compare guidance", variant="primary", elem_id="explorer-guidance-run")
    status = gr.Markdown(label="Status", elem_id="explorer-guidance-status")
    gallery = gr.Gallery(label="Final images: method · the judge's numbers", columns=6, height="auto",
                         object_fit="contain", elem_classes=["studio-pixels"], format="png",
                         elem_id="explorer-guidance-gallery")
    run_table = gr.Markdown(label="This run, per method", elem_id="explorer-guidance-table")
    plot = gr.Plot(label="RMS of each guidance direction per model call", elem_id="explorer-guidance-plot")
    grid = gr.Image(label="Guidance directions: a row per method, a column per model call drawn", interactive=False,
                    format="png", elem_id="explorer-guidance-grid")
    held_out = gr.Markdown(label="Held out: bench/guidance.py's figures", elem_id="explorer-guidance-held-out")
    notes = gr.Markdown(label="Notes", elem_id="explorer-guidance-notes")
    numbers = gr.JSON(label=NUMBERS_LABEL, visible=False)
    return GuidancePanel(inputs=inputs, button=button, status=status, gallery=gallery, plot=plot, grid=grid,
                         run_table=run_table, held_out=held_out, notes=notes, numbers=numbers)


def wire_guidance(explorer: Explorer, panel: GuidancePanel) -> None:
    """Run compares the ticked methods; `/compare_guidance` serves API clients (only the prompt is required)."""

    @user_errors
    def compare_guidance(prompt: str, negative_prompt: str | None = None, seed: int | None = DEFAULT_SEED,
                         steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER,
                         guidance_scale: float = DEFAULT_CFG, methods: list[str] | None = None,
                         pag_scale: float = DEFAULT_PAG_SCALE, cfg_start: float = DEFAULT_INTERVAL[0],
                         cfg_end: float = DEFAULT_INTERVAL[1], classifier_class: str | None = None,
                         classifier_scale: float = DEFAULT_CLASSIFIER_SCALE, shown_calls: int = DEFAULT_SHOWN_CALLS,
                         request: gr.Request = None) -> Iterator[dict]:
        classes = classifier_class_names()
        job = explorer.guidance(
            prompt=prompt or "", negative_prompt=negative_prompt or "", seed=-1 if seed is None else int(seed),
            steps=int(steps), sampler=sampler, guidance_scale=float(guidance_scale),
            methods=default_methods(classes) if methods is None else list(methods), pag_scale=float(pag_scale),
            cfg_start=float(cfg_start), cfg_end=float(cfg_end),
            classifier_class=(classes[0] if classes else "") if classifier_class is None else classifier_class,
            classifier_scale=float(classifier_scale), shown_calls=int(shown_calls), owner=session_of(request))
        view = yield from follow(job, panel.status, "Model call {done} of {total} done…")
        if view is None:
            return
        comparison = view.comparison
        status = f"Seed {comparison.seed} · {len(comparison.runs)} method(s) · " + \
            (f"{len(comparison.runs[0].timesteps)} model calls each" if comparison.runs else "")
        yield {panel.gallery: view.gallery, panel.plot: view.figure, panel.grid: view.grid,
               panel.run_table: view.run_table, panel.held_out: view.held_out_table, panel.notes: view.notes,
               panel.numbers: comparison.numbers(), panel.status: status}

    panel.button.click(compare_guidance, inputs_kwargs=panel.inputs, outputs=panel.outputs,
                       api_name="compare_guidance", **DEVICE_QUEUE)
