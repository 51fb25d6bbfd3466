"""The model manager: one per app. Holds models in named slots and loads them from the embedded
assets, a local folder, a single `.safetensors` checkpoint or a Hugging Face hub id.

Slots: `base` (the model every task runs on; each task's pipeline is derived from it once with
`from_pipe`, sharing its weights), and later `draft` (speculative sampling), `controlnet:NAME`
(ControlNets) and LoRA adapters (peft adapters on the base, chosen per request, never merged).
`fit(request)` places what a request needs, given its size, within one memory budget.

All loading, placing and releasing runs on the device worker's thread (pipelines/jobs.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers import AutoPipelineForText2Image, DiffusionPipeline

from pipelines.core.paths import ASSETS_DIR, DEFAULT_MODELS_DIR
from pipelines.core.vae import execution_device
from pipelines.jobs.worker import DeviceWorker
from pipelines.core.prompts import LoraUse
from pipelines.lora.adapters import LoadedLora, file_stamp, load_lora, lora_files
from pipelines.models.memory import MemoryManager, MemoryMode, RequestBudget, is_out_of_memory
from pipelines.models.sources import (EMBEDDED_MODEL, EMBEDDED_NAME, HUB_ID, PICKLE_SUFFIXES, ModelLoadError, ModelSource,
                                      _explain_load_failure, _from_hub, file_hash, resolve_source)
from pipelines.tasks import TASKS

EMBEDDED_DRAFT = ASSETS_DIR / "emoji-ldm-draft"   # the embedded model's draft UNet (recipe/draft.py)
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
    _hash: str | None = None

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def native_side(self) -> int | None:
        """The image side, in pixels, the model was trained at (UNet sample size × VAE factor)."""
        sample_size = getattr(getattr(getattr(self.pipeline, "unet", None), "config", None), "sample_size", None)
        factor = getattr(self.pipeline, "vae_scale_factor", None)
        return sample_size * factor if isinstance(sample_size, int) and isinstance(factor, int) else None

    @property
    def pipelines(self) -> list:
        return [self.pipeline, *self.derived.values()]

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
        candidates = (sorted((location / "unet").glob("*.safetensors")) or sorted(location.glob("*.safetensors"))) \
            if location.is_dir() else []
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

    @property
    def lora_dir(self) -> Path:
        return self.models_dir / "lora"

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
            yield self.require()
        finally:
            self.holder = None

    def _check_not_held(self, action: str) -> None:
        if self.holder is not None:
            raise ValueError(f"Cannot {action} now: {self.holder} is using the loaded model and goes on with it. "
                             "Stop it (it saves what it has trained) or let it finish, then try again.")

    def use_loras(self, uses: list[LoraUse]) -> dict[str, LoadedLora]:
        """Make exactly `uses` the active LoRAs of the base model (on the device thread), loading each file
        once as an adapter; with none, the adapters are switched off. Returns the LoRAs in use."""
        model = self.require()
        pipeline = model.pipeline
        available = lora_files(self.lora_dir)
        for use in uses:
            held = model.loras.get(use.name)
            if held is not None and use.name in available and held.path == available[use.name] and \
                    held.stamp == file_stamp(held.path):
                continue
            if held is not None:          # the file was replaced (retrained, say): load it again
                pipeline.delete_adapters([held.adapter])
                del model.loras[use.name]
            if use.name not in available:
                names = ", ".join(available) or "none"
                raise ValueError(f"No LoRA named {use.name!r} in {self.lora_dir} (available: {names}). Put its "
                                 ".safetensors file there, or fix the name in <lora:…>.")
            model.loras[use.name] = load_lora(pipeline, use.name, available[use.name])
        if uses:
            pipeline.enable_lora()
            pipeline.set_adapters([model.loras[use.name].adapter for use in uses],
                                  adapter_weights=[use.weight for use in uses])
        elif getattr(pipeline.unet, "peft_config", None):   # any adapter: a loaded LoRA, or one in training
            pipeline.disable_lora()
        return {use.name: model.loras[use.name] for use in uses}

    @property
    def current(self) -> LoadedModel | None:
        """The base model, or None."""
        return self.slots.get(BASE_SLOT)

    # -- loading ---------------------------------------------------------------------------
    def load(self, spec: str, *, slot: str = BASE_SLOT, from_ui: bool = False, config: str | None = None) -> LoadedModel:
        """Load `spec` (embedded, folder, .safetensors file or hub id) into `slot`, replacing what it held.
        The new model is read before the old one is released, so a failed load keeps the old one."""
        return self.worker.call(self._load, spec, slot=slot, from_ui=from_ui, config=config)

    def _load(self, spec: str, *, slot: str, from_ui: bool, config: str | None) -> LoadedModel:
        check_slot(slot)
        if slot == BASE_SLOT:
            self._check_not_held("load another model")
        roots = (self.models_dir, EMBEDDED_MODEL.parent) if from_ui else None
        if slot == DRAFT_SLOT:
            return self._load_draft(spec, roots)
        source = resolve_source(spec, allowed_roots=roots, allow_pickle=self.allow_pickle)
        pipeline = self._from_source(source, config=config)   # read into RAM; the old model still serves
        return self._adopt(pipeline, source, slot)

    def _load_draft(self, spec: str, roots: tuple[Path, ...] | None) -> LoadedModel:
        """A draft UNet for speculative sampling: a UNet folder (config.json + safetensors), or a diffusers
        model folder whose UNet is taken; "embedded" (or nothing) is the embedded model's shipped draft."""
        from diffusers import UNet2DConditionModel

        path = EMBEDDED_DRAFT if (spec or "").strip() in ("", EMBEDDED_NAME) else Path(spec).expanduser().resolve()
        if roots is not None and not any(path.is_relative_to(root.resolve()) for root in roots):
            raise ModelLoadError(f"{spec!r} is outside the app's model folders; move or link the draft into models/.")
        folder = path / "unet" if (path / "model_index.json").exists() else path
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"No draft UNet at {path}: expected a UNet folder (config.json and .safetensors "
                                 "weights) or a diffusers model folder with a unet/ subfolder.")
        try:
            unet = UNet2DConditionModel.from_pretrained(folder, dtype=self.memory.dtype,
                                                        use_safetensors=None if self.allow_pickle else True)
        except Exception as error:
            raise ModelLoadError(f"Could not load a draft UNet from {folder}: {type(error).__name__}: {error}") \
                from error
        return self._adopt(unet.eval(), ModelSource("folder", str(folder), path.name), DRAFT_SLOT)

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
        draft, unet = held.pipeline.config, base.pipeline.unet.config
        for key in ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type"):
            if draft.get(key) != unet.get(key):
                raise ValueError(f"The draft UNet ({held.name}) does not fit {base.name}: its {key} is "
                                 f"{draft.get(key)}, the model's is {unet.get(key)}. Load a draft made for this model.")
        # a lone model is not moved by the base's offload hooks: it computes where the base UNet does
        device = execution_device(base.pipeline.unet)
        if held.pipeline.device != device:
            held.pipeline.to(device)
        return held.pipeline

    def controlnet(self, name: str):
        """The ControlNet `name` (on the device thread), loaded into its slot `controlnet:NAME` once: a shipped
        one (assets/emoji-controlnet-*), a folder or `.safetensors` file under models/controlnet/, or a hub id
        already in the local cache. It must fit the base model; it computes where the base UNet does."""
        base = self.require()
        slot = CONTROLNET_SLOT_PREFIX + name
        held = self.slots.get(slot)
        if held is None:
            model, source = self._read_controlnet(name, base)
            check_controlnet_fits(model, name, base)
            held = self._adopt(model.eval(), source, slot)
        check_controlnet_fits(held.pipeline, name, base)
        device = execution_device(base.pipeline.unet)
        if held.pipeline.device != device:
            held.pipeline.to(device)
        return held.pipeline

    def _read_controlnet(self, name: str, base: LoadedModel):
        from diffusers import ControlNetModel

        from pipelines.models.controlnets import SHIPPED_CONTROLNETS

        use_safetensors = None if self.allow_pickle else True
        if name in SHIPPED_CONTROLNETS:
            folder = SHIPPED_CONTROLNETS[name]
            return (ControlNetModel.from_pretrained(folder, dtype=self.memory.dtype, use_safetensors=True),
                    ModelSource("embedded", str(folder), name))
        root = (self.models_dir / "controlnet").resolve()
        path = (root / name).resolve()
        if (root / name).exists() or "/" not in name or name.startswith((".", "/", "~")):
            if not path.is_relative_to(root):
                raise ModelLoadError(f"ControlNet {name!r} is outside models/controlnet/; put ControlNets there "
                                     "(a diffusers folder or a .safetensors file).")
            if not path.exists():
                raise ModelLoadError(f"No ControlNet {name!r}: it is not shipped and not in {root}. Put a diffusers "
                                     "ControlNet folder or a .safetensors file there.")
            if path.is_file():
                return self._controlnet_file(path, base), ModelSource("file", str(path), name)
            if not (path / "config.json").exists():
                raise ModelLoadError(f"{path} is not a diffusers ControlNet folder (it has no config.json).")
            try:
                model = ControlNetModel.from_pretrained(path, dtype=self.memory.dtype, use_safetensors=use_safetensors)
            except Exception as error:
                raise ModelLoadError(f"Could not load the ControlNet in {path}: {type(error).__name__}: {error}") \
                    from error
            return model, ModelSource("folder", str(path), name)
        if not HUB_ID.match(name):
            raise ModelLoadError(f"{name!r} is neither a ControlNet under models/controlnet/ nor a hub id.")
        try:
            model = ControlNetModel.from_pretrained(name, dtype=self.memory.dtype, use_safetensors=use_safetensors,
                                                    local_files_only=True)
        except Exception as error:
            raise ModelLoadError(f"The ControlNet {name!r} is not in the local Hugging Face cache, and nothing is "
                                 "downloaded here: copy it into models/controlnet/ (a folder with config.json and "
                                 "its .safetensors weights).") from error
        return model, ModelSource("hub", name, name)

    def _controlnet_file(self, path: Path, base: LoadedModel):
        """A single-file ControlNet: diffusers' own keys (save_pretrained's weights), or the original layout
        (`control_model.…`, as A1111 uses them) converted by diffusers with a config made for the base model."""
        import tempfile

        from diffusers import ControlNetModel
        from safetensors.torch import load_file

        if path.suffix.lower() in PICKLE_SUFFIXES and not self.allow_pickle:
            raise ModelLoadError(f"{path.name} is a pickled checkpoint, which can run arbitrary code when loaded. "
                                 "Convert it to .safetensors, or start the studio with --allow-pickle.")
        if path.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"{path.name} is not a ControlNet checkpoint: expected a .safetensors file.")
        try:
            state = load_file(str(path))
        except Exception as error:
            raise ModelLoadError(f"{path.name} is not a readable .safetensors file: {error}") from error
        template = ControlNetModel.from_unet(base.pipeline.unet, load_weights_from_unet=False,
                                             **_condition_embedding_config(state))
        if any(key.startswith("controlnet_cond_embedding.") for key in state):
            model_keys = template.state_dict()
            wrong = [key for key, value in state.items() if key in model_keys and value.shape != model_keys[key].shape]
            if wrong or set(model_keys) - set(state):
                raise ModelLoadError(
                    f"The ControlNet {path.name} does not fit {base.name}: "
                    + (f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, the model needs "
                       f"{tuple(model_keys[wrong[0]].shape)}" if wrong else
                       f"it lacks {len(set(model_keys) - set(state))} of the weights a ControlNet for it has")
                    + ". Pick a ControlNet made for this model's family.")
            template.load_state_dict(state)
            return template.to(self.memory.dtype)
        with tempfile.TemporaryDirectory() as folder:
            template.save_config(folder)
            try:
                return ControlNetModel.from_single_file(str(path), config=folder, dtype=self.memory.dtype,
                                                        local_files_only=True)
            except Exception as error:
                raise ModelLoadError(f"Could not read {path.name} as a ControlNet for {base.name} "
                                     f"({type(error).__name__}: {error}). Is it a ControlNet for this model family?") \
                    from error

    def adopt(self, pipeline, source: ModelSource, *, slot: str = BASE_SLOT) -> LoadedModel:
        """Put an already-built pipeline (or model) into `slot` (used by load, and by tests on tiny models)."""
        return self.worker.call(self._adopt, pipeline, source, slot)

    def _adopt(self, pipeline, source: ModelSource, slot: str) -> LoadedModel:
        check_slot(slot)
        if slot == BASE_SLOT:
            self._check_not_held("replace the model")
        held = self.slots.get(slot)
        if held is not None and held.pipeline is not pipeline:
            self._unload(slot)  # release first: the device may not hold both
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        scheduler = getattr(pipeline, "scheduler", None)
        model = LoadedModel(source=source, pipeline=pipeline,
                            scheduler_config=dict(scheduler.config) if scheduler is not None else {})
        self.slots[slot] = model
        side = model.native_side or (self.current.native_side if self.current else None) or 512
        mode = self.memory.mode_for(self._resident(), width=side, height=side)
        if mode is self.memory.mode:
            self.memory.place(pipeline, mode=mode)
        else:
            self._place_all(mode)     # one mode for everything resident
        return model

    def _resident(self) -> list:
        return [model.pipeline for model in self.slots.values()]

    def _from_source(self, source: ModelSource, *, config: str | None) -> DiffusionPipeline:
        dtype = self.memory.dtype
        use_safetensors = None if self.allow_pickle else True
        try:
            if source.kind in ("embedded", "folder"):
                return AutoPipelineForText2Image.from_pretrained(
                    source.location, dtype=dtype, use_safetensors=use_safetensors)
            if source.kind == "hub":
                return _from_hub(source, dtype=dtype, use_safetensors=use_safetensors)
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

        try:
            checkpoint = load_single_file_checkpoint(str(path))
        except Exception as error:   # before diffusers' config lookup, whose offline error would hide this one
            raise ModelLoadError(f"{path.name} is not a readable checkpoint ({type(error).__name__}: {error}); it "
                                 "may be truncated or not a model at all. Download or export it again.") from error
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
        """The pipeline for `task`, derived once from the base by the task's registry entry (shared weights)."""
        model = self.require()
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; known tasks: {', '.join(TASKS)}.")
        if task not in model.derived:
            derived = TASKS[task].derive(model.pipeline)
            if derived is not model.pipeline:
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
        self.memory.requested_mode = choice
        if self.current is None:
            return self.memory.mode
        side = self.current.native_side or 512
        mode = self.memory.mode_for(self._resident(), width=side, height=side)
        self._place_all(mode)
        return mode

    def _place_all(self, mode: MemoryMode) -> None:
        self._check_not_held(f"change the memory mode to {mode.value}")
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
        model = self.slots.pop(slot, None)
        if model is None:
            return
        for pipeline in model.pipelines:
            if hasattr(pipeline, "remove_all_hooks"):
                pipeline.remove_all_hooks()
        model.derived.clear()
        model.previewer = None
        del model
        self.memory.release()


