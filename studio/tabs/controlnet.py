"""ControlNet: steer the layout with up to three units, each a control image (uploaded or drawn on the sketch
pad), a preprocessor with a preview, a ControlNet and sd-webui-controlnet's settings.

The API (`/controlnet`) takes the first unit's settings as fields of their own (`control_image`,
`preprocessor`, `model`, `weight`, `start`, `end`, `control_mode`, `resize_mode`, …) and further units as a
JSON list (`more_units`). The page builds those fields from the unit panels. The Control X-ray shows where,
step by step, the units' residuals pushed the UNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from pipelines.core.checks import MAX_CONTROL_WEIGHT as MAX_WEIGHT
from pipelines.models.controlnets import available_controlnets
from pipelines.tasks.control_units import (CONTROL_MODES, CROP_AND_RESIZE, DEFAULT_CONTROLNET, MAX_UNITS, RESIZE_MODES,
                                           UNIT_FIELDS, ControlUnit)
from pipelines.tasks.control_xray import ALL_STEPS_SCALE, CHANGE, STEP_SCALE, control_xray
from pipelines.tasks.preprocessors import PREPROCESSORS
from studio.context import StudioContext
from studio.errors import user_errors
from studio.tabs.generate import GenerationTab, TaskControls, build_generation_tab, request_from_controls

# The preprocessor a model's control images come from (picking the model picks it)
PAIRED_PREPROCESSOR = {"canny": "canny", "scribble": "invert", "colour": "colour grid", "color": "colour grid",
                       "lineart": "lineart standard", "shuffle": "content shuffle", "hed": "hed", "depth": "midas depth",
                       "openpose": "openpose", "mlsd": "mlsd", "normal": "normal bae"}


XRAY_SCALES = [("This step's own scale", STEP_SCALE), ("One scale for all steps", ALL_STEPS_SCALE),
               ("Change from the previous step", CHANGE)]
UPLOAD, DRAW = "upload", "draw"     # a unit's sub-tabs, one of which holds its control image


def paired_preprocessor(model: str | None) -> str | None:
    name = (model or "").lower()
    return next((preprocessor for key, preprocessor in PAIRED_PREPROCESSOR.items() if key in name), None)


def sketch_image(value) -> Image.Image | None:
    """A sketch pad's drawing on white (None when nothing is drawn)."""
    if not value:
        return None
    layers = [layer for layer in (value.get("layers") or []) if layer is not None]
    composite = value.get("composite")
    if composite is None or not any(np.asarray(layer.convert("RGBA"))[..., 3].any() for layer in layers):
        return None
    white = Image.new("RGBA", composite.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, composite.convert("RGBA")).convert("RGB")


def shown_image(number: int, source: str | None, upload: Image.Image | None, sketch) -> Image.Image:
    """Unit `number`'s control image: the one on the sub-tab the user sees (`source`, Upload or Draw), never the
    other's. Without a `source` (a caller that shows no sub-tabs), the upload, else the drawing."""
    drawing = sketch_image(sketch)
    if source is None and upload is None and drawing is not None:
        return drawing
    if source == DRAW:
        if drawing is None:
            also = " or open its Upload tab to use the uploaded image" if upload is not None else " or untick it"
            raise ValueError(f"ControlNet unit {number} shows its Draw tab, with nothing drawn on it: draw there,"
                             f"{also}.")
        return drawing
    if upload is None:
        also = " or open its Draw tab to use the drawing" if drawing is not None else " or draw on its Draw tab"
        raise ValueError(f"ControlNet unit {number} is enabled but has no control image: upload one{also} "
                         "(or untick it).")
    return upload


@dataclass
class UnitPanel:
    enabled: gr.Checkbox
    upload: gr.Image
    sketch: gr.Sketchpad
    source: gr.State          # UPLOAD or DRAW: the sub-tab shown, whose image counts
    settings: dict            # ControlUnit field -> component
    preview: gr.Image
    show: gr.Button           # runs the preprocessor into `preview`

    def page(self, number: int) -> dict:
        return {f"unit{number}_enabled": self.enabled, f"unit{number}_upload": self.upload,
                f"unit{number}_sketch": self.sketch, f"unit{number}_source": self.source,
                **{f"unit{number}_{name}": component for name, component in self.settings.items()}}


