"""What each training method trains, and what it saves.

- `LoraMethod` (LoRA and DreamBooth): peft LoRA adapters on the UNet's transformer blocks (kohya's default
  LoRA: the attention projections, the feed-forward layers and proj_in/proj_out) and, when asked, on the text
  encoder's attention; B zero-initialised and A Gaussian, so at step 0 the model is unchanged. Saved as one
  kohya / A1111 file (pipelines/lora/export.py).
- `TextualInversion`: new token vectors, the only parameters that train; the text encoder's embedding table
  is never written during training: a forward hook on it puts the vectors in for the new tokens' positions,
  so the gradient reaches the vectors alone (Gal et al. 2022). Saved as an A1111 / kohya embedding
  (`emb_params`, pipelines/models/embeddings.py), which diffusers' `load_textual_inversion` reads too.

`Objective` is what a training step differentiates, one module, so that accelerate can wrap it for
data-parallel training (DDP): for each part of a batch (the instance images, DreamBooth's class images),
each row's squared error of the UNet's prediction.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from pipelines.models.embeddings import expand_embedding_names, install_embedding, save_embedding

# The feed-forward layers matter for a style: with the attention alone, a grayscale style trained with the
# defaults moved held-out prompts 43% of the way, with them 63% (bench/training_generalisation.py)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class TokenVectors(torch.nn.Module):
    """Textual inversion's trainable vectors and the token ids they stand for."""

    def __init__(self, vectors: torch.Tensor, token_ids: list[int], vocabulary: int):
        super().__init__()
        self.vectors = torch.nn.Parameter(vectors.detach().float().clone())
        slots = torch.full((vocabulary,), -1, dtype=torch.long)
        slots[torch.tensor(token_ids)] = torch.arange(len(token_ids))
        self.register_buffer("slots", slots, persistent=False)

    @contextmanager
    def substituted(self, text_encoder):
        """While the block runs, the text encoder's token embedding reads the trainable vectors for the new
        tokens (and its own table for every other token)."""
        def put_in(module, inputs, output):
            slot = self.slots.to(inputs[0].device)[inputs[0]]
            vectors = self.vectors.to(output.device, output.dtype)[slot.clamp(min=0).to(output.device)]
            return torch.where((slot >= 0).unsqueeze(-1).to(output.device), vectors, output)
        handle = text_encoder.get_input_embeddings().register_forward_hook(put_in)
        try:
            yield
        finally:
            handle.remove()


class Objective(torch.nn.Module):
    """Each row's ‖target − prediction‖² for the parts of one batch; a part's captions either come as
    embeddings (a frozen text encoder's, cached) or as token ids, encoded here (a text encoder with a LoRA
    that trains, or textual inversion's vectors)."""

    def __init__(self, unet, text_encoder, tokens: TokenVectors | None):
        super().__init__()
        self.unet, self.text_encoder, self.tokens = unet, text_encoder, tokens

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        if self.tokens is None:
            return self.text_encoder(input_ids.to(device))[0]
        with self.tokens.substituted(self.text_encoder):
            return self.text_encoder(input_ids.to(device))[0]

    def forward(self, parts: list[dict]) -> list[torch.Tensor]:
        contexts = [part["context"] if part.get("input_ids") is None else self.encode(part["input_ids"])
                    for part in parts]
        shapes = {(part["x_t"].shape[1:], context.shape[1:]) for part, context in zip(parts, contexts)}
        if len(parts) > 1 and len(shapes) == 1:
            # parts of one shape (DreamBooth's instance and class rows, as diffusers' script does) go in one call
            joined = {key: torch.cat([part[key] for part in parts]) for key in ("x_t", "t", "target")}
            if "added" in parts[0]:
                joined["added"] = {key: torch.cat([part["added"][key] for part in parts]) for key in parts[0]["added"]}
            parts = [joined | {"sizes": [len(part["t"]) for part in parts]}]
            contexts = [torch.cat(contexts)]
        errors = []
        for part, context in zip(parts, contexts):
            prediction = self.unet(part["x_t"], part["t"], encoder_hidden_states=context.to(part["x_t"].dtype),
                                   added_cond_kwargs=part.get("added")).sample
            errors.append((prediction.float() - part["target"].float()).square().mean(dim=(1, 2, 3)))
        return list(errors[0].split(parts[0]["sizes"])) if "sizes" in parts[0] else errors


