"""Guidance beyond plain classifier-free guidance, as one plan per generation that the Denoiser follows.

What each method adds to the model's prediction at (x_t, t) (ε-prediction; `w` is the CFG scale):

    CFG          ε_u + w (ε_c − ε_u)                                    Ho & Salimans 2022
    interval     CFG only for the steps in [start, end) of the schedule, ε_c alone (one pass) outside it
                 (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval")
    ICG          CFG with ε_u replaced by ε(x_t, ĉ) for a random prompt ĉ independent of the image: the
                 unconditional prediction without a model trained with dropped captions (Sadat et al. 2024,
                 "No Training, No Problem", independent condition guidance)
    PAG          + s_pag (ε_c − ε̃_c), ε̃_c the prediction with self-attention replaced by the identity in the
                 chosen layers (Ahn et al. 2024); adaptive: s_pag − a (1000 − t), not below 0 (diffusers' rule)
    classifier   ε̂ − √(1−ᾱ_t) · s · ∇_{x_t} log p_φ(y | x_t)   (Dhariwal & Nichol 2021, eq. 14 / Algorithm 2),
                 p_φ a noise-aware classifier on the model's latents (pipelines/guidance/classifier.py)

One UNet call stacks the rows a step needs (`ModelRows`): the negative prompt (CFG active at this step), the
prompt, and the prompt under perturbed self-attention (PAG), each `batch` images long, in diffusers' PAG order
[ε_u, ε_c, ε̃_c], so diffusers' own PAG attention processors apply unchanged.
"""

from __future__ import annotations

import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from pipelines.core.checks import NUMBER_RANGES, check_choice, check_number
from pipelines.core.schedules import check_schedule, schedule_error

CFG_METHODS = ("CFG", "ICG")
# The request's guidance and schedule fields (pipelines/core/requests.py); an infotext leaves out those not in use
GUIDANCE_FIELDS = ("cfg_method", "cfg_start", "cfg_end", "pag_scale", "pag_adaptive_scale", "pag_layers",
                   "classifier_class", "classifier_scale", "schedule")
DEFAULT_PAG_LAYERS = "mid"
ICG_PROMPT_TOKENS = 8          # the random prompt's length, in tokens
# ICG's ĉ is drawn once, from this seed: independent of every image, and the same for all, so that image i of a
# batch (seed + i) is the image that seed gives alone
ICG_PROMPT_SEED = 0


@dataclass(frozen=True)
class ModelRows:
    """Which rows one UNet call stacks, each `batch` images long."""
    uncond: bool      # the negative prompt's (or ICG's random prompt's), for CFG
    perturbed: bool   # the prompt with perturbed self-attention, for PAG

    @property
    def chunks(self) -> int:
        return 1 + self.uncond + self.perturbed


def in_interval(start: float, end: float, index: int | None, count: int | None) -> bool:
    """Whether step `index` of `count` lies in [start, end) of the schedule, by ControlNet's rule for its units
    (start <= i/n and (i+1)/n <= end); a step of unknown place (None) is inside."""
    if index is None or count is None or (start <= 0.0 and end >= 1.0):
        return True
    return start <= index / count and (index + 1) / count <= end


def uses_cfg(pipeline, guidance_scale: float) -> bool:
    """StableDiffusionPipeline.do_classifier_free_guidance for this scale (guidance-distilled UNets embed it)."""
    return guidance_scale > 1 and pipeline.unet.config.time_cond_proj_dim is None


def pag_scale_at(scale: float, adaptive_scale: float, t) -> float:
    """PAG's scale at timestep t: constant, or falling by `adaptive_scale` per timestep below 1000 (diffusers)."""
    if adaptive_scale <= 0.0:
        return scale
    return max(scale - adaptive_scale * (1000 - float(t)), 0.0)


def pag_layer_ids(layers: str) -> list[str]:
    """"mid, up_blocks.0" -> ["mid", "up_blocks.0"] (diffusers' `pag_applied_layers`)."""
    return [layer.strip() for layer in layers.split(",") if layer.strip()]


def independent_prompt(tokenizer, seed: int = ICG_PROMPT_SEED, length: int = ICG_PROMPT_TOKENS) -> str:
    """ICG's random condition ĉ: `length` tokens drawn uniformly from the vocabulary (special tokens left out),
    from `seed`, so it is independent of the image."""
    special = set(tokenizer.all_special_ids)
    # the tokenizer's own vocabulary: tokens added since (textual-inversion embeddings) would change the draw
    vocabulary = [index for index in range(tokenizer.vocab_size) if index not in special]
    rng = random.Random(seed)
    return tokenizer.decode([rng.choice(vocabulary) for _ in range(length)]).strip()