def _unit_panel(context: StudioContext, number: int) -> UnitPanel:
    models = available_controlnets(context.models.models_dir)
    with gr.Row():
        enabled = gr.Checkbox(value=number == 0, label=f"Enable unit {number}", elem_id=f"controlnet-{number}-enabled")
    with gr.Row():
        with gr.Column():
            with gr.Tabs(selected=f"controlnet-{number}-upload-tab") as sub_tabs:
                with gr.Tab("Upload", id=f"controlnet-{number}-upload-tab") as upload_tab:
                    upload = gr.Image(label="Control image", type="pil", height=220,
                                      elem_id=f"controlnet-{number}-upload")
                with gr.Tab("Draw", id=f"controlnet-{number}-draw") as draw_tab:
                    sketch = gr.Sketchpad(label="Sketch", type="pil", height=300, canvas_size=(256, 256),
                                          elem_id=f"controlnet-{number}-sketch", layers=False,
                                          brush=gr.Brush(colors=["#000000"], color_mode="fixed", default_size=6))
                    gr.Markdown("Pick the brush and draw black on white: drawing picks the *invert* preprocessor, "
                                "which makes the drawing a scribble (white lines on black).")
            source = gr.State(UPLOAD)     # the sub-tab shown, whose image the unit uses
        with gr.Column():
            preview = gr.Image(label="Preprocessed (what the ControlNet reads)", interactive=False, height=220,
                               elem_id=f"controlnet-{number}-preview", elem_classes=["studio-pixels"], format="png")
            show = gr.Button("Preview the preprocessor", size="sm", elem_id=f"controlnet-{number}-preview-button")
    with gr.Row():
        preprocessor = gr.Dropdown(list(PREPROCESSORS), value="canny", label="Preprocessor",
                                   info="those needing weights read them from models/annotators/",
                                   elem_id=f"controlnet-{number}-preprocessor")
        model = gr.Dropdown(models, value=DEFAULT_CONTROLNET if DEFAULT_CONTROLNET in models else (models or [None])[0],
                            label="Model", allow_custom_value=True, info="shipped, or from models/controlnet/",
                            elem_id=f"controlnet-{number}-model")
    with gr.Row():
        weight = gr.Slider(0.0, MAX_WEIGHT, value=1.0, step=0.05, label="Control weight")
        start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Starting control step")
        end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Ending control step")
    with gr.Row():
        control_mode = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control mode")
        resize_mode = gr.Radio(list(RESIZE_MODES), value=CROP_AND_RESIZE, label="Resize mode")
    with gr.Row():
        pixel_perfect = gr.Checkbox(value=True, label="Pixel perfect",
                                    info="preprocess at the generation's size")
        resolution = gr.Slider(64, 2048, value=512, step=8, precision=0, label="Preprocessor resolution",
                               info="used when pixel perfect is off")
    settings = {"preprocessor": preprocessor, "model": model, "weight": weight, "start": start, "end": end,
                "control_mode": control_mode, "resize_mode": resize_mode, "pixel_perfect": pixel_perfect,
                "processor_resolution": resolution}
    panel = UnitPanel(enabled=enabled, upload=upload, sketch=sketch, source=source, settings=settings, preview=preview,
                      show=show)

    def pick_preprocessor(name):
        paired = paired_preprocessor(name)
        return gr.Dropdown(value=paired) if paired else gr.Dropdown()
    model.change(pick_preprocessor, model, preprocessor, api_visibility="private", queue=False)
    model.focus(lambda: gr.Dropdown(choices=available_controlnets(context.models.models_dir)), outputs=model,
                api_visibility="private", queue=False)
    sketch.change(lambda value: "invert" if sketch_image(value) is not None else gr.Dropdown(), sketch, preprocessor,
                  api_visibility="private", queue=False)
    # The preview shows what the shown sub-tab holds: one made from the other sub-tab's image, or from an image
    # since replaced, is dropped rather than left to mislead
    upload_tab.select(lambda: (UPLOAD, None), outputs=[source, preview], api_visibility="private", queue=False)
    draw_tab.select(lambda: (DRAW, None), outputs=[source, preview], api_visibility="private", queue=False)
    for image in (upload, sketch):
        image.change(lambda: None, outputs=preview, api_visibility="private", queue=False)
    # An image put on Upload while Draw is shown (Send to ControlNet, PNG Info) is the one the user means: Upload
    # comes to the front and counts (else the generation read the empty drawing)
    upload.change(lambda image: (UPLOAD, gr.Tabs(selected=f"controlnet-{number}-upload-tab")) if image is not None
                  else (gr.skip(), gr.skip()), upload, [source, sub_tabs], api_visibility="private", queue=False)
    return panel


