"""The Diffusion Explorer's forward panel: your image noised in closed form at any t of several schedules,
DDPM's and flow matching's (side by side when one of each is ticked), in pixel space and in the loaded model's
latent space, with the schedule curves, the value histogram, a check that the Markov chain and the closed form
agree, and the x_0 -> x_T animation; also `/explorer_forward`, the same view for API clients.

The handlers build arguments, call the `Explorer` service (pipelines/explorer/service.py) and render what
comes back; the service does the math and picks the device thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from pipelines.explorer.formulas import FORMULAS, LATEX_DELIMITERS
from pipelines.explorer.forward import DEFAULT_NUM_STEPS, FLOW_MATCHING, MAX_NUM_STEPS, SCHEDULE_NAMES
from pipelines.explorer.plots import schedule_data
from pipelines.explorer.service import Explorer, ForwardView, MarkovCheck
from studio.errors import user_errors
from studio.tabs.explorer_shared import DEVICE_QUEUE, PIXELS, PRIVATE, formulas_markdown

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"


@dataclass
class ForwardTab:
    inputs: dict[str, gr.components.Component]  # Explorer.forward_view's arguments -> their controls
    pixel: gr.Image
    latent: gr.Image
    beside: gr.Image              # x_t by the other process, when a schedule of each is ticked
    caption: gr.Markdown
    plot: gr.Plot
    histogram: gr.Plot
    markov: gr.Button
    closed_mean: gr.Image
    chain_mean: gr.Image
    moments: gr.Markdown
    export_gif: gr.Button
    export_mp4: gr.Button
    animation: gr.File
    animation_shown: gr.Image     # the GIF, playing on the page

    @property
    def view(self) -> set:
        return {self.pixel, self.latent, self.beside, self.caption, self.plot, self.histogram}


def layout_forward() -> ForwardTab:
    gr.Markdown("Noise your own image: $x_t$ for any $t$, always with the same $\\varepsilon$, so only the "
                "schedule's coefficients ($\\sqrt{\\bar\\alpha_t}$ and $\\sqrt{1-\\bar\\alpha_t}$ for DDPM, $1-t$ and "
                "$t$ for flow matching) change as you move $t$.", latex_delimiters=LATEX_DELIMITERS)
    with gr.Row():
        with gr.Column(scale=2):
            examples = sorted(EXAMPLES_DIR.glob("*.png")) if EXAMPLES_DIR.is_dir() else []
            # opens on an example, so the view and the plots are there before anything is uploaded
            image = gr.Image(value=str(examples[0]) if examples else None, label="Your image", type="pil",
                             height=256, elem_id="explorer-forward-image", format="png")
            if examples:
                gr.Examples([[str(path)] for path in examples], inputs=[image], label="Example images")
            schedules = gr.CheckboxGroup(list(SCHEDULE_NAMES), value=["linear", "cosine"],
                                         label="Schedules (the first checked one noises the image)",
                                         info="flow matching: x_t = (1 − t)·x_0 + t·ε (SD 3, Flux, Sana). "
                                              "model: the loaded model's own schedule (its betas, or for a "
                                              "flow-matching model its shifted flow). Tick a DDPM schedule and "
                                              "a flow one to see both side by side.",
                                         elem_id="explorer-forward-schedules")
            num_steps = gr.Slider(10, MAX_NUM_STEPS, value=DEFAULT_NUM_STEPS, step=1, precision=0,
                                  label="T", elem_id="explorer-forward-T")
            t = gr.Slider(0, DEFAULT_NUM_STEPS - 1, value=250, step=1, precision=0, label="t",
                          elem_id="explorer-forward-t")
            seed = gr.Number(value=0, precision=0, label="Noise seed (the fixed ε)")
        with gr.Column(scale=3):
            with gr.Row():
                pixel = gr.Image(label="x_t in pixel space", interactive=False, height=256,
                                 elem_id="explorer-forward-pixel", **PIXELS)
                latent = gr.Image(label="x_t in latent space (decoded by the model's VAE)", interactive=False,
                                  height=256, elem_id="explorer-forward-latent", **PIXELS)
                beside = gr.Image(label="x_t by the other process", interactive=False, height=256, visible=False,
                                  elem_id="explorer-forward-beside", **PIXELS)
            caption = gr.Markdown(label="Caption", elem_id="explorer-forward-caption")
            formulas_markdown(FORMULAS)
    plot = gr.Plot(label="Schedules", elem_id="explorer-forward-plot")
    histogram = gr.Plot(label="Values of x_t against theory", elem_id="explorer-forward-histogram")
    with gr.Row():
        markov = gr.Button("Markov chain vs closed form", elem_id="explorer-forward-markov")
        export_gif = gr.Button("Export GIF", elem_id="explorer-forward-gif")
        export_mp4 = gr.Button("Export MP4", elem_id="explorer-forward-mp4")
    with gr.Row():
        closed_mean = gr.Image(label="Mean over draws: closed form", interactive=False, height=200, **PIXELS)
        chain_mean = gr.Image(label="Mean over draws: Markov chain", interactive=False, height=200, **PIXELS)
    # its own row: beside the two images its columns were too narrow for their headers ("in theor / y")
    moments = gr.Markdown(elem_id="explorer-forward-moments")
    with gr.Row():
        animation_shown = gr.Image(label="The GIF", interactive=False, height=256, elem_id="explorer-forward-gif-shown")
        animation = gr.File(label="Animation (download)", elem_id="explorer-forward-file")
    return ForwardTab(inputs={"image": image, "schedule_names": schedules, "num_steps": num_steps, "t": t,
                              "seed": seed},
                      pixel=pixel, latent=latent, beside=beside, caption=caption, plot=plot, histogram=histogram,
                      markov=markov, closed_mean=closed_mean, chain_mean=chain_mean, moments=moments,
                      export_gif=export_gif, export_mp4=export_mp4, animation=animation,
                      animation_shown=animation_shown)


def forward_handler(explorer: Explorer, tab: ForwardTab):
    @user_errors
    def show_forward(image, **settings) -> dict:
        if image is None:
            return {tab.pixel: None, tab.latent: None, tab.beside: gr.update(value=None, visible=False),
                    tab.plot: None, tab.histogram: None,
                    tab.caption: "Upload an image (or pick an example) to noise it."}
        view = explorer.forward_view(image, **settings)
        return {tab.plot: view.schedule_figure, tab.histogram: view.histogram, tab.caption: view.caption} | \
            _labelled_images(tab, view)
    return show_forward


def _labelled_images(tab: ForwardTab, view: ForwardView) -> dict:
    """The pictures, each labelled with the process it shows; the other process's only when it was ticked."""
    # gr.update, not gr.Image(...): the value then goes through the shown component, as a PNG (a new component
    # would encode it with its own default format, lossy WebP)
    beside = view.beside
    return {tab.pixel: gr.update(value=view.x_t, label=f"x_t in pixel space: {view.process}"),
            tab.latent: gr.update(value=view.latent_x_t,
                                  label=f"x_t in latent space: {view.process} (decoded by the model's VAE)"),
            tab.beside: gr.update(value=None, visible=False) if beside is None else
            gr.update(value=beside.x_t, visible=True, label=f"x_t in pixel space: {beside.process}" + (
                "" if beside.schedule_name == beside.process else f" ({beside.schedule_name})"))}


