"""Assembles the tabs into one Gradio app. No torch here: the tabs call `pipelines` services."""

from __future__ import annotations

import urllib.parse

import gradio as gr

from pipelines.core.samplers import STEPWISE_SAMPLER_NAMES, is_edm, model_default_sampler
from pipelines.core.transformers import (
    DEFAULT_DISTILLED_GUIDANCE,
    default_cfg,
    default_transformer_sampler,
    is_flow,
    is_transformer,
    sampler_menu,
    takes_distilled_guidance,
)
from pipelines.lora.adapters import lora_files, shown_path
from pipelines.models.manager import LoadedModel
from pipelines.tasks import TASKS
from studio.context import OWNER_COOKIE, StudioContext
from studio.errors import user_errors
from studio.tabs.controlnet import build_controlnet_tab
from studio.tabs.explorer import build_explorer_tab, wire_explorer_shown
from studio.tabs.generate import FAILED, GenerationTab, settings_from_infotext, size_hint, wire_resume
from studio.tabs.img2img import build_img2img_tab
from studio.tabs.inpaint import build_inpaint_tab
from studio.tabs.lora import build_lora_tab, wire_lora_resume
from studio.tabs.models import build_models_tab
from studio.tabs.pnginfo import build_pnginfo_tab
from studio.tabs.txt2img import build_txt2img_tab

TITLE = "Diffusion Studio"
FALLBACK_SIDE = 512
PREVIEW_EVERY = 5

# Small images (the embedded model draws 64 px) are shown whole, enlarged by a whole number with sharp
# pixels: every <img> inside an element of class `studio-pixels` is sized by `fitPixels` below.
CSS = """
.studio-pixels img { image-rendering: pixelated; object-fit: contain !important; }
.studio-pixels .thumbnail-item { max-width: 420px; max-height: 420px; }
#studio-notice { position: fixed; top: 16px; left: 50%; transform: translateX(-50%); z-index: 1000; max-width: 520px;
                 padding: 10px 16px; border: 1px solid var(--color-accent); border-radius: var(--radius-lg);
                 background: var(--background-fill-primary); box-shadow: var(--shadow-drop-lg); cursor: pointer;
                 font-family: var(--font); font-size: var(--text-md); }
"""
# Icons drawn in the text's colour into each element of class `studio-icon-NAME` (the seed buttons): an emoji
# (🎲, ♻️) is an empty box where no emoji font is installed.
ICONS = {"dice": '<rect x="3" y="3" width="18" height="18" rx="4"/><circle cx="8" cy="8" r="1"/>'
                 '<circle cx="12" cy="12" r="1"/><circle cx="16" cy="16" r="1"/>',
         "reuse": '<path d="M20 12a8 8 0 1 1-2.34-5.66"/><polyline points="20 4 20 9 15 9"/>'}


def icon_css() -> str:
    rules = []
    for name, shapes in ICONS.items():
        svg = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="black" '
               f'stroke-width="2" stroke-linecap="round" stroke-linejoin="round">{shapes}</svg>')
        rules.append(f".studio-icon-{name}::before {{ content: ''; width: 22px; height: 22px; "
                     f"background: currentColor; mask: url(\"data:image/svg+xml,{urllib.parse.quote(svg)}\") "
                     "center / contain no-repeat; }")
    return "\n".join(rules) + "\n"