def _unit_values(values: dict, number: int) -> dict | None:
    """Unit `number`'s ControlUnit fields from the page's values (None: disabled)."""
    if not values.pop(f"unit{number}_enabled"):
        for name in ("upload", "sketch", "source", *UNIT_FIELDS):
            values.pop(f"unit{number}_{name}")
        return None
    image = shown_image(number, values.pop(f"unit{number}_source"), values.pop(f"unit{number}_upload"),
                        values.pop(f"unit{number}_sketch"))
    unit = {name: values.pop(f"unit{number}_{name}") for name in UNIT_FIELDS}
    unit["processor_resolution"] = int(unit["processor_resolution"])
    return {"image": image, **unit}


def _page_to_fields(values: dict) -> dict:
    units = [unit for unit in (_unit_values(values, number) for number in range(MAX_UNITS)) if unit is not None]
    if not units:
        raise ValueError("Enable at least one ControlNet unit and give it a control image (or use Text-to-Image).")
    first, more = units[0], units[1:]
    return values | {"control_image": first.pop("image"), **first, "more_units": more}


def _controlnet_controls(context: StudioContext, panels: list) -> TaskControls:
    with gr.Tabs():
        for number in range(MAX_UNITS):
            with gr.Tab(f"Unit {number}", id=f"controlnet-unit-{number}"):
                panels.append(_unit_panel(context, number))
    with gr.Accordion("Start from an image (Image-to-Image with control)", open=False):
        with gr.Row():
            init_image = gr.Image(label="Init image (optional)", type="pil", height=200, elem_id="controlnet-init")
            strength = gr.Slider(0.01, 1.0, value=0.75, step=0.01, label="Denoising strength",
                                 info="only with an init image")
    first = panels[0].settings
    hidden = {name: type(component)(visible=False, **_kept(component)) for name, component in first.items()}
    fields = {"control_image": gr.Image(type="pil", visible=False, label="Control image"), **hidden,
              "more_units": gr.JSON(visible=False, value=[], label="More units: their images in base64, settings"),
              "init_image": init_image, "strength": strength}
    page = {name: component for number, panel in enumerate(panels) for name, component in panel.page(number).items()}
    return TaskControls(fields, page=page, to_fields=_page_to_fields, image_input=panels[0].upload,
                        restore=lambda settings: _restored_units(panels, settings))


def _kept(component) -> dict:
    """The API-only copy of a unit control: its choices and value (so the API shows the same choices)."""
    kept = {"value": component.value, "label": component.label}
    if isinstance(component, (gr.Dropdown, gr.Radio)):
        kept["choices"] = [value for _, value in component.choices]
        if isinstance(component, gr.Dropdown):
            kept["allow_custom_value"] = True
    if isinstance(component, gr.Slider):
        kept |= {"minimum": component.minimum, "maximum": component.maximum, "step": component.step,
                 "precision": component.precision}
    return kept


def _restored_units(panels: list[UnitPanel], settings: dict) -> dict:
    """The units an infotext names (`ControlNet N: "Module: …"`) into the unit panels (images are not stored)."""
    updates = {}
    units = settings.get("controlnet_units") or []
    for number, panel in enumerate(panels):
        unit = units[number] if number < len(units) else None
        updates[panel.enabled] = unit is not None
        for name, value in (unit or {}).items():
            if name in panel.settings:
                updates[panel.settings[name]] = value
    if units:
        gr.Info("ControlNet settings restored; the control images are not stored in a PNG: add them again.")
    return updates