def _condition_embedding_config(state: dict) -> dict:
    """The control-image encoder's shape, read off a diffusers-format state dict (a lone file has no config):
    conv_in, then per level a conv and a strided conv whose output widths are the level's channels."""
    conv_in = state.get("controlnet_cond_embedding.conv_in.weight")
    if conv_in is None:
        return {}
    channels, block = [conv_in.shape[0]], 1
    while f"controlnet_cond_embedding.blocks.{block}.weight" in state:
        channels.append(state[f"controlnet_cond_embedding.blocks.{block}.weight"].shape[0])
        block += 2
    return {"conditioning_embedding_out_channels": tuple(channels), "conditioning_channels": conv_in.shape[1]}


FAMILY_BY_TEXT_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 256: "the embedded model"}


def check_controlnet_fits(controlnet, name: str, base: LoadedModel) -> None:
    """Refuse a ControlNet whose residuals would not fit the base model's UNet, naming the mismatch (instead
    of a shape error in the middle of a generation)."""
    unet, config = base.pipeline.unet.config, controlnet.config
    for key in ("cross_attention_dim", "in_channels", "block_out_channels", "down_block_types", "layers_per_block",
                "addition_embed_type"):
        ours, theirs = unet.get(key), config.get(key)
        if isinstance(ours, (list, tuple)):
            ours, theirs = list(ours), list(theirs or [])
        if ours != theirs:
            family = ""
            if key == "cross_attention_dim":
                family = (f" (a ControlNet for {FAMILY_BY_TEXT_WIDTH.get(theirs, 'another model family')}, on "
                          f"{FAMILY_BY_TEXT_WIDTH.get(ours, 'a different family')})")
            raise ValueError(f"The ControlNet {name} does not fit {base.name}: its {key} is {theirs}, the model's is "
                             f"{ours}{family}. Pick a ControlNet made for this model.")
    factor = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
    vae_factor = getattr(base.pipeline, "vae_scale_factor", factor)
    if factor != vae_factor:
        raise ValueError(f"The ControlNet {name} reads its control image at 1/{factor} scale, but {base.name}'s "
                         f"latents are 1/{vae_factor} of the image. Pick a ControlNet made for this model.")