# The browser's owner id (studio/context.py): random, kept a year, sent with every request to the studio.
HEAD = """<script>
(() => {
  if (!document.cookie.split("; ").some((entry) => entry.startsWith("%(cookie)s="))) {
    const id = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
    document.cookie = "%(cookie)s=" + id + "; path=/; max-age=31536000; SameSite=Strict";
  }
})();
(() => {
  function fitPixels(img) {
    const box = img.parentElement && img.parentElement.getBoundingClientRect();
    const area = img.closest(".studio-pixels").getBoundingClientRect();   // what the component shows
    if (!img.naturalWidth || !box || !box.width || !box.height) return;
    const width = Math.min(box.width, area.width);
    const height = Math.min(box.height, area.height);
    const fit = Math.min(width / img.naturalWidth, height / img.naturalHeight);
    const scale = fit >= 1 ? Math.floor(fit) : fit;      // enlarge by whole numbers, shrink smoothly
    img.style.width = Math.round(img.naturalWidth * scale) + "px";
    img.style.height = Math.round(img.naturalHeight * scale) + "px";
    img.style.imageRendering = scale >= 2 ? "pixelated" : "auto";
  }
  let pending = false;     // at most one pass per frame, however many changes come in
  const fitAll = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; document.querySelectorAll(".studio-pixels img").forEach(fitPixels); });
  };
  new MutationObserver(fitAll).observe(document.documentElement, {subtree: true, childList: true,
                                                                   attributes: true, attributeFilter: ["src"]});
  document.addEventListener("load", (event) => { if (event.target.tagName === "IMG") fitAll(); }, true);
  window.addEventListener("resize", fitAll);
})();
(() => {
  // What the browser settles by itself, without asking the server, is told here (a click closes the note).
  function notify(text) {
    let box = document.getElementById("studio-notice");
    if (!box) {
      box = Object.assign(document.createElement("div"), {id: "studio-notice", role: "alert"});
      box.addEventListener("click", () => box.remove());
      document.body.appendChild(box);
    }
    box.textContent = text;
    clearTimeout(box.timer);
    box.timer = setTimeout(() => box.remove(), 12000);
  }
  // Gradio drops a file that is not an image, dropped beside its image input's own drop zone, without a word
  window.addEventListener("drop", (event) => {
    const input = event.target.closest && event.target.closest(".block");
    const files = Array.from((event.dataTransfer && event.dataTransfer.files) || []);
    const others = files.filter((file) => !file.type.startsWith("image/")).map((file) => file.name);
    if (!input || !input.querySelector(".image-container") || !others.length) return;
    event.preventDefault();
    event.stopPropagation();
    const label = input.querySelector("[data-testid=block-label]");
    notify(`${others.join(", ")} ${others.length > 1 ? "are not images" : "is not an image"}: drop a PNG, ` +
           `JPEG or WebP file` + (label ? ` on “${label.textContent.trim()}”.` : "."));
  }, true);
  // A slider's typed value past its range is moved into it when its box loses focus: say so as it happens
  window.addEventListener("blur", (event) => {
    const box = event.target;
    const label = box instanceof HTMLInputElement ? box.getAttribute("aria-label") || "" : "";
    const name = label.match(/^number input for (.*)/);
    if (!name) return;
    const value = Number(box.value), low = Number(box.min), high = Number(box.max);
    if (box.value === "" || Number.isNaN(value) || (value >= low && value <= high)) return;
    const fitted = Math.min(Math.max(value, low), high);
    notify(`${name[1]}: ${value} is past its range, ${low} to ${high}; it is set to ${fitted}.`);
  }, true);
})();
</script>""" % {"cookie": OWNER_COOKIE}
# Gradio's queue wakes every millisecond while idle (2 to 5% of a core here); every 50 ms is plenty
# for a studio whose jobs take seconds.
IDLE_QUEUE_POLL_S = 0.05


def model_defaults(model: LoadedModel | None) -> dict:
    """Native size and sampler of a model, for the controls' starting values."""
    if model is None:
        return {"width": FALLBACK_SIDE, "height": FALLBACK_SIDE}
    side = model.native_side or FALLBACK_SIDE
    config, transformer = model.scheduler_config, is_transformer(model.pipeline)
    # every 5 steps a small model's full decode costs under 15% of the time between previews, so the
    # previews are the real picture (pipelines/core/preview.py)
    return {"width": side, "height": side, "preview_every": PREVIEW_EVERY, "native_side": model.native_side,
            "sampler": default_transformer_sampler(config) if is_flow(config) else model_default_sampler(config),
            # a transformer family's (or an EDM model's) own samplers and CFG; Flux dev's distilled guidance shown
            # only for it
            "samplers": {task: sampler_menu(model, task, entry.samplers) for task, entry in TASKS.items()}
            if transformer or is_edm(config) else None,
            "guidance_scale": default_cfg(model.pipeline),
            "distilled_guidance_shown": takes_distilled_guidance(model.pipeline)}


def serve(app: gr.Blocks, **launch_options):
    """Queue and launch `app` with the studio's page additions (CSS, scripts) and idle polling."""
    app.queue(default_concurrency_limit=1)
    app._queue.sleep_when_free = IDLE_QUEUE_POLL_S
    app._queue.progress_update_sleep_when_free = IDLE_QUEUE_POLL_S
    return app.launch(css=CSS + icon_css(), head=HEAD, **launch_options)


