"""The noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
Synthesis", Algorithm 1), inference side: a small CNN p(y | x_t, t) on the embedded model's noisy latents, and the
gradient the sampler adds to the noise prediction:

    eps_hat = eps - sqrt(1 - abar_t) * s * grad_{x_t} log p(y | x_t, t)

Its input is the DDPM-space noisy latent x_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, with z_0 the VAE's latent as
the UNet sees it (pipelines/core/vae.py: scaled by `scaling_factor`), and the integer timestep t in [0, 1000). The
architecture is ADM's encoder-half classifier scaled down: residual blocks (GroupNorm, SiLU, 3x3 convolutions) whose
second normalisation is scaled and shifted by a sinusoidal timestep embedding, strided-convolution downsampling, and
global mean pooling before a linear head, so it reads latents of any size.

The embedded model's classifier (trained by recipe/classifier.py) names the emoji *category* ("food & drink", ...)
and ships as assets/emoji-ldm-classifier/: `classifier.safetensors` (weights; architecture and class names in its
metadata) and `CLASSIFIER.json` (the same, plus how it was trained and its held-out accuracy per noise level).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.core.paths import ASSETS_DIR, ModelLoadError

EMBEDDED_CLASSIFIER = ASSETS_DIR / "emoji-ldm-classifier"
WEIGHTS_NAME = "classifier.safetensors"
RECORD_NAME = "CLASSIFIER.json"
NUM_TRAIN_TIMESTEPS = 1000


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (N,) -> (N, dim): [cos(t f_k), sin(t f_k)] with
    frequencies f_k = max_period^(-k / (dim/2)), as in the DDPM/ADM UNets."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                                 device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; GroupNorm scaled and shifted by the timestep embedding (ADM's "scale-shift norm"),
    SiLU, conv; plus the input (1x1-projected when the width changes). The last conv starts at zero, so each
    block starts as the identity."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int):
        super().__init__()
        self.norm_in = nn.GroupNorm(groups, in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_scale_shift = nn.Linear(time_dim, 2 * out_channels)
        self.norm_out = nn.GroupNorm(groups, out_channels)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(F.silu(self.norm_in(x)))
        scale, shift = self.time_scale_shift(F.silu(time))[:, :, None, None].chunk(2, dim=1)
        h = self.norm_out(h) * (1 + scale) + shift
        return self.skip(x) + self.conv_out(F.silu(h))


class NoiseAwareClassifier(nn.Module):
    """p(y | x_t, t): logits (N, num_classes) for noisy latents x_t (N, in_channels, H, W) at timesteps t (N,).

    One level per entry of `widths`, each `blocks_per_level` ResBlocks; a stride-2 conv between levels halves the
    side (16 -> 8 -> 4 for the embedded model's latents); GroupNorm, SiLU, mean over H and W, linear head."""

    def __init__(self, num_classes: int, *, in_channels: int = 4, widths: tuple[int, ...] = (32, 64, 128),
                 blocks_per_level: int = 2, time_dim: int = 128, groups: int = 8):
        super().__init__()
        self.config = {"num_classes": num_classes, "in_channels": in_channels, "widths": list(widths),
                       "blocks_per_level": blocks_per_level, "time_dim": time_dim, "groups": groups}
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks, self.downsamples = nn.ModuleList(), nn.ModuleList()
        channels = widths[0]
        for level, width in enumerate(widths):
            self.blocks.append(nn.ModuleList(
                [ResBlock(channels if i == 0 else width, width, time_dim, groups) for i in range(blocks_per_level)]))
            channels = width
            last = level == len(widths) - 1
            self.downsamples.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.norm_out = nn.GroupNorm(groups, channels)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        time = self.time_mlp(timestep_embedding(timesteps, self.time_dim))
        h = self.conv_in(x_t)
        for blocks, downsample in zip(self.blocks, self.downsamples):
            for block in blocks:
                h = block(h, time)
            h = downsample(h)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))