def wire_forward(explorer: Explorer, tab: ForwardTab) -> None:
    """The view follows every control; the Markov check and the exports run on their buttons."""
    _wire_view(explorer, tab)
    _wire_forward_api(explorer, tab)
    _wire_markov(explorer, tab)
    _wire_forward_export(explorer, tab)


def _wire_view(explorer: Explorer, tab: ForwardTab) -> None:
    controls = tab.inputs
    show_forward = forward_handler(explorer, tab)

    # `change` (typing a number and Enter, arrow keys, dragging) rather than `release` (the mouse alone);
    # while dragging only the latest value is rendered
    for trigger in (controls["image"].change, controls["schedule_names"].change, controls["num_steps"].change,
                    controls["t"].change, controls["seed"].change):
        trigger(show_forward, inputs_kwargs=controls, outputs=tab.view, trigger_mode="always_last", **PRIVATE,
                **DEVICE_QUEUE)

    def t_range(num_steps, t) -> dict:
        last = int(num_steps) - 1
        return {controls["t"]: gr.Slider(maximum=last, value=min(int(t), last))}

    controls["num_steps"].change(t_range, inputs_kwargs={"num_steps": controls["num_steps"], "t": controls["t"]},
                                 outputs={controls["t"]}, trigger_mode="always_last", **PRIVATE)


