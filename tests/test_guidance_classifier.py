"""The shipped noise-aware classifier for classifier guidance (pipelines/guidance/classifier.py): it loads and names the
emoji categories, its gradient of log p(y | x_t, t) is usable (shape, dtype, no grad state left, a step along it
raises log p), it names the category of the app's example emoji (held out of its training) from their latents,
and bad files and names are refused with messages that say what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from pipelines.core.paths import ASSETS_DIR
from pipelines.guidance.classifier import (
    EMBEDDED_CLASSIFIER,
    WEIGHTS_NAME,
    NoiseAwareClassifier,
    classifier_class_names,
    load_guidance_classifier,
)

EXAMPLES = ASSETS_DIR / "examples"
# The app's example images and their emoji's category (recipe/data.py); recipe/classifier.py holds them all out.
EXAMPLE_CATEGORIES = {
    "noto-rainbow.png": "travel & places",
    "noto-red-apple.png": "food & drink",
    "twemoji-cat-face.png": "animals & nature",
    "held-out/noto-left-speech-bubble.png": "smileys & emotion",
    "held-out/noto-pilot,-medium-skin-tone.png": "people & body",
    "held-out/noto-record-button.png": "symbols",
    "held-out/noto-senegal-flag.png": "flags",
    "held-out/noto-woman-kneeling-facing-right,-medium-skin-tone.png": "people & body",
    "held-out/noto-woman-running-facing-right,-medium-dark-skin-tone.png": "people & body",
}


@pytest.fixture(scope="module")
def guidance():
    return load_guidance_classifier()


@pytest.fixture(scope="module")
def example_latents() -> torch.Tensor:
    """The examples as the UNet sees them: 64 px on white, the VAE's posterior mean times its scaling factor."""
    from pipelines.core.vae import encode

    vae = AutoencoderKL.from_pretrained(ASSETS_DIR / "emoji-ldm" / "vae", torch_dtype=torch.float32).eval()
    pictures = [Image.open(EXAMPLES / name).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
                for name in EXAMPLE_CATEGORIES]
    pixels = torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return encode(vae, pixels)


def _noised(z_0: torch.Tensor, t: int, seed: int = 0) -> torch.Tensor:
    # x_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps on the embedded model's scaled-linear schedule
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].float()
    noise = torch.randn(z_0.shape, generator=torch.Generator().manual_seed(seed))
    return abar.sqrt() * z_0 + (1 - abar).sqrt() * noise


def test_the_shipped_classifier_loads_and_names_the_categories(guidance):
    assert set(EXAMPLE_CATEGORIES.values()) <= set(guidance.class_names)
    assert len(guidance.class_names) == 9 and "component" not in guidance.class_names
    assert guidance.class_index("Food & Drink") == guidance.class_names.index("food & drink")
    record = json.loads((EMBEDDED_CLASSIFIER / "CLASSIFIER.json").read_text())
    assert guidance.provenance == record and record["class_names"] == guidance.class_names
    assert {"0", "250", "500", "750", "950"} <= set(record["held_out_accuracy"])
    assert (EMBEDDED_CLASSIFIER / WEIGHTS_NAME).stat().st_size < 5_000_000
    assert not any(p.requires_grad for p in guidance.model.parameters()) and not guidance.model.training
    assert classifier_class_names() == guidance.class_names   # what the UI offers, read without the weights


def test_it_names_the_category_of_unseen_example_emoji_at_t0(guidance, example_latents):
    probabilities = guidance.probabilities(example_latents, 0)
    assert probabilities.shape == (len(EXAMPLE_CATEGORIES), len(guidance.class_names))
    assert torch.allclose(probabilities.sum(1), torch.ones(len(EXAMPLE_CATEGORIES)), atol=1e-5)
    predicted = [guidance.class_names[i] for i in probabilities.argmax(1).tolist()]
    right = sum(p == want for p, want in zip(predicted, EXAMPLE_CATEGORIES.values()))
    assert right >= 6, list(zip(EXAMPLE_CATEGORIES, predicted))