class PerturbedAttention:
    """PAG's perturbation: the self-attention modules the layer ids name, and diffusers' identity processors
    (`PAGCFGIdentitySelfAttnProcessor2_0` for [ε_u, ε_c, ε̃_c] rows, `PAGIdentitySelfAttnProcessor2_0` for
    [ε_c, ε̃_c]), set for one UNet call and taken off after it, so the shared UNet is never left changed."""

    def __init__(self, unet, layers: str):
        from diffusers.models.attention_processor import (Attention, PAGCFGIdentitySelfAttnProcessor2_0,
                                                          PAGIdentitySelfAttnProcessor2_0)
        ids = pag_layer_ids(layers)
        if not ids:
            raise ValueError("`pag_layers` names no layer; use e.g. \"mid\" or \"up_blocks.0\" (comma-separated).")
        check_layer_patterns(ids)
        self.modules = []
        names = [name for name, module in unet.named_modules()
                 if isinstance(module, Attention) and not module.is_cross_attention]
        for layer in ids:
            found = [name for name in names if _matches(layer, name)]
            if not found:
                shown = sorted({".".join(name.split(".")[:2]) for name in names})
                raise ValueError(f"PAG layer {layer!r} names no self-attention layer of this UNet; it has self-attention "
                                 f"in: {', '.join(shown)} (e.g. \"mid\", \"down_blocks.1\", \"up_blocks.0.attentions.1\").")
            self.modules += [unet.get_submodule(name) for name in found if unet.get_submodule(name) not in self.modules]
        self.processors = (PAGCFGIdentitySelfAttnProcessor2_0(), PAGIdentitySelfAttnProcessor2_0())

    @contextmanager
    def applied(self, with_uncond_rows: bool):
        originals = [module.processor for module in self.modules]
        processor = self.processors[0] if with_uncond_rows else self.processors[1]
        try:
            for module in self.modules:
                module.set_processor(processor)
            yield
        finally:
            for module, original in zip(self.modules, originals):
                module.set_processor(original)


def check_layer_patterns(ids: list[str]) -> None:
    """Each PAG layer id is a regular expression, as diffusers reads it; one that is not is named."""
    for layer in ids:
        try:
            re.compile(layer)
        except re.error as error:
            raise ValueError(f"PAG layer {layer!r} is not a valid layer pattern ({error}); name layers such as "
                             "\"mid\", \"down_blocks.1\" or \"up_blocks.0.attentions.1\".") from None


def _matches(layer: str, name: str) -> bool:
    """diffusers' PAGMixin rule: the id found in the module's name, and "blocks.1" is not "blocks.10"."""
    if re.search(layer, name) is None:
        return False
    last_layer, last_name = layer.split(".")[-1], name.split(".")[-1]
    return not (last_layer.isnumeric() and last_name.isnumeric() and last_layer == last_name)


