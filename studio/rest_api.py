"""AUTOMATIC1111's REST API (a subset of /sdapi/v1/) on the studio's own server, for the programs that speak it.

`python launch.py --api` mounts these routes on Gradio's FastAPI app (same host and port):

    POST txt2img, img2img        A1111's bodies and answers (base64 PNGs, `parameters`, `info` as JSON text);
                                 img2img with `mask` is inpainting; ControlNet units in
                                 `alwayson_scripts.controlnet.args`, as sd-webui-controlnet takes them
    GET  sd-models, samplers, schedulers, loras, scripts
    GET  options / POST options  `sd_model_checkpoint` (switches the model), live preview settings
    GET  progress                the running job: progress 0..1, ETA, state, the latest preview (base64)
    POST interrupt               stops the REST API's current generation at its next step
    POST png-info                the infotext of a base64 PNG, raw and parsed
    GET  /controlnet/model_list, /controlnet/module_list

The translation to and from our requests is studio/a1111.py. A generation goes through the studio's own
`Generator.submit`, so it is a job on the one device worker (pipelines/jobs.py), queued with the browser's:
a REST call and a page never run model work at once. Errors answer as A1111's do, `{"error": kind, "detail":
message, …}`: 422 for a bad value (named, with what is allowed), 401 without the credentials of `--auth`, 507 when
saving would leave the disk with less than its margin free.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from pipelines.core.requests import SamplingSettings
from pipelines.core.results import GeneratedImage, GenerationDone, Preview
from pipelines.generation.generator import STUDIO_VERSION, Generator
from pipelines.io import metadata
from pipelines.jobs.worker import Job, JobCancelled, JobState
from pipelines.lora.adapters import lora_files
from pipelines.models.controlnets import available_controlnets
from pipelines.models.manager import EMBEDDED_MODEL, EMBEDDED_NAME
from pipelines.models.memory import is_out_of_memory
from pipelines.tasks.control_units import A1111_MODULES
from studio import a1111
from studio.app import PREVIEW_EVERY
from studio.context import StudioContext
from studio.tabs.models import local_choices

log = logging.getLogger("studio.rest_api")

PREFIX = "/sdapi/v1"
REST_OWNER = "rest-api"      # the owner of the jobs the REST API starts (pipelines/jobs.py)
FALLBACK_SIDE = 512


# ----------------------------------------------------------------------------- bodies (A1111's names and defaults)


class GenerationBody(BaseModel):
    """What txt2img and img2img share (A1111's StableDiffusionProcessing fields); other keys are accepted."""
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = []
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    sampler_index: str = a1111.A1111_DEFAULT_SAMPLER
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None           # A1111: 512; here the loaded model's native size
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    override_settings: dict[str, Any] = {}
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False          # as in A1111, API images go to outputs/ only when asked
    alwayson_scripts: dict[str, Any] = {}


class Txt2ImgBody(GenerationBody):
    enable_hr: bool = False
    denoising_strength: float | None = None


class Img2ImgBody(GenerationBody):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class PngInfoBody(BaseModel):
    image: str


# ----------------------------------------------------------------------------- errors, as A1111 answers them


def error_response(error: Exception) -> JSONResponse:
    """`{"error", "detail", "body", "errors"}` with the status the error deserves: what was sent is named."""
    headers = None
    if isinstance(error, HTTPException):
        status, detail, headers = error.status_code, str(error.detail), getattr(error, "headers", None)
    elif isinstance(error, RequestValidationError):
        status = 422
        detail = "; ".join(f"`{'.'.join(str(part) for part in item['loc'] if part != 'body')}`: {item['msg']} "
                           f"(it is {item.get('input')!r})" for item in error.errors())
    elif is_out_of_memory(error):
        status, detail = 500, f"Out of memory: {error}. Lower the size or batch."
    elif isinstance(error, metadata.DiskSpaceError):     # the server's disk, not the request, is at fault
        status, detail = 507, str(error)
    elif isinstance(error, ValueError):
        status, detail = 422, a1111.in_a1111_terms(str(error))
    else:
        log.exception("unexpected error in a REST call", exc_info=error)
        status = 500
        detail = (f"Unexpected error ({type(error).__name__}: {error}). The studio is still running; the console "
                  "has the details.")
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": type(error).__name__, "detail": detail, "body": "", "errors": detail})


class A1111Route(APIRoute):
    """A route whose every error, request validation included, answers as A1111's API does."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request):
            try:
                return await handler(request)
            except Exception as error:
                return error_response(error)
        return answer


def basic_auth(user: str, password: str):
    """A dependency that lets through only HTTP basic auth with these credentials (A1111's --api-auth)."""
    security = HTTPBasic(auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(security)) -> None:
        if credentials is None or not (secrets.compare_digest(credentials.username.encode(), user.encode()) &
                                       secrets.compare_digest(credentials.password.encode(), password.encode())):
            raise HTTPException(status_code=401, detail="Incorrect username or password (this studio was started "
                                "with --auth; send HTTP basic auth).", headers={"WWW-Authenticate": "Basic"})
    return check


# ----------------------------------------------------------------------------- the API


@dataclass
class Followed:
    """A REST generation as its handler follows it, for /progress."""
    request: SamplingSettings
    images_done: int = 0
    preview: Image.Image | None = None


@dataclass(frozen=True)
class Checkpoint:
    """One entry of /sd-models, and how to load it."""
    title: str
    model_name: str
    filename: str
    spec: str
    from_ui: bool       # confined to the app's folders (everything but the model named at launch)


def png_base64(image: Image.Image, infotext: str | None = None, extra: dict | None = None) -> str:
    if infotext is None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        data = metadata.png_bytes_with_metadata(image, infotext, extra or {})
    return base64.b64encode(data).decode()


class RestApi:
    def __init__(self, context: StudioContext):
        self.context = context
        # A1111's API saves nothing unless `save_images`; this generator keeps images in memory (same worker)
        self.unsaved = Generator(context.models, None)
        self.options = {"show_progress_every_n_steps": PREVIEW_EVERY, "live_previews_enable": True}
        current = context.models.current
        self.launch_source = current.source if current is not None else None   # --model may point anywhere
        self._followed: dict[str, Followed] = {}
        self._first_seen: dict[str, tuple[float, float]] = {}   # job id -> (time, progress) when first polled
        self._lock = threading.Lock()

    def router(self, auth: tuple[str, str] | None) -> APIRouter:
        router = APIRouter(route_class=A1111Route, dependencies=[Depends(basic_auth(*auth))] if auth else [])
        for path, endpoint, method in (
                ("/txt2img", self.txt2img, "POST"), ("/img2img", self.img2img, "POST"),
                ("/progress", self.progress, "GET"), ("/interrupt", self.interrupt, "POST"),
                ("/options", self.get_options, "GET"), ("/options", self.set_options, "POST"),
                ("/sd-models", self.sd_models, "GET"), ("/samplers", self.samplers, "GET"),
                ("/schedulers", self.schedulers, "GET"), ("/loras", self.loras, "GET"),
                ("/png-info", self.png_info, "POST"), ("/scripts", self.scripts, "GET")):
            router.add_api_route(PREFIX + path, endpoint, methods=[method])
        router.add_api_route("/controlnet/model_list", self.controlnet_models, methods=["GET"])
        router.add_api_route("/controlnet/module_list", self.controlnet_modules, methods=["GET"])
        return router

    # -- generating ------------------------------------------------------------------------------
    def txt2img(self, body: Txt2ImgBody) -> dict:
        """Text-to-Image (with ControlNet units: ControlNet), as A1111's /sdapi/v1/txt2img."""
        return self._generate(body.model_dump(), img2img=False)

    def img2img(self, body: Img2ImgBody) -> dict:
        """Image-to-Image; with `mask`, inpainting; with ControlNet units, ControlNet on the init image."""
        return self._generate(body.model_dump(), img2img=True)

    def _generate(self, body: dict, *, img2img: bool) -> dict:
        started = time.time()
        # 1. The body as the studio's request (errors name A1111's fields)
        preview_every, notes = self._override_settings(body.get("override_settings") or {})
        model = self.context.models.require()
        generation = a1111.generation_request(body, img2img=img2img, native_side=model.native_side or FALLBACK_SIDE,
                                              preview_every=preview_every)
        request = generation.request
        # 2. A job on the one device worker, queued with the page's; followed here for /progress
        generator = self.context.generator if body["save_images"] else self.unsaved
        job = generator.submit(request, owner=REST_OWNER)
        done = self._follow(job, request)
        # 3. A1111's answer: base64 PNGs that carry their infotext, the request, and `info` as JSON text
        model = self.context.models.current
        info = a1111.info(request, done, model_name=model.name if model else None,
                          model_hash=model.model_hash if model else None, started=started,
                          messages=notes + generation.notes + done.messages)
        images = [self._encoded(item, request, done) for item in done.images] if body["send_images"] else []
        return {"images": images, "parameters": a1111.parameters(body), "info": json.dumps(info)}

    def _override_settings(self, overrides: dict) -> tuple[int, list[str]]:
        """The preview period for this request, from the options and `override_settings`; a checkpoint override
        must name the loaded model (switching is POST /options); other settings are named as not used."""
        if not isinstance(overrides, dict):
            raise ValueError(f"`override_settings` must be an object but is {type(overrides).__name__}.")
        options = self._checked_options({key: value for key, value in overrides.items() if key in self.options})
        every = options.get("show_progress_every_n_steps", self.options["show_progress_every_n_steps"])
        live = options.get("live_previews_enable", self.options["live_previews_enable"])
        wanted = overrides.get("sd_model_checkpoint")
        if wanted is not None and self._find_checkpoint(wanted).title != self._current_title():
            raise ValueError(f"`override_settings.sd_model_checkpoint` is {wanted!r} but {self._current_title()!r} is "
                             "loaded; switch models first with POST /sdapi/v1/options {\"sd_model_checkpoint\": …}.")
        unused = sorted(set(overrides) - set(self.options) - {"sd_model_checkpoint"})
        notes = [f"override_settings not used by this studio: {', '.join(unused)}."] if unused else []
        return (every if live and every > 0 else 0), notes

    def _follow(self, job: Job, request: SamplingSettings) -> GenerationDone:
        followed = Followed(request)
        with self._lock:
            self._followed[job.id] = followed
        try:
            for event in job.events():
                if isinstance(event, Preview) and event.images:
                    followed.preview = event.images[0]
                elif isinstance(event, GeneratedImage):
                    followed.images_done += 1
            try:
                done = job.result()
            except JobCancelled:       # interrupted while it waited: no image, as A1111 answers then
                return GenerationDone(images=[], seed=request.seed, stopped=True,
                                      messages=["Interrupted before it started."])
        finally:
            with self._lock:
                self._followed.pop(job.id, None)
                self._first_seen.pop(job.id, None)
        if done is None:
            raise RuntimeError(f"Job {job.id} finished, but its result was let go before it was read.")
        return done

    def _encoded(self, item: GeneratedImage, request: SamplingSettings, done: GenerationDone) -> str:
        """The image as A1111 returns it: a base64 PNG with its infotext (the saved file itself when saved)."""
        if item.path:
            return base64.b64encode(Path(item.path).read_bytes()).decode()
        model = self.context.models.current
        extra = {"request": request.to_json() | {"seed": item.seed, "batch_seed": done.seed},
                 "model": {"name": model.name if model else None, "hash": model.model_hash if model else None},
                 "versions": metadata.library_versions() | {"studio": STUDIO_VERSION}}
        return png_base64(item.image, item.infotext, extra)

    # -- following and stopping ------------------------------------------------------------------
    def progress(self, skip_current_image: bool = False) -> dict:
        """The job now on the device (a REST job with its batches and latest preview; any other job by its steps),
        as A1111's /progress: progress 0..1, `eta_relative` in seconds, `state`, `current_image`."""
        job = self.context.worker.current
        if job is None:
            return {"progress": 0, "eta_relative": 0, "state": self._state(None, 0, 0, 0, 0), "current_image": None,
                    "textinfo": None}
        with self._lock:
            followed = self._followed.get(job.id)
        step, steps = (job.progress.done, job.progress.total) if job.progress else (0, 0)
        job_count = followed.request.batch_count if followed else 1
        job_no = min(followed.images_done // followed.request.batch_size, job_count - 1) if followed else 0
        fraction = min(1.0, (job_no + (step / steps if steps else 0.0)) / job_count)
        # ETA from the rate since this job was first polled (the worker does not stamp a job's start)
        now = time.monotonic()
        with self._lock:
            seen_at, seen_fraction = self._first_seen.setdefault(job.id, (now, fraction))
        eta = (now - seen_at) * (1 - fraction) / (fraction - seen_fraction) if fraction > seen_fraction else 0.0
        image = followed.preview if followed and not skip_current_image else None
        return {"progress": fraction, "eta_relative": eta,
                "state": self._state(job, job_count, job_no, step, steps),
                "current_image": png_base64(image) if image is not None else None,
                "textinfo": job.progress.message if job.progress else None}

    @staticmethod
    def _state(job: Job | None, job_count: int, job_no: int, step: int, steps: int) -> dict:
        """A1111's shared.state.dict(), and the job's id (ours)."""
        return {"skipped": False, "interrupted": bool(job and job.stop.is_set()), "stopping_generation": False,
                "job": job.kind if job else "", "job_count": job_count,
                "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0",
                "job_no": job_no, "sampling_step": step, "sampling_steps": steps, "job_id": job.id if job else None}

    def interrupt(self) -> dict:
        """Stop the REST API's current generation at its next step (the finished images are answered): the one
        running on the device, else the next in line. A browser's generation is its page's to stop."""
        jobs = self.context.worker.jobs(owner=REST_OWNER)
        running = [job for job in jobs if job.state is JobState.RUNNING]
        target = running[0] if running else (jobs[0] if jobs else None)
        if target is not None:
            target.cancel()
        return {}

    # -- models and options ----------------------------------------------------------------------
    def _checkpoints(self) -> list[Checkpoint]:
        """The embedded model, the diffusers folders and .safetensors files under models/, and the model the studio
        was started with (which `--model` may have named anywhere)."""
        entries = []
        for choice in local_choices(self.context):
            if choice == EMBEDDED_NAME:
                entries.append(Checkpoint(EMBEDDED_NAME, EMBEDDED_NAME, str(EMBEDDED_MODEL), EMBEDDED_NAME, True))
            else:
                path = Path(choice)
                name = path.stem if path.is_file() else path.name
                entries.append(Checkpoint(path.name, name, str(path), choice, True))
        source = self.launch_source
        if source is not None and source.kind != "embedded" and \
                not any(_same_place(entry.filename, source.location) for entry in entries):
            entries.append(Checkpoint(Path(source.location).name if source.kind != "hub" else source.location,
                                      source.name, source.location, source.location, False))
        return entries

    def _current_title(self) -> str | None:
        model = self.context.models.current
        if model is None:
            return None
        if model.source.kind == "embedded":
            return EMBEDDED_NAME
        for entry in self._checkpoints():
            if _same_place(entry.filename, model.source.location):
                return entry.title
        return model.name

    def _find_checkpoint(self, name) -> Checkpoint:
        if not isinstance(name, str):
            raise ValueError(f"`sd_model_checkpoint` must be a checkpoint's title but is {name!r}.")
        bare = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", name.strip())    # A1111's titles end in " [hash]"
        entries = self._checkpoints()
        for entry in entries:
            if bare in (entry.title, entry.model_name):
                return entry
        raise ValueError(f"No checkpoint {name!r}; GET /sdapi/v1/sd-models lists them: "
                         f"{', '.join(entry.title for entry in entries)}.")

    def sd_models(self) -> list[dict]:
        """A1111's /sd-models: title, model_name, hash (of the loaded one), sha256, filename, config."""
        current, model = self._current_title(), self.context.models.current
        return [{"title": entry.title, "model_name": entry.model_name,
                 "hash": model.model_hash if model is not None and entry.title == current else None, "sha256": None,
                 "filename": entry.filename, "config": None} for entry in self._checkpoints()]

    def get_options(self) -> dict:
        """The options this studio has, by A1111's names."""
        return {"sd_model_checkpoint": self._current_title(), "samples_format": "png", **self.options}

    def set_options(self, body: dict[str, Any]) -> dict:
        """Set options; `sd_model_checkpoint` loads that model (on the device worker, after the queued jobs).
        Options this studio does not have are named in `ignored`."""
        checked = self._checked_options({key: value for key, value in body.items() if key in self.options})
        if body.get("samples_format", "png") != "png":
            raise ValueError(f"`samples_format` must be 'png' (this studio writes PNGs) but is "
                             f"{body['samples_format']!r}.")
        checkpoint = self._find_checkpoint(body["sd_model_checkpoint"]) if "sd_model_checkpoint" in body else None
        self.options.update(checked)
        if checkpoint is not None and checkpoint.title != self._current_title():
            self.context.models.load(checkpoint.spec, from_ui=checkpoint.from_ui)
            self.context.startup_error = ""
        known = {*self.options, "sd_model_checkpoint", "samples_format"}
        return {"applied": sorted(set(body) & known), "ignored": sorted(set(body) - known)}

    @staticmethod
    def _checked_options(values: dict) -> dict:
        every = values.get("show_progress_every_n_steps", 0)
        if isinstance(every, bool) or not isinstance(every, int) or every < -1:
            raise ValueError(f"`show_progress_every_n_steps` must be a whole number of steps (-1 or 0: no live "
                             f"previews) but is {every!r}.")
        if not isinstance(values.get("live_previews_enable", True), bool):
            raise ValueError(f"`live_previews_enable` must be true or false but is {values['live_previews_enable']!r}.")
        return values

    # -- lists and PNG info ----------------------------------------------------------------------
    def samplers(self) -> list[dict]:
        return a1111.sampler_items()

    def schedulers(self) -> list[dict]:
        return a1111.schedule_items()

    def loras(self) -> list[dict]:
        """The LoRAs under models/lora/, to name in a prompt as <lora:name:weight> (A1111's Lora extension's list)."""
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}}
                for name, path in lora_files(self.context.models.lora_dir).items()]

    def scripts(self) -> dict:
        """The always-on scripts a body may name (clients look for ControlNet here)."""
        return {"txt2img": [a1111.CONTROLNET_SCRIPT], "img2img": [a1111.CONTROLNET_SCRIPT]}

    def controlnet_models(self) -> dict:
        return {"model_list": available_controlnets(self.context.models.models_dir)}

    def controlnet_modules(self) -> dict:
        return {"module_list": list(A1111_MODULES.values())}

    def png_info(self, body: PngInfoBody) -> dict:
        """A1111's /png-info: `info` (the infotext), `items` (the other chunks: ours holds the full request),
        `parameters` (the infotext parsed)."""
        value = body.image.strip()
        try:
            data = base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
        except ValueError:
            shown = value if len(value) <= 24 else value[:24] + "…"
            raise ValueError(f"`image` must be a PNG as base64 text, but it is not base64; it begins {shown!r}.") \
                from None
        text, extra = metadata.read_png_metadata(io.BytesIO(data))
        return {"info": text or "", "items": {metadata.STUDIO_CHUNK: extra} if extra else {},
                "parameters": a1111.png_info_parameters(text or "")}


def _same_place(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


def mount_rest_api(app: FastAPI, context: StudioContext, *, auth: tuple[str, str] | None = None) -> RestApi:
    """Add the REST API's routes to Gradio's FastAPI `app` (what `launch()` returns); with `auth`, every route
    asks for those credentials."""
    api = RestApi(context)
    app.include_router(api.router(auth))
    return api
