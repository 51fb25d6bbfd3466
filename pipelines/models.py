"""The model manager: one per app. Loads a diffusers model from the embedded assets, a local
folder, a single `.safetensors` checkpoint or a Hugging Face hub id; derives task pipelines
from the one loaded base with `from_pipe` (shared weights); releases a model on switch."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline

from pipelines.memory import MemoryManager, MemoryMode, is_out_of_memory
from pipelines.streaming import run_on_device_thread

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = ROOT / "assets" / "emoji-ldm"
EMBEDDED_NAME = "embedded"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TASKS = ("txt2img", "img2img")


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSource:
    kind: str        # embedded | folder | file | hub
    location: str    # path or hub id
    name: str        # what the UI and the infotext call it


def resolve_source(spec: str, *, allowed_roots: tuple[Path, ...] | None = None,
                   allow_pickle: bool = False) -> ModelSource:
    """Turn what the user typed into a ModelSource, refusing what must not be loaded.

    `allowed_roots`, when given (requests from the UI), confines local paths to the app's folders.
    """
    spec = (spec or "").strip()
    if spec in ("", EMBEDDED_NAME):
        if not (EMBEDDED_MODEL / "model_index.json").exists():
            raise ModelLoadError(f"The embedded model is missing from {EMBEDDED_MODEL}. "
                                 "Re-clone the repository or rebuild it with `python -m recipe.train all`.")
        return ModelSource("embedded", str(EMBEDDED_MODEL), EMBEDDED_NAME)
    path = Path(spec).expanduser()
    looks_local = path.exists() or spec.startswith((".", "/", "~")) or path.suffix in PICKLE_SUFFIXES + (".safetensors",)
    if looks_local:
        path = path.resolve()
        if allowed_roots is not None and not any(path.is_relative_to(root.resolve()) for root in allowed_roots):
            roots = ", ".join(str(r) for r in allowed_roots)
            raise ModelLoadError(f"{spec!r} is outside the app's model folders ({roots}). Move or link it into "
                                 "models/, or start the studio with `--model PATH`.")
        if not path.exists():
            raise ModelLoadError(f"No model at {path}: the file or folder does not exist.")
        if path.is_file():
            if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
                raise ModelLoadError(f"{path.name} is a pickled checkpoint, which can run arbitrary code when "
                                     "loaded. Convert it to .safetensors, or start the studio with --allow-pickle "
                                     "if you trust its source.")
            if path.suffix.lower() not in PICKLE_SUFFIXES + (".safetensors",):
                raise ModelLoadError(f"{path.name} is not a model checkpoint: expected a .safetensors file.")
            return ModelSource("file", str(path), path.stem)
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"{path} is not a diffusers model folder (it has no model_index.json).")
        return ModelSource("folder", str(path), path.name)
    if HUB_ID.match(spec):
        return ModelSource("hub", spec, spec)
    raise ModelLoadError(f"{spec!r} is neither an existing path nor a hub id like 'owner/model-name'.")


def file_hash(path: Path) -> str:
    """A1111's "Model hash" (AutoV2): the first 10 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


@dataclass
class LoadedModel:
    source: ModelSource
    pipeline: DiffusionPipeline            # the base (text-to-image) pipeline
    scheduler_config: dict                 # the model's own, kept pristine for every sampler
    derived: dict = field(default_factory=dict)
    _hash: str | None = None

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def model_hash(self) -> str | None:
        if self._hash is None:
            weights = self._weights_file()
            self._hash = file_hash(weights) if weights else None
        return self._hash

    def _weights_file(self) -> Path | None:
        location = Path(self.source.location)
        if self.source.kind == "file":
            return location
        if self.source.kind == "hub":
            location = Path(getattr(self.pipeline, "_internal_dict", {}).get("_name_or_path", "") or "")
        candidates = sorted((location / "unet").glob("*.safetensors")) if location.is_dir() else []
        return candidates[0] if candidates else None


