"""Text-to-Image and Image-to-Image tabs: the same controls, one with an input image.

The handlers only turn UI values into a `GenerationRequest`, hand it to the generator and
render the events it yields (previews, finished images, the final summary).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipelines.metadata import infotext_to_settings, parse_infotext
from pipelines.requests import MAX_BATCH, MAX_SIDE, MAX_STEPS, GeneratedImage, GenerationDone, GenerationRequest, Preview, draw_seed
from pipelines.samplers import DEFAULT_SAMPLER, SAMPLER_NAMES
from studio.context import StudioContext
from studio.errors import user_errors


@dataclass
class GenerateControls:
    """The components of one generation tab, in the order the handler takes them."""
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    sampler: gr.Dropdown
    steps: gr.Slider
    guidance_scale: gr.Slider
    guidance_rescale: gr.Slider
    width: gr.Slider
    height: gr.Slider
    seed: gr.Number
    batch_size: gr.Slider
    batch_count: gr.Slider
    preview_every: gr.Slider
    init_image: gr.Image | None
    strength: gr.Slider | None
    generate: gr.Button
    stop: gr.Button
    gallery: gr.Gallery
    infotext: gr.Textbox
    status: gr.Markdown
    infotexts: gr.State
    selected: gr.State

    def inputs(self) -> list:
        values = [self.prompt, self.negative_prompt, self.sampler, self.steps, self.guidance_scale,
                  self.guidance_rescale, self.width, self.height, self.seed, self.batch_size, self.batch_count,
                  self.preview_every]
        return values + ([self.init_image, self.strength] if self.init_image is not None else [])

    def settings_outputs(self) -> list:
        """Components that restored settings (PNG Info, send-to) are written into."""
        return [self.prompt, self.negative_prompt, self.sampler, self.steps, self.guidance_scale,
                self.guidance_rescale, self.width, self.height, self.seed]


def build_generate_tab(context: StudioContext, *, task: str, defaults: dict) -> GenerateControls:
    """Lay out one generation tab and wire its events. `task` is txt2img or img2img."""
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="e.g. red apple",
                                elem_id=f"{task}-prompt", value=defaults.get("prompt", ""))
            negative_prompt = gr.Textbox(label="Negative prompt", lines=1, elem_id=f"{task}-negative")
        with gr.Column(scale=1, min_width=160):
            generate = gr.Button("Generate", variant="primary", elem_id=f"{task}-generate")
            stop = gr.Button("Stop", variant="stop", elem_id=f"{task}-stop")
    with gr.Row():
        with gr.Column(scale=2):
            init_image = strength = None
            if task == "img2img":
                init_image = gr.Image(label="Input image", type="pil", elem_id="img2img-input", height=256)
                strength = gr.Slider(0.0, 1.0, value=0.6, step=0.01, label="Denoising strength",
                                     info="0 keeps the input; 1 ignores it")
            with gr.Row():
                sampler = gr.Dropdown(list(SAMPLER_NAMES), value=defaults.get("sampler", DEFAULT_SAMPLER),
                                      label="Sampler")
                steps = gr.Slider(1, MAX_STEPS, value=defaults.get("steps", 25), step=1, label="Steps",
                                  elem_id=f"{task}-steps")
            with gr.Row():
                guidance_scale = gr.Slider(1.0, 20.0, value=defaults.get("guidance_scale", 7.5), step=0.5,
                                           label="CFG scale", info="1 turns guidance (and its extra pass) off")
                guidance_rescale = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Guidance rescale")
            with gr.Row():
                width = gr.Slider(64, MAX_SIDE, value=defaults.get("width", 512), step=8, label="Width")
                height = gr.Slider(64, MAX_SIDE, value=defaults.get("height", 512), step=8, label="Height")
            with gr.Row():
                seed = gr.Number(value=-1, precision=0, label="Seed", info="-1 draws one", elem_id=f"{task}-seed")
                dice = gr.Button("🎲", scale=0, min_width=48)
                reuse = gr.Button("♻️", scale=0, min_width=48)
            with gr.Row():
                batch_size = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch size")
                batch_count = gr.Slider(1, 16, value=1, step=1, label="Batch count")
                preview_every = gr.Slider(0, 50, value=defaults.get("preview_every", 1), step=1,
                                          label="Preview every N steps", info="0 = off")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", columns=2, height=420, object_fit="contain",
                                 elem_id=f"{task}-gallery", format="png")
            status = gr.Markdown(elem_id=f"{task}-status")
            infotext = gr.Textbox(label="Generation parameters", lines=4, elem_id=f"{task}-infotext",
                                  buttons=["copy"])
    infotexts = gr.State([])
    selected = gr.State(None)
    controls = GenerateControls(prompt, negative_prompt, sampler, steps, guidance_scale, guidance_rescale, width,
                                height, seed, batch_size, batch_count, preview_every, init_image, strength,
                                generate, stop, gallery, infotext, status, infotexts, selected)

    @user_errors
    def run(prompt_value, negative, sampler_value, steps_value, cfg, rescale, width_value, height_value, seed_value,
            batch_size_value, batch_count_value, preview_value, init_image_value=None, strength_value=0.75,
            request: gr.Request = None):
        if task == "img2img" and init_image_value is None:
            raise gr.Error("Upload an input image first (or send one from Text-to-Image).")
        generation = GenerationRequest(
            prompt=prompt_value or "", negative_prompt=negative or "", sampler=sampler_value, steps=int(steps_value),
            guidance_scale=float(cfg), guidance_rescale=float(rescale), width=int(width_value),
            height=int(height_value), seed=int(seed_value if seed_value is not None else -1),
            batch_size=int(batch_size_value), batch_count=int(batch_count_value), preview_every=int(preview_value),
            init_image=init_image_value, strength=float(strength_value))
        stop_event = context.stop_event(request.session_hash if request else None)
        finished: list[GeneratedImage] = []
        for event in context.generator.run(generation, stop=stop_event):
            if isinstance(event, Preview):
                frames = [(item.path or item.image, f"seed {item.seed}") for item in finished]
                frames += [(image, f"step {event.step}/{event.total_steps}") for image in event.images]
                yield frames, gr.skip(), f"Step {event.step} of {event.total_steps}…", gr.skip(), gr.skip()
            elif isinstance(event, GeneratedImage):
                finished.append(event)
                yield ([(i.path or i.image, _caption(i)) for i in finished], gr.skip(),
                       f"{len(finished)} image(s) done…", gr.skip(), gr.skip())
            elif isinstance(event, GenerationDone):
                summary = f"Seed {event.seed} · {len(event.images)} image(s)"
                if event.images and event.images[0].path:
                    summary += f" · saved as `{event.images[0].path}`" + (" …" if len(event.images) > 1 else "")
                notes = "  \n".join([summary, *event.messages])
                texts = [i.infotext for i in event.images]
                yield ([(i.path or i.image, _caption(i)) for i in event.images], texts[0] if texts else "",
                       notes, texts, 0 if texts else None)

    outputs = [gallery, infotext, status, infotexts, selected]
    generate.click(run, inputs=controls.inputs(), outputs=outputs, concurrency_id="device",
                   concurrency_limit=1, api_name=task)
    def stop_generation(request: gr.Request = None):
        context.stop(request.session_hash if request else None)
    stop.click(stop_generation, inputs=None, outputs=None, api_name=f"{task}_stop")
    dice.click(lambda: draw_seed(), outputs=seed, api_visibility="private")
    reuse.click(lambda texts, index: _seed_of(texts, index), inputs=[infotexts, selected], outputs=seed,
                api_visibility="private")

    def on_select(texts, event: gr.SelectData):
        return (texts[event.index] if texts and event.index < len(texts) else ""), event.index
    gallery.select(on_select, inputs=infotexts, outputs=[infotext, selected], api_visibility="private")
    return controls


def _caption(item: GeneratedImage) -> str:
    return f"seed {item.seed}" if item.finished else f"stopped at step {item.steps_done}"


def _seed_of(texts: list[str], index: int | None) -> int:
    if not texts:
        return -1
    _, _, parameters = parse_infotext(texts[index or 0])
    return int(parameters.get("Seed", -1))


def settings_from_infotext(text: str) -> list:
    """Values for `GenerateControls.settings_outputs()` restored from an infotext (ours or A1111's)."""
    prompt, negative, parameters = parse_infotext(text or "")
    if not parameters:
        raise gr.Error("These are not generation parameters: no `Steps: …, Sampler: …` line was found.")
    settings = infotext_to_settings(parameters)
    sampler = settings.get("sampler")
    if sampler is not None and sampler not in SAMPLER_NAMES:
        gr.Warning(f"Sampler {sampler!r} is not available here; keeping the current one.")
        sampler = None
    keep = gr.skip()
    return [prompt, negative, sampler or keep, settings.get("steps", keep), settings.get("guidance_scale", keep),
            settings.get("guidance_rescale", 0.0), settings.get("width", keep), settings.get("height", keep),
            settings.get("seed", keep)]
