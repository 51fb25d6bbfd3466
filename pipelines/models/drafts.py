"""Draft UNets for speculative sampling's "draft model": a small UNet trained to imitate the base model's, read
from a UNet folder or a diffusers model folder's unet/, or the embedded model's shipped draft.

The manager holds the draft in its slot; reading it is here, through the one path and pickle policy
(sources.py): a path a UI request names is confined to the app's folders with links resolved, and its
weights are `.safetensors` unless the studio was started with --allow-pickle.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.core.paths import ASSETS_DIR, ModelLoadError, confined, use_safetensors
from pipelines.models.sources import EMBEDDED_NAME, ModelSource

EMBEDDED_DRAFT = ASSETS_DIR / "emoji-ldm-draft"   # the embedded model's draft UNet (recipe/draft.py)
# What the draft must share with the base UNet: it denoises the same latents and reads the same prompt embeddings.
MATCHING_CONFIG_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type")


def read_draft(spec: str, *, roots: tuple[Path, ...] | None, dtype, allow_pickle: bool):
    """The draft UNet `spec` names, read into RAM, with its source; "embedded" (or nothing) is the embedded
    model's shipped draft. `roots`, when given (requests from the UI), confines the path to the app's folders."""
    from diffusers import UNet2DConditionModel

    if (spec or "").strip() in ("", EMBEDDED_NAME):
        path = EMBEDDED_DRAFT
    elif roots is None:
        path = Path(spec).expanduser().resolve()
    else:
        path = confined(spec, roots, what="The draft UNet")
    folder = path / "unet" if (path / "model_index.json").exists() else path
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"No draft UNet at {path}: expected a UNet folder (config.json and .safetensors "
                             "weights) or a diffusers model folder with a unet/ subfolder.")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, dtype=dtype, use_safetensors=use_safetensors(allow_pickle))
    except Exception as error:
        raise ModelLoadError(f"Could not load a draft UNet from {folder}: {type(error).__name__}: {error}") \
            from error
    return unet.eval(), ModelSource("folder", str(folder), path.name)


def check_draft_fits(draft, base) -> None:
    """Refuse a draft UNet that cannot stand in for `base`'s (the loaded base model), naming the mismatch."""
    ours, theirs = draft.pipeline.config, base.pipeline.unet.config
    for key in MATCHING_CONFIG_KEYS:
        if ours.get(key) != theirs.get(key):
            raise ValueError(f"The draft UNet ({draft.name}) does not fit {base.name}: its {key} is "
                             f"{ours.get(key)}, the model's is {theirs.get(key)}. Load a draft made for this model.")