class ModelManager:
    """Loads, holds and releases the one current model; derives task pipelines from it."""

    def __init__(self, memory: MemoryManager, *, allow_pickle: bool = False, models_dir: Path | None = None):
        self.memory = memory
        self.allow_pickle = allow_pickle
        self.models_dir = models_dir or ROOT / "models"
        self.current: LoadedModel | None = None

    # -- loading ---------------------------------------------------------------------------
    # Loading, placing and releasing weights run on the device thread (see pipelines/streaming.py).
    def load(self, spec: str, *, from_ui: bool = False, config: str | None = None) -> LoadedModel:
        """Load `spec` (embedded, folder, .safetensors file or hub id), replacing the current model."""
        return run_on_device_thread(self._load, spec, from_ui=from_ui, config=config)

    def _load(self, spec: str, *, from_ui: bool = False, config: str | None = None) -> LoadedModel:
        roots = (self.models_dir, EMBEDDED_MODEL.parent) if from_ui else None
        source = resolve_source(spec, allowed_roots=roots, allow_pickle=self.allow_pickle)
        self.unload()  # release first: two models at once may not fit
        pipeline = self._from_source(source, config=config)
        return self.adopt(pipeline, source)

    def adopt(self, pipeline: DiffusionPipeline, source: ModelSource) -> LoadedModel:
        """Make an already-built pipeline the current model (used by load, and by tests on tiny models)."""
        return run_on_device_thread(self._adopt, pipeline, source)

    def _adopt(self, pipeline: DiffusionPipeline, source: ModelSource) -> LoadedModel:
        if self.current is not None and self.current.pipeline is not pipeline:
            self.unload()
        pipeline.set_progress_bar_config(disable=True)
        self.memory.place(pipeline)
        self.current = LoadedModel(source=source, pipeline=pipeline,
                                   scheduler_config=dict(pipeline.scheduler.config))
        return self.current

    def _from_source(self, source: ModelSource, *, config: str | None) -> DiffusionPipeline:
        dtype = self.memory.dtype
        use_safetensors = None if self.allow_pickle else True
        try:
            if source.kind in ("embedded", "folder"):
                return AutoPipelineForText2Image.from_pretrained(
                    source.location, dtype=dtype, use_safetensors=use_safetensors)
            if source.kind == "hub":
                return AutoPipelineForText2Image.from_pretrained(
                    source.location, dtype=dtype, use_safetensors=use_safetensors)
            return self._from_single_file(Path(source.location), config=config)
        except ModelLoadError:
            raise
        except Exception as error:  # diffusers/hf_hub raise many kinds; translate them once, here
            if is_out_of_memory(error):
                raise ModelLoadError(f"Not enough memory to load {source.name}: {error}. "
                                     "Try --memory low, or a smaller model.") from error
            raise ModelLoadError(_explain_load_failure(source, error)) from error

    def _from_single_file(self, path: Path, *, config: str | None) -> DiffusionPipeline:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

        checkpoint = load_single_file_checkpoint(str(path))
        model_type = infer_diffusers_model_type(checkpoint)
        del checkpoint  # from_single_file reads the file again; don't hold two copies
        pipeline_class = StableDiffusionXLPipeline if model_type.startswith("xl") else StableDiffusionPipeline
        kwargs = {"dtype": self.memory.dtype}
        if config:
            kwargs["config"] = config
        if pipeline_class is StableDiffusionPipeline:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        return pipeline_class.from_single_file(str(path), **kwargs)

    # -- task pipelines --------------------------------------------------------------------
    def pipeline(self, task: str) -> DiffusionPipeline:
        """The pipeline for `task`, derived once from the loaded base with `from_pipe` (shared weights)."""
        model = self.require()
        if task == "txt2img":
            return model.pipeline
        if task not in model.derived:
            builders = {"img2img": AutoPipelineForImage2Image}
            if task not in builders:
                raise ValueError(f"Unknown task {task!r}; known tasks: {', '.join(TASKS)}.")
            derived = builders[task].from_pipe(model.pipeline)
            derived.set_progress_bar_config(disable=True)
            if self.memory.mode not in (MemoryMode.HIGH, MemoryMode.CPU):
                self.memory.place(derived, mode=self.memory.mode)
            model.derived[task] = derived
        return model.derived[task]

    def require(self) -> LoadedModel:
        if self.current is None:
            raise ValueError("No model is loaded. Load one in the Models & memory tab (the embedded model, a "
                             "folder under models/, a hub id or a .safetensors file), or start with --model.")
        return self.current

    def set_memory_mode(self, mode: MemoryMode) -> None:
        """Re-place the current model (and its derived pipelines) in `mode`."""
        run_on_device_thread(self._set_memory_mode, mode)

    def _set_memory_mode(self, mode: MemoryMode) -> None:
        model = self.require()
        self.memory.place(model.pipeline, mode=mode)
        for derived in model.derived.values():
            self.memory.place(derived, mode=mode)

    # -- releasing -------------------------------------------------------------------------
    def unload(self) -> None:
        """Drop every reference to the current model and give its memory back."""
        run_on_device_thread(self._unload)

    def _unload(self) -> None:
        if self.current is None:
            return
        model, self.current = self.current, None
        for pipeline in [model.pipeline, *model.derived.values()]:
            if hasattr(pipeline, "remove_all_hooks"):
                pipeline.remove_all_hooks()
        model.derived.clear()
        del model
        self.memory.release()


def _hub_offline() -> bool:
    import os

    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _explain_load_failure(source: ModelSource, error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    offline = _hub_offline() or any(word in text for word in (
        "offline", "LocalEntryNotFound", "Cannot reach", "couldn't connect", "Connection", "resolve",
        "outgoing traffic has been disabled"))
    if source.kind == "hub" and offline:
        return (f"{source.location!r} is not in the local Hugging Face cache and cannot be downloaded (no network). "
                f"On a connected machine run `huggingface-cli download {source.location}` (then copy the cache), "
                "or put the model's folder under models/ and load it from there.")
    if source.kind == "hub" and ("404" in text or "not found" in text.lower() or "RepositoryNotFound" in text):
        return f"No model {source.location!r} on the Hugging Face hub (or it is private). Check the id."
    if source.kind == "file" and offline:
        return (f"{Path(source.location).name} needs its architecture's diffusers config, which is not cached and "
                "cannot be downloaded offline. Pass --model-config with a diffusers folder of the same "
                "architecture (for example the embedded model's for SD 1.x-shaped checkpoints).")
    if "safetensors" in text and source.kind != "file":
        return (f"{source.name} has no .safetensors weights (only pickled .bin files?). Convert them, or start "
                "the studio with --allow-pickle if you trust the source.")
    return f"Could not load {source.name}: {text}"