@dataclass
class GuidanceClassifier:
    """A loaded noise-aware classifier: the model (float32, eval, parameters frozen), its class names in the order
    of its logits, and its provenance (CLASSIFIER.json: training settings, held-out accuracy per noise level)."""

    model: NoiseAwareClassifier
    class_names: list[str]
    provenance: dict = field(default_factory=dict)

    def class_index(self, name: str) -> int:
        """The logit index of class `name` (case-insensitive, surrounding spaces ignored)."""
        wanted = str(name).strip().lower()
        for index, class_name in enumerate(self.class_names):
            if class_name.lower() == wanted:
                return index
        raise ValueError(f"The guidance classifier has no class {name!r}; its classes are: "
                         f"{', '.join(repr(c) for c in self.class_names)}.")

    def log_prob_gradient(self, x_t: torch.Tensor, timestep: torch.Tensor | int, class_index: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad_{x_t} log p(y | x_t, t), log p(y | x_t, t)) for class `class_index`: the gradient with x_t's shape,
        dtype and device, the log-probabilities (N,) in float32 on its device.

        The classifier runs in float32 whatever x_t's dtype, with gradients on even inside `torch.no_grad()`; the
        gradient is taken of the sum over the batch, which is each image's own gradient since images do not
        interact. Nothing is left behind: x_t is not modified and no parameter collects a `.grad`."""
        self._check_class_index(class_index)
        timesteps = self._timesteps(timestep, x_t)
        model = self._model_on(x_t.device)
        with torch.enable_grad():
            x = x_t.detach().to(torch.float32).requires_grad_(True)
            log_probs = model(x, timesteps).log_softmax(dim=1)[:, class_index]
            (gradient,) = torch.autograd.grad(log_probs.sum(), x)
        return gradient.to(x_t.dtype), log_probs.detach()

    @torch.no_grad()
    def probabilities(self, x_t: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        """p(y | x_t, t) for every class, (N, num_classes), float32 on x_t's device."""
        timesteps = self._timesteps(timestep, x_t)
        return self._model_on(x_t.device)(x_t.to(torch.float32), timesteps).softmax(dim=1)

    def _model_on(self, device: torch.device) -> NoiseAwareClassifier:
        # A few MB: it follows the latents to their device rather than making the caller move them.
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        return self.model

    def _check_class_index(self, class_index: int) -> None:
        if isinstance(class_index, bool) or not isinstance(class_index, int) or \
                not 0 <= class_index < len(self.class_names):
            raise ValueError(f"`class_index` must be a whole number from 0 to {len(self.class_names) - 1} "
                             f"(the classifier's {len(self.class_names)} classes) but is {class_index!r}.")

    def _timesteps(self, timestep: torch.Tensor | int, x_t: torch.Tensor) -> torch.Tensor:
        """One timestep per image, float32 on x_t's device, from an int, a 0-d tensor or an (N,) tensor."""
        channels = self.model.config["in_channels"]
        if x_t.ndim != 4 or x_t.shape[1] != channels:
            raise ValueError(f"`x_t` must be a batch of latents (N, {channels}, H, W) but has shape "
                             f"{tuple(x_t.shape)}.")
        timesteps = torch.as_tensor(timestep, dtype=torch.float32, device=x_t.device).detach()
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x_t.shape[0])
        if timesteps.shape != (x_t.shape[0],):
            raise ValueError(f"`timestep` must be one number or one per image ({x_t.shape[0]}) but has shape "
                             f"{tuple(timesteps.shape)}.")
        if not bool(((timesteps >= 0) & (timesteps <= NUM_TRAIN_TIMESTEPS)).all()):
            raise ValueError(f"`timestep` must lie in [0, {NUM_TRAIN_TIMESTEPS}) (DDPM training timesteps) but is "
                             f"{timesteps.tolist()}.")
        return timesteps


def classifier_class_names(path: Path = EMBEDDED_CLASSIFIER) -> list[str]:
    """The class names of the classifier in `path` (a folder or its .safetensors file), read from the file's metadata
    without loading its weights; [] when no classifier is installed there (the UI offers no classes then)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() or not path.suffix else path
    if not weights.is_file():
        return []
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{weights} is not a readable .safetensors file: {error}") from error
    if "class_names" not in metadata:
        raise ModelLoadError(f"{weights} has no class_names in its metadata: it is not a guidance classifier saved "
                             "by recipe/classifier.py.")
    return json.loads(metadata["class_names"])


def load_guidance_classifier(path: Path = EMBEDDED_CLASSIFIER) -> GuidanceClassifier:
    """The classifier in `path`: a folder holding classifier.safetensors (and CLASSIFIER.json, its provenance), or
    the .safetensors file itself. Its architecture and class names come from the file's metadata."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() or not path.suffix else path   # a folder, or where one should be
    if weights.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{weights} is not a guidance classifier: expected a .safetensors file (or a folder "
                             f"holding {WEIGHTS_NAME}).")
    if not weights.is_file():
        raise ModelLoadError(f"No guidance classifier at {weights}: the embedded model's ships in {EMBEDDED_CLASSIFIER}; "
                             "restore it, or make it with `python -m recipe.classifier`.")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{weights} is not a readable .safetensors file: {error}") from error
    missing = [key for key in ("architecture", "class_names") if key not in metadata]
    if missing:
        raise ModelLoadError(f"{weights} has no {' or '.join(missing)} in its metadata: it is not a guidance "
                             "classifier saved by recipe/classifier.py.")
    architecture, class_names = json.loads(metadata["architecture"]), json.loads(metadata["class_names"])
    if architecture.get("num_classes") != len(class_names):
        raise ModelLoadError(f"{weights} names {len(class_names)} classes but its head has "
                             f"{architecture.get('num_classes')}.")
    model = NoiseAwareClassifier(architecture.pop("num_classes"), **{
        key: tuple(value) if key == "widths" else value for key, value in architecture.items()})
    expected = model.state_dict().keys()
    if state.keys() != expected:
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        raise ModelLoadError(f"{weights} does not hold the weights its architecture needs: missing "
                             f"{missing[:5] or 'none'}{' ...' if len(missing) > 5 else ''}, unexpected "
                             f"{unexpected[:5] or 'none'}{' ...' if len(unexpected) > 5 else ''}.")
    try:
        model.load_state_dict({key: value.float() for key, value in state.items()})
    except RuntimeError as error:  # a tensor of the wrong shape
        raise ModelLoadError(f"{weights}'s weights do not fit its architecture {architecture}: {error}") from error
    record = weights.with_name(RECORD_NAME)
    provenance = json.loads(record.read_text()) if record.is_file() else {}
    return GuidanceClassifier(model.eval().requires_grad_(False), class_names, provenance)