def test_a_step_along_the_gradient_raises_log_p(guidance, example_latents):
    x_t = _noised(example_latents, 500)
    target = guidance.class_index("food & drink")
    before = x_t.clone()
    with torch.no_grad():  # as inside a sampler's loop
        gradient, log_p = guidance.log_prob_gradient(x_t, 500, target)
    assert gradient.shape == x_t.shape and gradient.dtype == x_t.dtype and torch.isfinite(gradient).all()
    assert log_p.shape == (len(x_t),) and torch.allclose(log_p, guidance.probabilities(x_t, 500)[:, target].log(),
                                                         atol=1e-4)
    assert torch.equal(x_t, before) and not x_t.requires_grad and x_t.grad is None
    assert all(p.grad is None for p in guidance.model.parameters())
    # a step of length 0.2 (the latent's norm is about 32) along each image's own gradient
    direction = gradient / gradient.flatten(1).norm(dim=1)[:, None, None, None]
    _, log_p_after = guidance.log_prob_gradient(x_t + 0.2 * direction, torch.full((len(x_t),), 500), target)
    assert (log_p_after > log_p).all(), (log_p, log_p_after)


def test_the_gradient_follows_the_input_dtype_and_any_latent_size(guidance):
    x_t = torch.randn(2, 4, 24, 16, generator=torch.Generator().manual_seed(1)).half()
    gradient, log_p = guidance.log_prob_gradient(x_t, torch.tensor([100, 900]), 0)
    assert gradient.dtype == torch.float16 and gradient.shape == x_t.shape and torch.isfinite(gradient).all()
    assert log_p.dtype == torch.float32 and (log_p < 0).all()
    with pytest.raises(ValueError, match="one per image"):
        guidance.log_prob_gradient(x_t, torch.tensor([1, 2, 3]), 0)
    with pytest.raises(ValueError, match="class_index"):
        guidance.log_prob_gradient(x_t, 10, len(guidance.class_names))


def test_an_unknown_class_name_lists_the_classes(guidance):
    with pytest.raises(ValueError, match="no class 'vegetables'") as raised:
        guidance.class_index("vegetables")
    assert all(name in str(raised.value) for name in guidance.class_names)


def test_bad_files_are_refused_with_a_clear_error(tmp_path: Path):
    from safetensors.torch import save_file

    pickled = tmp_path / "classifier.pt"
    torch.save({}, pickled)
    with pytest.raises(ValueError, match=r"classifier\.pt is not a guidance classifier: expected a \.safetensors"):
        load_guidance_classifier(pickled)
    with pytest.raises(ValueError, match=r"No guidance classifier at .*missing\.safetensors"):
        load_guidance_classifier(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=rf"No guidance classifier at .*{WEIGHTS_NAME}"):
        load_guidance_classifier(tmp_path)   # a folder without the weights
    with pytest.raises(ValueError, match=rf"No guidance classifier at .*{WEIGHTS_NAME}.*python -m recipe.classifier"):
        load_guidance_classifier(tmp_path / "emoji-ldm-classifier")   # the folder itself is missing
    assert classifier_class_names(tmp_path) == []   # none installed: the UI offers no classes

    model = NoiseAwareClassifier(2, widths=(8, 16), blocks_per_level=1, time_dim=16)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.bias"}
    metadata = {"architecture": json.dumps(model.config), "class_names": json.dumps(["a", "b"])}
    save_file(state, str(tmp_path / "wrong-keys.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"wrong-keys\.safetensors does not hold .* missing \['head\.bias'\]"):
        load_guidance_classifier(tmp_path / "wrong-keys.safetensors")
    save_file(state, str(tmp_path / "no-metadata.safetensors"))
    with pytest.raises(ValueError, match=r"no-metadata\.safetensors has no architecture or class_names"):
        load_guidance_classifier(tmp_path / "no-metadata.safetensors")
    with pytest.raises(ValueError, match=r"no-metadata\.safetensors has no class_names"):
        classifier_class_names(tmp_path / "no-metadata.safetensors")

    state["head.bias"] = model.state_dict()["head.bias"]
    save_file(state, str(tmp_path / "tiny.safetensors"), metadata=metadata)
    loaded = load_guidance_classifier(tmp_path / "tiny.safetensors")   # a lone file loads, without provenance
    assert loaded.class_names == ["a", "b"] and loaded.provenance == {}