def build_app(context: StudioContext) -> gr.Blocks:
    defaults = model_defaults(context.models.current)
    # Gradio's own copies of shown images (Live writes one per change) are deleted hourly once a day old
    with gr.Blocks(title=TITLE, delete_cache=(3600, 86400)) as app:
        gr.Markdown(f"# {TITLE}")
        header = gr.Markdown(context.status_markdown(), label="Studio status", elem_id="studio-status")
        with gr.Tabs() as tabs:
            with gr.Tab(TASKS["txt2img"].label, id="txt2img"):
                txt2img = build_txt2img_tab(context, defaults)
                with gr.Row():
                    send_to_img2img = gr.Button(f"Send selected image to {TASKS['img2img'].label}", size="sm")
                    send_to_inpaint = gr.Button(f"Send selected image to {TASKS['inpaint'].label}", size="sm",
                                                elem_id="txt2img-send-to-inpaint")
            with gr.Tab(TASKS["img2img"].label, id="img2img"):
                img2img = build_img2img_tab(context, defaults)
            with gr.Tab(TASKS["inpaint"].label, id="inpaint"):
                inpaint = build_inpaint_tab(context, defaults)
            with gr.Tab(TASKS["controlnet"].label, id="controlnet"):
                controlnet = build_controlnet_tab(context, defaults)
            with gr.Tab("Training", id="lora"):
                lora = build_lora_tab(context)
            with gr.Tab("PNG Info", id="pnginfo"):
                pnginfo = build_pnginfo_tab()
            with gr.Tab("Diffusion Explorer", id="explorer") as explorer_shown:
                explorer = build_explorer_tab(context)
            with gr.Tab("Models & memory", id="models"):
                models_tab = build_models_tab(context, header=header)
        generation_tabs = (txt2img, img2img, inpaint, controlnet)
        _wire_send_to(send_to_img2img, txt2img, img2img, tabs)
        _wire_send_to(send_to_inpaint, txt2img, inpaint, tabs)
        _wire_pnginfo(pnginfo, generation_tabs, tabs)
        _wire_model_defaults(context, models_tab.loaded, generation_tabs, explorer.reverse.settings)
        for tab in generation_tabs:
            wire_resume(app, context, tab)
        wire_explorer_shown(explorer, explorer_shown)
        wire_lora_resume(app, context, lora)
        _wire_jobs_api(context)
        # one reading of the figures for both places that show them
        app.load(lambda: (context.status_markdown(),) * 2, outputs=[header, models_tab.status],
                 api_visibility="private", show_progress="hidden")
    return app


def _wire_send_to(button: gr.Button, txt2img: GenerationTab, target: GenerationTab, tabs: gr.Tabs) -> None:
    """The selected Text-to-Image result, and its settings, into `target`'s image input and controls."""
    def selected_image(gallery_value, index, texts):
        if not gallery_value:
            raise gr.Error("Generate an image first, then select it in the gallery.")
        index = index or 0
        item = gallery_value[index]
        image = item[0] if isinstance(item, (list, tuple)) else item.get("image", item)
        image = getattr(image, "path", None) or (image.get("path") if isinstance(image, dict) else image)
        settings = settings_from_infotext(texts[index], target) if texts and index < len(texts) else {}
        return {target.own.image_input: image, **settings, **_cleared_page(target), tabs: gr.Tabs(selected=target.task)}

    button.click(user_errors(selected_image), inputs=[txt2img.gallery, txt2img.selected, txt2img.infotexts],
                 outputs={target.own.image_input, *target.controls.values(), *target.own.page.values(), tabs},
                 api_visibility="private")


def _cleared_page(tab: GenerationTab) -> dict:
    """A new image empties the tab's other image inputs (an uploaded mask belongs to the old image)."""
    return {component: None for component in tab.own.page.values()
            if component is not tab.own.image_input and isinstance(component, (gr.Image, gr.ImageEditor))}


def _wire_pnginfo(pnginfo, generation_tabs: tuple[GenerationTab, ...], tabs: gr.Tabs) -> None:
    """PNG Info's send-to buttons restore the infotext's settings (and, for img2img, the image) by name."""
    buttons = (pnginfo.to_txt2img, pnginfo.to_img2img, pnginfo.to_inpaint, pnginfo.to_controlnet)
    for tab, button in zip(generation_tabs, buttons):
        def restore(text, path, tab=tab):
            values = {tabs: gr.Tabs(selected=tab.task)}
            if tab.own.image_input is not None and path:
                values |= {tab.own.image_input: path, **_cleared_page(tab)}
            return values | settings_from_infotext(text, tab)

        outputs = {*tab.controls.values(), *tab.own.page.values(), tabs} | \
            ({tab.own.image_input} if tab.own.image_input else set())
        button.click(user_errors(restore), inputs=[pnginfo.infotext, pnginfo.file], outputs=outputs,
                     api_visibility="private")