def build_controlnet_tab(context: StudioContext, defaults: dict) -> GenerationTab:
    panels: list[UnitPanel] = []
    tab = build_generation_tab(context, "controlnet", defaults,
                               task_controls=lambda: _controlnet_controls(context, panels))
    for number, panel in enumerate(panels):
        _wire_preview(tab, panel, number)
    _build_xray(context, tab)
    return tab


def _wire_preview(tab: GenerationTab, panel: UnitPanel, number: int) -> None:
    @user_errors
    def preview(source, upload, sketch, width, height, **settings):
        image = shown_image(number, source, upload, sketch)
        settings["processor_resolution"] = int(settings["processor_resolution"])
        settings["model"] = settings["model"] or "(preview only)"    # the preprocessor needs no model
        unit = ControlUnit(image=image, **settings)
        return unit.control_image(int(width), int(height))

    inputs = {"source": panel.source, "upload": panel.upload, "sketch": panel.sketch, "width": tab.controls["width"],
              "height": tab.controls["height"], **panel.settings}
    panel.show.click(preview, inputs_kwargs=inputs, outputs=panel.preview, api_visibility="private")


def _build_xray(context: StudioContext, tab: GenerationTab) -> None:
    with gr.Accordion("Control X-ray: where the ControlNet pushes, step by step", open=False):
        gr.Markdown("Generates the first image of the current settings and records, at every step, the residuals "
                    "the units add to the UNet: their mean magnitude per place, summed over blocks (the picture, "
                    "dark to bright yellow on its colour bar), and per block (the plot). Colour each step from its "
                    "weakest to its strongest place to see where it pushes, on one scale for all steps to see "
                    "control fade, or by its change since the step before (red: stronger, blue: weaker). Move the "
                    "start/end sliders or the weight and record again.")
        record = gr.Button("Record the X-ray", elem_id="controlnet-xray-button")
        with gr.Row():
            with gr.Column():
                step = gr.Slider(0, 1, value=0, step=1, label="Step", elem_id="controlnet-xray-step")
                scale = gr.Radio(XRAY_SCALES, value=XRAY_SCALES[0][1], label="Colour", elem_id="controlnet-xray-scale")
                picture = gr.Image(label="Residual magnitude on the image", interactive=False, height=300,
                                   elem_id="controlnet-xray", elem_classes=["studio-pixels"], format="png")
                legend = gr.Markdown(elem_id="controlnet-xray-legend")
            plot = gr.LinePlot(x="step", y="magnitude", color="block", label="Mean |residual| per block",
                               elem_id="controlnet-xray-plot")
        summary = gr.Markdown(elem_id="controlnet-xray-text")
        state = gr.State(None)

    @user_errors
    def run(xray_scale, **values):
        request = request_from_controls(tab.task, tab.own.to_fields(dict(values)))
        xray = control_xray(context.generator, request)
        rows = [{"step": index, "block": name, "magnitude": float(xray.blocks[index, k])}
                for index in range(len(xray.maps)) for k, name in enumerate(xray.block_names)]
        acting = [index for index in range(len(xray.maps)) if xray.blocks[index].sum() > 0]
        text = (f"{len(xray.maps)} steps; the units acted at steps {acting[0]}–{acting[-1]}." if acting else
                f"{len(xray.maps)} steps; no unit acted (weight 0, or an empty start–end range).")
        last = len(xray.maps) - 1
        shown = xray.view(0, xray_scale)
        return {state: xray, plot: pd.DataFrame(rows), summary: text, picture: shown.image, legend: shown.legend,
                step: gr.Slider(0, max(last, 1), value=0, step=1)}

    def show(xray, index, xray_scale):
        if xray is None:
            return None, ""
        shown = xray.view(min(int(index), len(xray.maps) - 1), xray_scale)
        return shown.image, shown.legend

    inputs = {name: component for name, component in tab.controls.items() if component.visible} | tab.own.page
    record.click(run, inputs_kwargs={"xray_scale": scale} | inputs,
                 outputs={state, plot, summary, picture, legend, step}, api_visibility="private")
    for changed in (step, scale):
        changed.change(show, inputs=[state, step, scale], outputs=[picture, legend], api_visibility="private",
                       queue=False)