class LoraMethod:
    """LoRA adapters on the UNet (and the text encoder): LoRA and DreamBooth."""

    def __init__(self, run):
        self.run = run
        self.text = run.request.train_text_encoder      # the captions are encoded at every step

    def install(self) -> None:
        """Nothing to put in before the data is read."""

    def expand(self, prompt: str) -> str:
        return prompt

    def setup(self) -> list[torch.nn.Parameter]:
        """Fresh adapters (A's Gaussian from the seed), the only parameters that train; returns them."""
        from peft import LoraConfig

        request, parameters = self.run.request, []
        _remove_adapter(self.run.pipeline, self.run.adapter)
        freeze(self.run.pipeline)
        for _, module, targets in self._modules():
            with torch.random.fork_rng():          # A's Gaussian comes from the seed, the global RNG is left alone
                torch.manual_seed(request.seed)
                module.add_adapter(LoraConfig(r=request.rank, lora_alpha=request.alpha, init_lora_weights="gaussian",
                                              target_modules=targets), adapter_name=self.run.adapter)
            parameters += _only_adapter_trains(module, self.run.adapter)
        self.train_mode()
        return parameters

    def _modules(self) -> list[tuple]:
        pipeline = self.run.pipeline
        return [("unet", pipeline.unet, UNET_TARGETS)] + \
            ([("text_encoder", pipeline.text_encoder, TEXT_ENCODER_TARGETS)] if self.text else [])

    def objective(self) -> Objective:
        """The UNet, and the text encoder only when it trains (DDP then reduces what trains, nothing more)."""
        return Objective(self.run.pipeline.unet, self.run.pipeline.text_encoder if self.text else None, None)

    def train_mode(self) -> None:
        """The adapter in training on, alone (a generation in between may have switched it off or others on)."""
        pipeline = self.run.pipeline
        pipeline.enable_lora()
        pipeline.set_adapters([self.run.adapter])
        pipeline.unet.train()
        pipeline.text_encoder.train(self.text)

    def use(self, *, trained: bool) -> None:
        """For sampling: every adapter off (a loaded LoRA's text-encoder part too), then this one on if `trained`."""
        pipeline = self.run.pipeline
        pipeline.disable_lora()
        if trained:
            pipeline.enable_lora()
            pipeline.set_adapters([self.run.adapter])
        pipeline.unet.eval()
        pipeline.text_encoder.eval()

    def state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict
        return {f"{name}.{key}": value for name, module, _ in self._modules()
                for key, value in get_peft_model_state_dict(module, adapter_name=self.run.adapter).items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict
        for name, module, _ in self._modules():
            set_peft_model_state_dict(module, {key[len(name) + 1:]: value for key, value in tensors.items()
                                               if key.startswith(name + ".")}, adapter_name=self.run.adapter)

    def path(self) -> Path:
        return self.run.models.lora_dir / f"{self.run.request.name}.safetensors"

    def save(self, step: int) -> Path:
        from pipelines.lora.export import save_kohya
        return save_kohya(self.run.models.lora_dir, self.run.request, self.run.model, self.state(), step)

    def teardown(self) -> None:
        """The adapters taken off again, however the run ended; loaded LoRAs stay off until a prompt names them."""
        pipeline = self.run.pipeline
        for _, module, _ in self._modules():
            module.eval()
        freeze(pipeline)
        _remove_adapter(pipeline, self.run.adapter)
        if getattr(pipeline.unet, "peft_config", None) or getattr(pipeline.text_encoder, "peft_config", None):
            pipeline.disable_lora()


class TextualInversion:
    """`request.vectors` new vectors for the tokens of `request.name` (`<ti:name>`, `<ti:name:1>`…), started from
    `request.init_word`'s embedding."""

    text = True

    def __init__(self, run):
        self.run = run
        self.tokens: TokenVectors | None = None
        self.initial: torch.Tensor | None = None

    def install(self) -> None:
        """The new tokens in the tokenizer and the text encoder, their vectors the init word's embeddings (its
        tokens repeated over the vectors, as A1111 starts them), before the captions are read."""
        pipeline, request = self.run.pipeline, self.run.request
        table = pipeline.text_encoder.get_input_embeddings().weight
        word_ids = pipeline.tokenizer(request.init_word, add_special_tokens=False).input_ids
        if not word_ids:
            raise ValueError(f"The tokenizer reads no token in `init_word` {request.init_word!r}; give a word.")
        self.initial = table[torch.tensor(word_ids)].detach().float().cpu()
        self.initial = self.initial[torch.arange(request.vectors) % len(word_ids)]
        self._forget_file()        # its rows are the training's now: a prompt that names it reads the file again
        self.token_ids = install_embedding(pipeline, request.name, self.initial)

    def expand(self, prompt: str) -> str:
        """The embedding's name written out as its tokens (`<ti:name> <ti:name:1> …`), as a prompt that uses it is."""
        return expand_embedding_names(prompt, {self.run.request.name: self.run.request.vectors})

    def setup(self) -> list[torch.nn.Parameter]:
        """The vectors, the only parameters that train: the UNet, the VAE and the text encoder are frozen (the
        gradient still flows through the UNet and the text encoder to the vectors, but none is kept for them)."""
        pipeline = self.run.pipeline
        freeze(pipeline)
        table = pipeline.text_encoder.get_input_embeddings().weight
        # on the execution device, where the token ids come (the table waits on the CPU under model offload)
        self.tokens = TokenVectors(self.initial, self.token_ids, table.shape[0]).to(pipeline._execution_device)
        return [self.tokens.vectors]

    def objective(self) -> Objective:
        return Objective(self.run.pipeline.unet, self.run.pipeline.text_encoder, self.tokens)

    def train_mode(self) -> None:
        self.run.pipeline.disable_lora()        # the base model's own text encoder and UNet
        self.run.pipeline.unet.train()

    def use(self, *, trained: bool) -> None:
        """For sampling: the token's rows in the embedding table set to the trained (or the initial) vectors."""
        self.run.pipeline.disable_lora()
        self.run.pipeline.unet.eval()
        install_embedding(self.run.pipeline, self.run.request.name,
                          self.tokens.vectors.detach() if trained else self.initial)

    def state(self) -> dict[str, torch.Tensor]:
        return {"vectors": self.tokens.vectors.detach()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.tokens.vectors.copy_(tensors["vectors"])

    def path(self) -> Path:
        return self.run.models.embeddings_dir / f"{self.run.request.name}.safetensors"

    def save(self, step: int) -> Path:
        run, path = self.run, self.path()
        save_embedding(path, self.tokens.vectors.detach(), name=run.request.name,
                       metadata={"step": str(step), "sd_checkpoint": str(run.model.model_hash or ""),
                                 "sd_checkpoint_name": run.model.name, "init_word": run.request.init_word})
        return path

    def teardown(self) -> None:
        """However the run ended, the next prompt that names the embedding reads its file again (the one this
        run saved, or the one there was before)."""
        self._forget_file()
        freeze(self.run.pipeline)
        self.run.pipeline.unet.eval()

    def _forget_file(self) -> None:
        self.run.model.embeddings.pop(self.run.request.name, None)


def freeze(pipeline) -> None:
    """No gradient kept for the base model's weights (a model is loaded with them all requiring one), and none
    left over from a run before."""
    for module in (pipeline.unet, pipeline.text_encoder, pipeline.vae):
        for parameter in module.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None


def make_method(run):
    return TextualInversion(run) if run.request.method == "textual_inversion" else LoraMethod(run)


def _only_adapter_trains(module, adapter: str) -> list[torch.nn.Parameter]:
    """The adapter's parameters train, in fp32 whatever the model's dtype (AdamW's eps is 0 in fp16); no other."""
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(adapter in name)
    parameters = [parameter for name, parameter in module.named_parameters() if adapter in name]
    for parameter in parameters:
        parameter.data = parameter.data.float()
    return parameters


def _remove_adapter(pipeline, adapter: str) -> None:
    """The adapter off every part of the pipeline that has it."""
    if any(adapter in (getattr(part, "peft_config", None) or {}) for part in (pipeline.unet, pipeline.text_encoder)):
        pipeline.delete_adapters([adapter])
