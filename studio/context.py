"""What the tabs share: the pipeline services and per-session stop flags."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.generate import Generator
from pipelines.models import ModelManager


@dataclass
class StudioContext:
    models: ModelManager
    generator: Generator
    outputs_dir: Path
    startup_note: str = ""                      # e.g. why no model is loaded
    _stops: dict[str, threading.Event] = field(default_factory=dict)

    def stop_event(self, session: str | None) -> threading.Event:
        """A fresh (cleared) stop flag for this browser session's next generation."""
        event = self._stops.setdefault(session or "api", threading.Event())
        event.clear()
        return event

    def stop(self, session: str | None) -> None:
        event = self._stops.get(session or "api")
        if event is not None:
            event.set()

    def status_markdown(self) -> str:
        stats = self.models.memory.stats().summary()
        if self.models.current is None:
            note = self.startup_note or "No model is loaded."
            return (f"**No model loaded.** {note} Load one in *Models & memory* (the embedded model, a folder "
                    f"under `models/`, a hub id from your Hugging Face cache, or a `.safetensors` file) or start "
                    f"with `python launch.py --model ...`.  \n{stats}")
        model = self.models.current
        return f"**Model:** {model.name} ({model.source.kind}) · hash {model.model_hash or '—'}  \n{stats}"
