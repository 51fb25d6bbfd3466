"""AUTOMATIC1111's REST API (a subset of /sdapi/v1/) on the studio's own server, for the programs that speak it.

`python launch.py --api` mounts these routes on Gradio's FastAPI app (same host and port):

    POST txt2img, img2img        A1111's bodies and answers (base64 PNGs, `parameters`, `info` as JSON text);
                                 img2img with `mask` is inpainting; ControlNet units in
                                 `alwayson_scripts.controlnet.args`, as sd-webui-controlnet takes them
    GET  sd-models, samplers, schedulers, loras, embeddings, scripts
    GET  options / POST options  `sd_model_checkpoint` (switches the model), live preview settings
    GET  progress                the running job: progress 0..1, ETA, state, the latest preview (base64)
    POST interrupt               stops the REST API's current generation at its next step
    POST png-info                the infotext of a base64 PNG, raw and parsed
    GET  /controlnet/model_list, /controlnet/module_list

The translation to and from our requests is studio/a1111.py; the bodies, error answers and auth are
studio/rest_http.py; the checkpoints and options, studio/rest_models.py. A generation goes through the studio's
own `Generator.submit`, so it is a job on the one device worker (pipelines/jobs/worker.py), queued with the
browser's: a REST call and a page never run model work at once. Errors answer as A1111's do, `{"error": kind, "detail":
message, …}`: 422 for a bad value (named, with what is allowed), 401 without the credentials of `--auth`, 507 when
saving would leave the disk with less than its margin free.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI
from PIL import Image

from pipelines.core.requests import SamplingSettings
from pipelines.core.results import GeneratedImage, GenerationDone, Preview
from pipelines.generation.generator import STUDIO_VERSION, Generator
from pipelines.io import metadata
from pipelines.jobs.worker import Job, JobCancelled, JobState
from pipelines.lora.adapters import lora_files
from pipelines.models.controlnets import available_controlnets
from pipelines.models.embeddings import describe_embeddings
from pipelines.tasks.control_units import A1111_MODULES
from studio import a1111
from studio.context import StudioContext
from studio.rest_http import A1111Route, Img2ImgBody, PngInfoBody, Txt2ImgBody, basic_auth
from studio.rest_models import ModelOptions

PREFIX = "/sdapi/v1"
REST_OWNER = "rest-api"      # the owner of the jobs the REST API starts without --auth (pipelines/jobs/worker.py)
FALLBACK_SIDE = 512


# ----------------------------------------------------------------------------- the API


@dataclass
class Followed:
    """A REST generation as its handler follows it, for /progress."""
    request: SamplingSettings
    images_done: int = 0


def png_base64(image: Image.Image, infotext: str | None = None, extra: dict | None = None) -> str:
    if infotext is None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        data = metadata.png_bytes_with_metadata(image, infotext, extra or {})
    return base64.b64encode(data).decode()


class RestApi:
    def __init__(self, context: StudioContext, *, user: str | None = None):
        self.context = context
        # With --auth a job belongs to the user, whichever page or client started it (studio/context.py)
        self.owner = f"user:{user}" if user else REST_OWNER
        # A1111's API saves nothing unless `save_images`; this generator keeps images in memory (same worker)
        self.unsaved = Generator(context.models, None)
        self.models = ModelOptions(context)
        self._followed: dict[str, Followed] = {}
        self._first_seen: dict[str, tuple[float, float]] = {}   # job id -> (time, progress) when first polled
        self._lock = threading.Lock()

    def router(self, auth: tuple[str, str] | None) -> APIRouter:
        router = APIRouter(route_class=A1111Route, dependencies=[Depends(basic_auth(*auth))] if auth else [])
        for path, endpoint, method in (
                ("/txt2img", self.txt2img, "POST"), ("/img2img", self.img2img, "POST"),
                ("/progress", self.progress, "GET"), ("/interrupt", self.interrupt, "POST"),
                ("/options", self.models.get_options, "GET"), ("/options", self.models.set_options, "POST"),
                ("/sd-models", self.models.sd_models, "GET"), ("/samplers", self.samplers, "GET"),
                ("/schedulers", self.schedulers, "GET"), ("/loras", self.loras, "GET"),
                ("/png-info", self.png_info, "POST"), ("/scripts", self.scripts, "GET"),
                ("/embeddings", self.embeddings, "GET")):
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
        preview_every, notes = self.models.preview_every(body.get("override_settings") or {})
        model = self.context.models.require()
        generation = a1111.generation_request(body, img2img=img2img, native_side=model.native_side or FALLBACK_SIDE,
                                              preview_every=preview_every)
        request = generation.request
        # 2. A job on the one device worker, queued with the page's; followed here for /progress
        generator = self.context.generator if body["save_images"] else self.unsaved
        job = generator.submit(request, owner=self.owner)
        done = self._follow(job, request)
        # 3. A1111's answer: base64 PNGs that carry their infotext, the request, and `info` as JSON text
        model = self.context.models.current
        info = a1111.info(request, done, model_name=model.name if model else None,
                          model_hash=model.model_hash if model else None, started=started,
                          messages=notes + generation.notes + done.messages)
        images = [self._encoded(item, request, done) for item in done.images] if body["send_images"] else []
        return {"images": images, "parameters": a1111.parameters(body), "info": json.dumps(info)}

    def _follow(self, job: Job, request: SamplingSettings) -> GenerationDone:
        followed = Followed(request)
        with self._lock:
            self._followed[job.id] = followed
        try:
            for event in job.events():
                if isinstance(event, GeneratedImage):
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
        # the job's own latest preview: what the page shows, with no follower in between to lag behind it
        preview = None if skip_current_image else job.latest_transient
        image = preview.images[0] if isinstance(preview, Preview) and preview.images else None
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
        running on the device, else the next in line. Only the caller's own jobs: without --auth the REST API's,
        and a browser's generation is its page's to stop; with --auth the user's."""
        jobs = self.context.worker.jobs(owner=self.owner)
        running = [job for job in jobs if job.state is JobState.RUNNING]
        target = running[0] if running else (jobs[0] if jobs else None)
        if target is not None:
            target.cancel()
        return {}

    # -- lists and PNG info ----------------------------------------------------------------------
    def samplers(self) -> list[dict]:
        return a1111.sampler_items()

    def schedulers(self) -> list[dict]:
        return a1111.schedule_items()

    def loras(self) -> list[dict]:
        """The LoRAs under models/lora/, to name in a prompt as <lora:name:weight> (A1111's Lora extension's list)."""
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}}
                for name, path in lora_files(self.context.models.lora_dir).items()]

    def embeddings(self) -> dict:
        """A1111's /embeddings: the files under models/embeddings/ that fit the loaded model (`loaded`), and those that
        do not (`skipped`: made for another model, SDXL's, or not read, such as a .pt without --allow-pickle)."""
        models, current = self.context.models, self.context.models.current
        return a1111.embedding_items(describe_embeddings(models.embeddings_dir, current.pipeline if current else None,
                                                         allow_pickle=models.allow_pickle))

    def scripts(self) -> dict:
        """The always-on scripts a body may name (clients look for ControlNet here)."""
        return {"txt2img": [a1111.CONTROLNET_SCRIPT], "img2img": [a1111.CONTROLNET_SCRIPT]}

    def controlnet_models(self) -> dict:
        return {"model_list": available_controlnets(self.context.models.models_dir)}

    def controlnet_modules(self) -> dict:
        return {"module_list": list(A1111_MODULES.values())}

    def png_info(self, body: PngInfoBody) -> dict:
        """A1111's /png-info: `info` (the infotext), `items` (the other chunks: ours holds the full request),
        `parameters` (the infotext parsed). A PNG declaring more than the input cap is refused before decoding."""
        text, extra = a1111.read_png_info(body.image)
        return {"info": text or "", "items": {metadata.STUDIO_CHUNK: extra} if extra else {},
                "parameters": a1111.png_info_parameters(text or "")}


def mount_rest_api(app: FastAPI, context: StudioContext, *, auth: tuple[str, str] | None = None) -> RestApi:
    """Add the REST API's routes to Gradio's FastAPI `app` (what `launch()` returns); with `auth`, every route
    asks for those credentials."""
    api = RestApi(context, user=auth[0] if auth else None)
    app.include_router(api.router(auth))
    return api
