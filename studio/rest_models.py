"""The REST API's models and options (studio/rest_api.py serves them): /sd-models, GET and POST /options (whose
`sd_model_checkpoint` switches the model), and the `override_settings` a generation may carry."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.models.sources import EMBEDDED_MODEL, EMBEDDED_NAME
from studio.app import PREVIEW_EVERY
from studio.context import StudioContext
from studio.tabs.models import local_choices


@dataclass(frozen=True)
class Checkpoint:
    """One entry of /sd-models, and how to load it."""
    title: str
    model_name: str
    filename: str
    spec: str
    from_ui: bool       # confined to the app's folders (everything but the model named at launch)


class ModelOptions:
    """The checkpoints a client may switch to, and A1111's options this studio has."""

    def __init__(self, context: StudioContext):
        self.context = context
        self.options = {"show_progress_every_n_steps": PREVIEW_EVERY, "live_previews_enable": True}
        current = context.models.current
        self.launch_source = current.source if current is not None else None   # --model may point anywhere

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoints(self) -> list[Checkpoint]:
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

    def current_title(self) -> str | None:
        model = self.context.models.current
        if model is None:
            return None
        if model.source.kind == "embedded":
            return EMBEDDED_NAME
        for entry in self.checkpoints():
            if _same_place(entry.filename, model.source.location):
                return entry.title
        return model.name

    def find(self, name) -> Checkpoint:
        if not isinstance(name, str):
            raise ValueError(f"`sd_model_checkpoint` must be a checkpoint's title but is {name!r}.")
        bare = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", name.strip())    # A1111's titles end in " [hash]"
        entries = self.checkpoints()
        for entry in entries:
            if bare in (entry.title, entry.model_name):
                return entry
        raise ValueError(f"No checkpoint {name!r}; GET /sdapi/v1/sd-models lists them: "
                         f"{', '.join(entry.title for entry in entries)}.")

    # -- routes ----------------------------------------------------------------------------------
    def sd_models(self) -> list[dict]:
        """A1111's /sd-models: title, model_name, hash (of the loaded one), sha256, filename, config."""
        current, model = self.current_title(), self.context.models.current
        return [{"title": entry.title, "model_name": entry.model_name,
                 "hash": model.model_hash if model is not None and entry.title == current else None, "sha256": None,
                 "filename": entry.filename, "config": None} for entry in self.checkpoints()]

    def get_options(self) -> dict:
        """The options this studio has, by A1111's names."""
        return {"sd_model_checkpoint": self.current_title(), "samples_format": "png", **self.options}

    def set_options(self, body: dict[str, Any]) -> dict:
        """Set options; `sd_model_checkpoint` loads that model (on the device worker, after the queued jobs).
        Options this studio does not have are named in `ignored`."""
        checked = self._checked({key: value for key, value in body.items() if key in self.options})
        if body.get("samples_format", "png") != "png":
            raise ValueError(f"`samples_format` must be 'png' (this studio writes PNGs) but is "
                             f"{body['samples_format']!r}.")
        checkpoint = self.find(body["sd_model_checkpoint"]) if "sd_model_checkpoint" in body else None
        self.options.update(checked)
        if checkpoint is not None and checkpoint.title != self.current_title():
            self.context.models.load(checkpoint.spec, from_ui=checkpoint.from_ui)
            self.context.startup_error = ""
        known = {*self.options, "sd_model_checkpoint", "samples_format"}
        return {"applied": sorted(set(body) & known), "ignored": sorted(set(body) - known)}

    # -- a generation's overrides ----------------------------------------------------------------
    def preview_every(self, overrides: dict) -> tuple[int, list[str]]:
        """The preview period for one request, from the options and its `override_settings`; a checkpoint override
        must name the loaded model (switching is POST /options); other settings are named as not used."""
        if not isinstance(overrides, dict):
            raise ValueError(f"`override_settings` must be an object but is {type(overrides).__name__}.")
        options = self._checked({key: value for key, value in overrides.items() if key in self.options})
        every = options.get("show_progress_every_n_steps", self.options["show_progress_every_n_steps"])
        live = options.get("live_previews_enable", self.options["live_previews_enable"])
        wanted = overrides.get("sd_model_checkpoint")
        if wanted is not None and self.find(wanted).title != self.current_title():
            raise ValueError(f"`override_settings.sd_model_checkpoint` is {wanted!r} but {self.current_title()!r} is "
                             "loaded; switch models first with POST /sdapi/v1/options {\"sd_model_checkpoint\": …}.")
        unused = sorted(set(overrides) - set(self.options) - {"sd_model_checkpoint"})
        notes = [f"override_settings not used by this studio: {', '.join(unused)}."] if unused else []
        return (every if live and every > 0 else 0), notes

    @staticmethod
    def _checked(values: dict) -> dict:
        every = values.get("show_progress_every_n_steps", 0)
        if isinstance(every, bool) or not isinstance(every, int) or every < -1:
            raise ValueError(f"`show_progress_every_n_steps` must be a whole number of steps (-1 or 0: no live "
                             f"previews) but is {every!r}.")
        if not isinstance(values.get("live_previews_enable", True), bool):
            raise ValueError(f"`live_previews_enable` must be true or false but is {values['live_previews_enable']!r}.")
        return values


def _same_place(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b
