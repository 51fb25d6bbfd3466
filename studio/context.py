"""What the tabs share: the pipeline services, the device worker, and who owns which job."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

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
        return self.worker.find(job_id) if job_id else None

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
        return (f"**Model:** {model.name}{where} · hash {model.model_hash or '—'} · native size {model.native_side} px"
                f"  \n{stats}" + (f" · {budget.summary()}" if budget is not None else ""))


def session_of(request: gr.Request | None) -> str | None:
    """The browser session (or gradio_client) a request comes from: the owner of the jobs it starts."""
    return request.session_hash if request is not None else None