def classifier_guided(eps: torch.Tensor, x_t: torch.Tensor, t, alphas_cumprod: torch.Tensor, classifier,
                      class_index: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier guidance on an ε-prediction: ε − √(1−ᾱ_t) s ∇_{x_t} log p(y | x_t). `x_t` is the
    variance-preserving input the UNet saw (the sampler's `scale_model_input`); ᾱ_t is read off the training
    schedule at t (interpolated for the fractional timesteps of sigma-spaced schedules). Returns (ε̂, ∇log p)."""
    gradient, _ = classifier.log_prob_gradient(x_t, round(float(t)), class_index)
    gradient = gradient.to(eps.device, eps.dtype)
    return eps - (1.0 - alpha_bar_at(alphas_cumprod, t)) ** 0.5 * scale * gradient, gradient


def alpha_bar_at(alphas_cumprod: torch.Tensor, t) -> float:
    """ᾱ_t read off the training schedule, interpolated between integer timesteps (sigma-spaced schedules step at
    fractional ones)."""
    timestep = float(t)
    low = int(min(max(timestep, 0.0), len(alphas_cumprod) - 1))
    high = min(low + 1, len(alphas_cumprod) - 1)
    weight = timestep - low
    return float(alphas_cumprod[low]) * (1 - weight) + float(alphas_cumprod[high]) * weight


def check_guidance(request) -> None:
    """The request's guidance and schedule settings, each in its range (`SamplingSettings.__post_init__`)."""
    check_choice("cfg_method", request.cfg_method, CFG_METHODS)
    for name, what in (("cfg_start", " (a share of the steps)"), ("cfg_end", " (a share of the steps)"),
                       ("pag_scale", " (PAG; 0 = off)"), ("pag_adaptive_scale", ""),
                       ("classifier_scale", " (classifier guidance; 0 = off)")):
        check_number(name, getattr(request, name), *NUMBER_RANGES[name], what)
    if request.cfg_start >= request.cfg_end:
        raise ValueError(f"The guidance interval is empty: `cfg_start` {request.cfg_start:g} must be below `cfg_end` "
                         f"{request.cfg_end:g} (0 and 1: CFG at every step).")
    if not isinstance(request.pag_layers, str) or not pag_layer_ids(request.pag_layers):
        raise ValueError(f"`pag_layers` must name the UNet's self-attention layers, e.g. \"mid\" or "
                         f"\"mid, up_blocks.0\", but is {request.pag_layers!r}.")
    check_layer_patterns(pag_layer_ids(request.pag_layers))
    if not isinstance(request.classifier_class, str):
        raise ValueError(f"`classifier_class` must be a class name but is {request.classifier_class!r}.")
    if request.classifier_scale > 0.0 and not request.classifier_class.strip():
        raise ValueError("Classifier guidance needs a class to steer to: set `classifier_class` (e.g. \"food & drink\") "
                         "or set `classifier_scale` to 0.")
    check_schedule(request.schedule)
    refusal = schedule_error(request.sampler, request.schedule)
    if refusal is not None:
        raise ValueError(refusal)


def only_icg(request) -> bool:
    """ICG and nothing else beyond plain CFG: it changes only the prompt embeddings, which any loop reads."""
    return request.cfg_method == "ICG" and replace(request, cfg_method="CFG").plain_guidance()


def guidance_notes(request, pipeline) -> list[str]:
    """What the user should know about how the guidance settings acted."""
    notes = []
    cfg = uses_cfg(pipeline, request.guidance_scale)
    changed_cfg = [what for what, on in (("ICG", request.cfg_method == "ICG"),
                                         ("the guidance interval", request.cfg_start > 0 or request.cfg_end < 1)) if on]
    if changed_cfg and not cfg:
        notes.append(f"{' and '.join(changed_cfg).capitalize()} change CFG, which is off at CFG scale "
                     f"{request.guidance_scale:g} (it acts above 1): they did nothing here.")
    elif request.cfg_method == "ICG" and request.negative_prompt.strip():
        notes.append("ICG: a random prompt stood in for the negative prompt, which was not used.")
    count = request.steps if getattr(request, "strength", None) is None or getattr(request, "init_image", None) is None \
        else min(int(request.steps * request.strength), request.steps)
    if cfg and count and not any(in_interval(request.cfg_start, request.cfg_end, i, count) for i in range(count)):
        notes.append(f"The guidance interval [{request.cfg_start:g}, {request.cfg_end:g}) holds none of the {count} "
                     "steps (step i of n counts when i/n and (i+1)/n lie inside): CFG never acted. Widen it or add "
                     "steps.")
    return notes


def guidance_infotext(request) -> dict:
    """The infotext's guidance `Key: value`s (read back through SHARED_INFOTEXT_FIELDS); what is off is left out
    (None), as A1111 leaves out what an extension did not do. A1111 keeps keys it does not know."""
    interval = request.cfg_start > 0.0 or request.cfg_end < 1.0
    pag = request.pag_scale > 0.0
    classifier = request.classifier_scale > 0.0
    return {"CFG method": request.cfg_method if request.cfg_method != "CFG" else None,
            "CFG interval start": request.cfg_start if interval else None,
            "CFG interval end": request.cfg_end if interval else None,
            "PAG scale": request.pag_scale if pag else None,
            "PAG adaptive scale": request.pag_adaptive_scale if pag and request.pag_adaptive_scale > 0 else None,
            "PAG layers": request.pag_layers if pag else None,
            "Classifier guidance class": request.classifier_class if classifier else None,
            "Classifier guidance scale": request.classifier_scale if classifier else None}