def _wire_forward_api(explorer: Explorer, tab: ForwardTab) -> None:
    """`/explorer_forward`: an image noised to x_t by the closed form, and the numbers behind the plots."""
    data = gr.JSON(visible=False, label="Schedules: beta_t, abar_t, log-SNR per t; the coefficients at t")

    @user_errors
    def explorer_forward(image, schedule: str = "linear", T: int = DEFAULT_NUM_STEPS, t: int = 250,
                         seed: int = 0):
        if image is None:
            raise ValueError("`image` is required: the image to noise.")
        T, t, seed = int(T), int(t), int(seed)
        view = explorer.forward_view(image, schedule_names=[schedule], num_steps=T, t=t, seed=seed)
        numbers = schedule_data(explorer.schedules([schedule], T), t=min(t, T - 1))
        return view.x_t, view.latent_x_t, view.caption, numbers

    inputs = {"image": tab.inputs["image"], "schedule": gr.Dropdown(list(SCHEDULE_NAMES), value="linear",
                                                                      visible=False, label="Schedule"),
              "T": tab.inputs["num_steps"], "t": tab.inputs["t"], "seed": tab.inputs["seed"]}
    gr.Button(visible=False).click(explorer_forward, inputs=list(inputs.values()),
                                   outputs=[tab.pixel, tab.latent, tab.caption, data], api_name="explorer_forward",
                                   **DEVICE_QUEUE)


def _wire_markov(explorer: Explorer, tab: ForwardTab) -> None:
    @user_errors
    def markov_vs_closed_form(**values) -> dict:
        check = explorer.markov_check(**values)
        return {tab.closed_mean: check.closed_form.mean_image, tab.chain_mean: check.markov_chain.mean_image,
                tab.moments: _moments_table(check)}

    tab.markov.click(markov_vs_closed_form, inputs_kwargs=tab.inputs,
                     outputs={tab.closed_mean, tab.chain_mean, tab.moments}, **PRIVATE)


def _moments_table(check: MarkovCheck) -> str:
    closed, chain = check.closed_form, check.markov_chain
    if check.process == FLOW_MATCHING:
        where, signal = f"flow matching, step {check.t} (t = {check.noise:.4g})", "(1 − t)·x₀"
    else:
        where, signal = f"t = {check.t}", "√ᾱ·x₀"
    return (f"{check.draws} draws of a {check.side_px}-px copy, {where}\n\n"
            "| | closed form | Markov chain | in theory |\n|:--|--:|--:|--:|\n"
            f"| mean \\|mean − {signal}\\| | {closed.mean_error:.4f} | {chain.mean_error:.4f} | 0 |\n"
            f"| mean variance | {closed.variance:.4f} | {chain.variance:.4f} | {check.theory_variance:.4f} |")


def _wire_forward_export(explorer: Explorer, tab: ForwardTab) -> None:
    inputs = {name: control for name, control in tab.inputs.items() if name != "t"}

    def exporter(suffix: str) -> Callable[..., dict]:
        @user_errors
        def export_forward(**values) -> dict:
            path = str(explorer.export_forward(**values, suffix=suffix))
            return {tab.animation: path} | ({tab.animation_shown: path} if suffix == ".gif" else {})
        return export_forward

    for button, suffix in ((tab.export_gif, ".gif"), (tab.export_mp4, ".mp4")):
        button.click(exporter(suffix), inputs_kwargs=inputs, outputs={tab.animation, tab.animation_shown}, **PRIVATE)
