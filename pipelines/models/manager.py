"""The model manager: one per app. Holds models in named slots and loads them from the embedded
assets, a local folder, a single `.safetensors` checkpoint or a Hugging Face hub id.

Slots: `base` (the model every task runs on; each task's pipeline is derived from it once with `from_pipe`,
sharing its weights), and later `draft` (speculative sampling), `controlnet:NAME` (ControlNets) and LoRA adapters
(peft adapters on the base, chosen per request; pipelines/lora/merged.py). Textual-inversion embeddings are tokens
added to the base's text encoder, each read when a prompt first names it (embeddings.py). `fit(request)` places
what a request needs, given its size, within one memory budget.

The manager owns the slots; reading what goes into them is elsewhere in this package, through the one
path and pickle policy (sources.py): checkpoints.py reads a base model, drafts.py a draft UNet,
controlnets.py a ControlNet. A new model replaces a slot's only once it is read and placed: a failed read
or a failed placement leaves the old one loaded and in use.

All loading, placing and releasing runs on the device worker's thread (pipelines/jobs/worker.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from pipelines.core.paths import DEFAULT_MODELS_DIR, ModelLoadError
from pipelines.core.prompts import LoraUse
from pipelines.core.transformers import denoiser_of
from pipelines.core.vae import execution_device
from pipelines.jobs.worker import DeviceWorker
from pipelines.lora.adapters import LoadedLora, file_stamp, find_lora, load_lora, lora_roots
from pipelines.lora.merged import activate, unmerge
from pipelines.models.checkpoints import read_pipeline
from pipelines.models.controlnets import check_controlnet_fits, read_controlnet
from pipelines.models.drafts import EMBEDDED_DRAFT, check_draft_fits, read_draft
from pipelines.models.embeddings import (embedding_files, embedding_roots, embeddings_in, expand_embedding_names,
                                         load_embedding)
from pipelines.models.memory import MemoryManager, MemoryMode, RequestBudget, is_out_of_memory
from pipelines.models.sources import EMBEDDED_MODEL, EMBEDDED_NAME, ModelSource, file_hash, resolve_source
from pipelines.tasks import TASKS

BASE_SLOT = "base"
DRAFT_SLOT = "draft"
CONTROLNET_SLOT_PREFIX = "controlnet:"


def check_slot(slot: str) -> None:
    if slot in (BASE_SLOT, DRAFT_SLOT) or (slot.startswith(CONTROLNET_SLOT_PREFIX) and
                                          len(slot) > len(CONTROLNET_SLOT_PREFIX)):
        return
    raise ValueError(f"Unknown model slot {slot!r}; slots are {BASE_SLOT!r}, {DRAFT_SLOT!r} and "
                     f"'{CONTROLNET_SLOT_PREFIX}NAME'.")


@dataclass
class LoadedModel:
    """What one slot holds: a pipeline (base, draft) or a single model (a ControlNet)."""
    source: ModelSource
    pipeline: Any                          # the base (text-to-image) pipeline, or the slot's model
    scheduler_config: dict                 # the model's own, kept pristine for every sampler
    derived: dict = field(default_factory=dict)    # task name -> pipeline derived with from_pipe
    previewer: Any = None                  # the live-preview map fitted to this model's VAE
    loras: dict = field(default_factory=dict)      # LoRA name -> LoadedLora: adapters on this model
    embeddings: dict = field(default_factory=dict)  # embedding name -> LoadedEmbedding: tokens in its text encoder
    _hash: str | None = None

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def native_side(self) -> int | None:
        """The image side, in pixels, the model was trained at (UNet's or transformer's sample size × VAE factor)."""
        sample_size = getattr(getattr(denoiser_of(self.pipeline), "config", None), "sample_size", None) or \
            getattr(self.pipeline, "default_sample_size", None)   # Flux's transformer has no sample size
        factor = getattr(self.pipeline, "vae_scale_factor", None)
        return sample_size * factor if isinstance(sample_size, int) and isinstance(factor, int) else None

    @property
    def pipelines(self) -> list:
        """The base pipeline and those derived from it, each once (a task may run on the base itself)."""
        return list({id(pipeline): pipeline for pipeline in (self.pipeline, *self.derived.values())}.values())

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
        candidates = (sorted((location / "unet").glob("*.safetensors")) or sorted((location / "transformer").glob(
            "*.safetensors")) or sorted(location.glob("*.safetensors"))) if location.is_dir() else []
        return candidates[0] if candidates else None


class ModelManager:
    """Loads, holds and releases models in named slots; derives task pipelines from the base."""

    def __init__(self, memory: MemoryManager, *, worker: DeviceWorker | None = None, allow_pickle: bool = False,
                 models_dir: Path | None = None):
        self.memory = memory
        self.worker = worker or DeviceWorker()
        self.allow_pickle = allow_pickle
        self.models_dir = models_dir or DEFAULT_MODELS_DIR
        self.slots: dict[str, LoadedModel] = {}
        self.holder: str | None = None      # what holds the base model as it is (a LoRA training), see hold()
        self._guidance_classifier = None    # the embedded model's, read on first use (guidance_classifier())

    @property
    def lora_dir(self) -> Path:
        return self.models_dir / "lora"

    @property
    def embeddings_dir(self) -> Path:
        return self.models_dir / "embeddings"

    # -- long work that needs the base model as it is ------------------------------------------
    @contextmanager
    def hold(self, holder: str):
        """While the block runs (on the device thread), the base model stays as it is: loading another base
        model, unloading it and changing the memory mode are refused, naming `holder`. A LoRA training holds
        it: those actions would otherwise run at its checkpoints, between two of its steps, under it."""
        if self.holder is not None:
            raise ValueError(f"{self.holder} is already using the loaded model; stop it or let it finish first.")
        self.holder = holder
        try:
            unmerge(self.require().pipeline)   # a training's steps need the adapters as they are
            yield self.require()
        finally:
            self.holder = None

    def _check_not_held(self, action: str) -> None:
        if self.holder is not None:
            raise ValueError(f"Cannot {action} now: {self.holder} is using the loaded model and goes on with it. "
                             "Stop it (it saves what it has trained) or let it finish, then try again.")

    def use_loras(self, uses: list[LoraUse]) -> dict[str, LoadedLora]:
        """Make exactly `uses` the base model's active LoRAs, each file loaded once as an adapter (none: all off)."""
        model = self.require()
        pipeline = model.pipeline
        for use in uses:
            path = find_lora(self.lora_dir, use.name)
            held = model.loras.get(use.name)
            if held is not None and held.path == path.resolve() and held.stamp == file_stamp(held.path):
                continue
            unmerge(pipeline)             # adapters change only on the model's own weights
            if held is not None:          # the file was replaced (retrained, say): load it again
                pipeline.delete_adapters([held.adapter])
                del model.loras[use.name]
            model.loras[use.name] = load_lora(pipeline, use.name, path, roots=lora_roots(self.lora_dir))
        used = [model.loras[use.name] for use in uses]
        activate(pipeline, [lora.adapter for lora in used], [use.weight for use in uses],
                 key=tuple((lora.adapter, use.weight, lora.stamp) for lora, use in zip(used, uses)),
                 may_merge=self.holder is None and self.memory.device.type == "cpu")
        return {use.name: model.loras[use.name] for use in uses}

    def use_embeddings(self, prompt: str, negative_prompt: str) -> tuple[str, str, list[str]]:
        """Load each embedding of models/embeddings/ the texts name into the base model's text encoder (each file
        once, again when it changes); both texts with those names expanded to their tokens; a note for each."""
        model = self.require()
        files = embedding_files(self.embeddings_dir)
        notes, counts = [], {}
        for name in embeddings_in(f"{prompt}\n{negative_prompt}", files):
            held = model.embeddings.get(name)
            if held is None or held.path != files[name].resolve() or held.stamp != file_stamp(held.path):
                try:
                    model.embeddings[name] = self._while_placed_whole(
                        model, load_embedding, model.pipeline, name, files[name],
                        roots=embedding_roots(self.embeddings_dir), allow_pickle=self.allow_pickle)
                except ValueError as error:     # made for another model, or a pickle: the word stays a word
                    model.embeddings.pop(name, None)
                    notes.append(f"Embedding {name} not applied, the word is read as text: {error}")
                    continue
            counts[name] = model.embeddings[name].vectors
        notes += [f"Embedding {name}: {count} vector{'s' if count != 1 else ''}." for name, count in counts.items()]
        return expand_embedding_names(prompt, counts), expand_embedding_names(negative_prompt, counts), notes

    def _while_placed_whole(self, model: LoadedModel, work, *args, **kwargs):
        """`work(*args, **kwargs)` with `model`'s weights real: sequential offload keeps them on the meta device,
        so they are parked in RAM for it and placed again after."""
        if self.memory.mode is not MemoryMode.SEQUENTIAL:
            return work(*args, **kwargs)
        self._check_not_held("place the model again for an embedding")
        self._park(model)
        try:
            return work(*args, **kwargs)
        finally:
            self._place_resident(self.memory.mode)

    @property
    def current(self) -> LoadedModel | None:
        """The base model, or None."""
        return self.slots.get(BASE_SLOT)

    # -- loading ---------------------------------------------------------------------------
    def load(self, spec: str, *, slot: str = BASE_SLOT, from_ui: bool = False, config: str | None = None) -> LoadedModel:
        """Load `spec` (embedded, folder, .safetensors file or hub id) into `slot`, replacing what it held.
        The new model is read and placed before the old one is released, so a failed load keeps the old one."""
        return self.worker.call(self._load, spec, slot=slot, from_ui=from_ui, config=config)

    def _load(self, spec: str, *, slot: str, from_ui: bool, config: str | None) -> LoadedModel:
        check_slot(slot)
        if slot == BASE_SLOT:
            self._check_not_held("load another model")
        roots = (self.models_dir, EMBEDDED_MODEL.parent) if from_ui else None
        if slot == DRAFT_SLOT:
            return self._load_draft(spec, roots)
        source = resolve_source(spec, allowed_roots=roots, allow_pickle=self.allow_pickle)
        # read into RAM; the old model still serves
        pipeline = read_pipeline(source, dtype=self.memory.dtype, allow_pickle=self.allow_pickle, config=config)
        return self._adopt(pipeline, source, slot)

    def _load_draft(self, spec: str, roots: tuple[Path, ...] | None) -> LoadedModel:
        """A draft UNet for speculative sampling (drafts.py) into the draft slot."""
        unet, source = read_draft(spec, roots=roots, dtype=self.memory.dtype, allow_pickle=self.allow_pickle)
        return self._adopt(unet, source, DRAFT_SLOT)

    def draft_unet(self):
        """The draft UNet for the speculative sampler's "draft model" (on the device thread): the draft slot's,
        else, under the embedded model, its shipped draft (loaded into the slot once). It reads the base
        model's prompt embeddings, so its latent channels and text width must be the base UNet's."""
        base = self.require()
        held = self.slots.get(DRAFT_SLOT)
        if held is None:
            if base.source.kind != "embedded" or not (EMBEDDED_DRAFT / "config.json").exists():
                raise ValueError(f"The draft model needs a draft UNet for {base.name}: load one into the draft slot "
                                 "(a small UNet trained to imitate this model), or use the frozen target draft, "
                                 "which needs no model.")
            held = self._load_draft(EMBEDDED_NAME, None)
        check_draft_fits(held, base)
        return self._on_base_device(held.pipeline, base)

    def guidance_classifier(self):
        """The noise-aware classifier for classifier guidance (pipelines/guidance/classifier.py), read once: the
        embedded model ships one trained on its latents (recipe/classifier.py); no other model has one yet."""
        base = self.require()
        if base.source.kind != "embedded":
            raise ValueError(f"Classifier guidance needs a noise-aware classifier trained on {base.name}'s latents; the "
                             "studio ships one for the embedded model only. Load the embedded model, or use CFG or PAG.")
        if self._guidance_classifier is None:
            from pipelines.guidance.classifier import load_guidance_classifier
            self._guidance_classifier = load_guidance_classifier()
        return self._guidance_classifier

    def controlnet(self, name: str):
        """The ControlNet `name` (on the device thread), loaded into its slot `controlnet:NAME` once: a shipped
        one (assets/emoji-controlnet-*), a folder or `.safetensors` file under models/controlnet/, or a hub id
        already in the local cache. It must fit the base model; it computes where the base UNet does."""
        base = self.require()
        slot = CONTROLNET_SLOT_PREFIX + name
        held = self.slots.get(slot)
        if held is None:
            model, source = read_controlnet(name, base, models_dir=self.models_dir, dtype=self.memory.dtype,
                                            allow_pickle=self.allow_pickle)
            check_controlnet_fits(model, name, base)
            held = self._adopt(model.eval(), source, slot)
        check_controlnet_fits(held.pipeline, name, base)
        return self._on_base_device(held.pipeline, base)

    @staticmethod
    def _on_base_device(model, base: LoadedModel):
        # a lone model is not moved by the base's offload hooks: it computes where the base UNet does
        device = execution_device(denoiser_of(base.pipeline))
        if model.device != device:
            model.to(device)
        return model

    def adopt(self, pipeline, source: ModelSource, *, slot: str = BASE_SLOT) -> LoadedModel:
        """Put an already-built pipeline (or model) into `slot` (used by load, and by tests on tiny models)."""
        return self.worker.call(self._adopt, pipeline, source, slot)

    def _adopt(self, pipeline, source: ModelSource, slot: str) -> LoadedModel:
        """Put `pipeline` into `slot` and on the device. The model the slot held leaves the device first (the
        device may not hold both) but is kept until the new one is placed: when placing fails (out of memory,
        a device that refuses), the new one is let go and the old one placed back, and the error says so."""
        check_slot(slot)
        if slot == BASE_SLOT:
            self._check_not_held("replace the model")
        replaced = self.slots.get(slot)
        if replaced is not None and replaced.pipeline is pipeline:
            replaced = None           # the same pipeline again: there is nothing to let go
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        scheduler = getattr(pipeline, "scheduler", None)
        model = LoadedModel(source, pipeline, {"_class_name": type(scheduler).__name__, **scheduler.config}
                            if scheduler is not None else {})   # named as a saved config is
        mode_before = self.memory.mode
        try:
            if replaced is not None:
                self._park(replaced)
            self.slots[slot] = model
            self._place_new(model, slot)
        except Exception as error:   # whatever the device said: the old model must survive it
            raise self._restore(slot, replaced, model, mode_before, error) from error
        if replaced is not None:
            self._strip(replaced)
            replaced = None           # the last reference: its weights are freed by the release
            self.memory.release()
        return model

    def _place_new(self, model: LoadedModel, slot: str) -> None:
        base = model if slot == BASE_SLOT else self.current
        side = model.native_side or (base.native_side if base else None) or 512
        mode = self.memory.mode_for(self._resident(), width=side, height=side)
        if mode is self.memory.mode:
            self.memory.place(model.pipeline, mode=mode)
        else:
            self._place_all(mode)     # one mode for everything resident

    def _park(self, model: LoadedModel) -> None:
        """Move `model` off the device (into RAM), whole, to be placed again or let go."""
        self.memory.park(*model.pipelines)

    def _restore(self, slot: str, old: LoadedModel | None, new: LoadedModel, mode: MemoryMode,
                 error: Exception) -> ModelLoadError:
        """After `new` could not be placed: let it go, put `old` back into `slot` and everything resident back
        in `mode`. Returns the error to raise, which says what failed and what is loaded now."""
        if old is None:
            self.slots.pop(slot, None)
        else:
            self.slots[slot] = old
        self._strip(new)
        failed = f"Could not place {new.name} on {self.memory.device} ({type(error).__name__}: {error})"
        hint = " Not enough device memory: choose a lower memory mode (--memory low, or in the Models & memory " \
               "tab) or a smaller model." if is_out_of_memory(error) else ""
        try:
            self._park(new)   # what of it reached the device leaves it now, though the error still refers to it
            if self.memory.mode is not mode:     # the attempt re-placed what was resident: all of it goes back
                self._place_resident(mode)
            elif old is not None:                # only the parked model: the others were not touched
                for pipeline in old.pipelines:
                    self.memory.place(pipeline, mode=mode)
        except Exception as again:    # the device refuses what it held a moment ago: hold nothing half placed
            if old is not None:
                self.slots.pop(slot, None)
                self._strip(old)
                self.memory.release()
            lost = f"{old.name} could not be placed back either, so the {slot} slot is empty now" \
                if old is not None else "the models already loaded could not be placed back either"
            return ModelLoadError(f"{failed}, and {lost} ({type(again).__name__}: {again}). Load the model "
                                  f"again.{hint}")
        kept = f"{old.name} is still loaded and in use" if old is not None else f"the {slot} slot stays empty"
        return ModelLoadError(f"{failed}; {kept}.{hint}")

    def _resident(self) -> list:
        return [model.pipeline for model in self.slots.values()]

    # -- task pipelines --------------------------------------------------------------------
    def pipeline(self, task: str) -> DiffusionPipeline:
        """The pipeline for `task`, derived once from the base by the task's registry entry (shared weights)."""
        model = self.require()
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; known tasks: {', '.join(TASKS)}.")
        if task not in model.derived:
            derived = TASKS[task].derive(model.pipeline)
            if derived is not model.pipeline:
                derived.set_progress_bar_config(disable=True)
                if self.memory.mode not in (MemoryMode.HIGH, MemoryMode.CPU):
                    # offloading it re-hooks the UNet and VAE it shares with the base
                    self._check_not_held(f"prepare the {TASKS[task].label} pipeline in memory mode "
                                         f"{self.memory.mode.value} (its offload re-hooks the model's UNet)")
                    self.memory.place(derived, mode=self.memory.mode)
            model.derived[task] = derived
        return model.derived[task]

    def require(self) -> LoadedModel:
        if self.current is None:
            raise ValueError("No model is loaded. Load one in the Models & memory tab (the embedded model, a "
                             "folder under models/, a hub id or a .safetensors file), or start with --model.")
        return self.current

    # -- memory ----------------------------------------------------------------------------
    def fit(self, request) -> MemoryMode:
        """Place what `request` needs (its slots' weights, its size and batch) within the memory budget:
        refused before anything is allocated when no mode has room for it (`MemoryManager.budget`), re-placed
        only when the mode this request calls for differs from the current one."""
        needed = [self.slots[name].pipeline for name in request.slots() if name in self.slots]
        self.memory.budget(needed).check(width=request.width, height=request.height, batch_size=request.batch_size,
                                         rows_per_image=request.model_batch() // request.batch_size)
        mode = self.memory.mode_for(needed, width=request.width, height=request.height,
                                    batch_size=request.model_batch())
        if mode is not self.memory.mode:
            self._check_not_held(f"switch from memory mode {self.memory.mode.value} to {mode.value}, which this "
                                 f"{request.width}×{request.height} request (batch {request.batch_size}) needs,")
            self._place_all(mode)
        return mode

    def budget(self) -> RequestBudget | None:
        """The largest request the base model leaves room for now (None without a model), for the status."""
        return self.memory.budget([self.current.pipeline]) if self.current is not None else None

    def set_memory_mode(self, choice: str | MemoryMode) -> MemoryMode:
        """Use memory mode `choice` (`auto` or a mode) from now on, re-placing every loaded pipeline
        (derived ones too) on the device thread. Returns the mode in force."""
        return self.worker.call(self._set_memory_mode, choice)

    def _set_memory_mode(self, choice: str | MemoryMode) -> MemoryMode:
        choice = choice.value if isinstance(choice, MemoryMode) else choice
        if choice not in ("auto", *(mode.value for mode in MemoryMode if mode is not MemoryMode.CPU)):
            raise ValueError(f"Unknown memory mode {choice!r}; choose auto, high, balanced, low or sequential.")
        self._check_not_held(f"change the memory mode to {choice}")   # before the choice is recorded
        self.memory.requested_mode = choice
        if self.current is None:
            return self.memory.mode
        side = self.current.native_side or 512
        mode = self.memory.mode_for(self._resident(), width=side, height=side)
        self._place_all(mode)
        return mode

    def _place_all(self, mode: MemoryMode) -> None:
        self._check_not_held(f"change the memory mode to {mode.value}")
        self._place_resident(mode)

    def _place_resident(self, mode: MemoryMode) -> None:
        for model in self.slots.values():
            for pipeline in model.pipelines:
                self.memory.place(pipeline, mode=mode)

    # -- releasing -------------------------------------------------------------------------
    def unload(self, slot: str = BASE_SLOT) -> None:
        """Drop every reference to the model in `slot` and give its memory back."""
        self.worker.call(self._unload, slot)

    def _unload(self, slot: str) -> None:
        if slot == BASE_SLOT and slot in self.slots:
            self._check_not_held("unload the model")
        if (model := self.slots.pop(slot, None)) is None:
            return
        self._strip(model)
        del model
        self.memory.release()

    @staticmethod
    def _strip(model: LoadedModel) -> None:
        """Drop what ties `model`'s weights to the device and to the manager (offload hooks, derived pipelines,
        the preview map), so that they are freed with the last reference to it."""
        for pipeline in model.pipelines:
            if hasattr(pipeline, "remove_all_hooks"):
                pipeline.remove_all_hooks()
        model.derived.clear()
        model.previewer = None
