"""What the tabs share: the pipeline services, the device worker, and who owns which job.

A job belongs to whoever started it, and only they follow or stop it by its id (ids are no secret:
A1111's /progress names the running one). Who that is (`session_of`): with --auth, the logged-in
user; else the browser, by the random id `app.HEAD`'s script keeps in its cookie `OWNER_COOKIE`,
so that a reloaded page (a new Gradio session) still owns the job it started; else, for a client
without that cookie (a script through gradio_client), its Gradio session.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from pipelines.core.families import family_of_pipeline
from pipelines.generation.generator import Generator
from pipelines.jobs.worker import DeviceWorker, Job
from pipelines.models.manager import ModelManager


@dataclass
class StudioContext:
    models: ModelManager
    generator: Generator
    outputs_dir: Path
    # Why the model named at launch did not load; shown until a model is loaded. It is about the one
    # model every session shares, so it is app-wide; what one user did is told to that user alone.
    startup_error: str = ""

    @property
    def worker(self) -> DeviceWorker:
        return self.models.worker

    def find_job(self, job_id: str | None) -> Job | None:
        """Job `job_id`, whoever owns it; for an id a client sent, `owned_job`."""
        return self.worker.find(job_id) if job_id else None

    def owned_job(self, job_id: str | None, request: gr.Request | None) -> Job | None:
        """Job `job_id` (None: no such job, or forgotten), refused when `request` comes from someone else."""
        job = self.find_job(job_id)
        if job is not None and not owns(request, job):
            raise gr.Error(f"Job {job_id!r} belongs to another session: only the browser (with --auth, the user) "
                           "that started a job follows or stops it.")
        return job

    def status_markdown(self) -> str:
        stats = self.models.memory.stats().summary()
        if self.models.current is None:
            note = f" {self.startup_error}" if self.startup_error else ""
            return (f"**No model loaded.**{note} Load one in *Models & memory* (the embedded model, a folder "
                    f"under `models/`, a hub id from your Hugging Face cache, or a `.safetensors` file) or start "
                    f"with `python launch.py --model ...`.  \n{stats}")
        model = self.models.current
        where = "" if model.source.kind == "embedded" else f" ({model.source.kind} `{model.source.location}`)"
        budget = self.models.budget()
        family = family_of_pipeline(model.pipeline)
        return (f"**Model:** {model.name}{where}" + (f" · {family}" if family else "") +
                f" · hash {model.model_hash or '—'} · native size {model.native_side} px"
                f"  \n{stats}" + (f" · {budget.summary()}" if budget is not None else ""))


OWNER_COOKIE = "diffusion-studio-owner"


def session_of(request: gr.Request | None) -> str | None:
    """Who a request comes from: the owner of the jobs it starts (see the module's docstring). None: not a
    request at all (a call from Python)."""
    if request is None:
        return None
    if request.username:
        return f"user:{request.username}"
    browser = getattr(request, "cookies", {}).get(OWNER_COOKIE)
    return f"browser:{browser}" if browser else f"session:{request.session_hash}"


def owns(request: gr.Request | None, job: Job) -> bool:
    return job.owner == session_of(request)