def _wire_model_defaults(context: StudioContext, loaded, generation_tabs: tuple[GenerationTab, ...],
                         explorer: dict[str, gr.components.Component]) -> None:
    """After a model loads, the size and sampler controls (the explorer's size and sampler too) start from that
    model's native values and menus, and a generation's failure said before it (no model, a model that could not
    run it) is gone from the tabs' status lines."""
    statuses = [tab.status for tab in generation_tabs]
    explorer_size, explorer_sampler = explorer["size"], explorer["sampler"]

    def refresh(*status_lines: str):
        defaults = model_defaults(context.models.current)
        updates = {tab.controls[name]: value for tab in generation_tabs for name, value in defaults.items()
                   if name in tab.controls and name not in ("width", "height", "sampler")}
        menus = {tab.controls["sampler"]: _sampler_menu(defaults, tab.task) for tab in generation_tabs}
        flux_dev = defaults.get("distilled_guidance_shown", False)    # hidden: back at its default, unused
        flux = {tab.controls["distilled_guidance"]: gr.Slider(visible=True) if flux_dev else
                gr.Slider(visible=False, value=DEFAULT_DISTILLED_GUIDANCE) for tab in generation_tabs}
        hint = size_hint(defaults.get("native_side"))
        sizes = {tab.controls[name]: gr.Slider(value=defaults[name], info=hint) for tab in generation_tabs
                 for name in ("width", "height")}
        cleared = {status: "" for status, text in zip(statuses, status_lines) if (text or "").startswith(FAILED)}
        stepwise = _sampler_menu(defaults, "txt2img", among=STEPWISE_SAMPLER_NAMES)  # the explorer's: a call a step
        return updates | menus | flux | sizes | cleared | {explorer_size: defaults["width"], explorer_sampler: stepwise}

    outputs = {explorer_size, explorer_sampler, *statuses} | {tab.controls[name] for tab in generation_tabs for name in
                                            ("width", "height", "sampler", "preview_every", "guidance_scale",
                                             "distilled_guidance")}
    loaded.success(refresh, inputs=statuses, outputs=outputs, api_visibility="private", show_progress="hidden")


def _sampler_menu(defaults: dict, task: str, among: tuple[str, ...] | None = None) -> gr.Dropdown:
    """A tab's sampler menu for the loaded model (of those `among`), on the model's own sampler where it is in it."""
    choices = [name for name in (defaults.get("samplers") or {}).get(task) or TASKS[task].samplers
               if among is None or name in among]
    return gr.Dropdown(choices=choices, value=defaults.get("sampler") if defaults.get("sampler") in choices
                       else choices[0])


def _wire_jobs_api(context: StudioContext) -> None:
    """API endpoints for jobs by id: how a script (or a reloaded page) follows and stops its work."""
    def owned(job_id: str, request: gr.Request | None):
        found = context.owned_job(job_id, request)
        if found is None:
            raise gr.Error(f"No job {job_id!r}: it never existed or finished long ago.")
        return found

    def job(job_id: str, request: gr.Request = None) -> dict:
        """The state and progress of job `job_id` (as returned next to a generation's images), one of yours."""
        found = owned(job_id, request)
        progress = found.progress
        return {"id": found.id, "kind": found.kind, "state": found.state.value,
                "progress": None if progress is None else {"done": progress.done, "total": progress.total,
                                                           "message": progress.message}}

    def stop(job_id: str, request: gr.Request = None) -> dict:
        """Stop job `job_id`, one of yours, at its next step; finished images are kept."""
        owned(job_id, request).cancel()
        return job(job_id, request)

    def loras() -> list[dict]:
        """The LoRAs under models/lora/ and those the app ships, to name in a prompt as <lora:name:weight>."""
        folder = context.models.lora_dir
        return [{"name": name, "file": shown_path(folder, path), "size_mb": round(path.stat().st_size / 1e6, 2)}
                for name, path in lora_files(folder).items()]

    # a button no one sees triggers them; the hidden components name the values in the API's description
    job_id = gr.Textbox(visible=False, label="Job id")
    found_job = gr.JSON(visible=False, label="The job: id, kind, state, progress")
    trigger = gr.Button(visible=False)
    trigger.click(loras, outputs=gr.JSON(visible=False, label="LoRAs: name, file, size_mb"), api_name="loras",
                  queue=False)
    trigger.click(job, inputs=job_id, outputs=found_job, api_name="job", queue=False)
    trigger.click(stop, inputs=job_id, outputs=found_job, api_name="stop", queue=False)
