"""The evaluation recipe's parts: the Fréchet distance against closed forms, top-k on hand-made
logits, the prompt draw, a judge that learns a tiny synthetic task, the sample grid, and the
samples the studio's generator makes for it. No emoji data needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageDraw

from recipe.data import EmojiRecord
from recipe.evaluate import (GRID_GAP_PX, as_array, augment, classify, evaluation_prompts, features, frechet_distance,
                             holdout_split, sample_grid, top_k_accuracy, train_classifier)


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


# -- Fréchet distance ------------------------------------------------------------------------
def test_frechet_distance_of_a_set_with_itself_is_zero():
    points = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(frechet_distance(points, points)) < 1e-6


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    points = np.random.default_rng(1).normal(size=(2000, 6))
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, -1.0])
    # Same covariance, means apart by `shift`: FD = ||shift||^2 exactly.
    assert frechet_distance(points, points + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_of_a_scaled_set_has_the_closed_form():
    points = np.random.default_rng(2).normal(size=(2000, 5)) * np.array([1.0, 2.0, 0.5, 1.5, 1.0])
    # C_b = 4 C_a, so Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) = Tr(C_a) (1 + 4 - 4) = Tr(C_a); means stay 0 apart
    # only up to sampling, so the mean term is computed too.
    mean = points.mean(0)
    expected = float(np.trace(np.cov(points, rowvar=False)) + ((mean - 2 * mean) ** 2).sum())
    assert frechet_distance(points, 2 * points) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_independent_gaussian_samples_approaches_the_analytic_value():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(20000, 4))
    b = rng.normal(loc=[2.0, 0.0, 0.0, 0.0], size=(20000, 4))
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.1)


def test_frechet_distance_agrees_with_the_matrix_square_root_formula():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(3000, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(3000, 6)) @ rng.normal(size=(6, 6)) + 0.5
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_stays_finite_with_fewer_samples_than_dimensions():
    points = np.random.default_rng(5).normal(size=(10, 32))   # rank-9 covariance in 32 dimensions
    # Zero eigenvalues come back as rounding error whose square roots add up: small next to Tr(C) ~ 32.
    assert abs(frechet_distance(points, points)) < 1e-5
    assert frechet_distance(points, points + 1.0) == pytest.approx(32.0, rel=1e-6)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="one dimension"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


# -- top-k accuracy --------------------------------------------------------------------------
def test_top_k_accuracy_on_hand_made_logits():
    logits = np.array([[0.1, 0.9, 0.0, 0.0],    # ranks: 1, 0, 2|3
                       [0.5, 0.2, 0.3, 0.0],    # ranks: 0, 2, 1, 3
                       [0.0, 0.1, 0.2, 0.7]])   # ranks: 3, 2, 1, 0
    labels = np.array([1, 2, 0])
    assert top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(logits, labels, 3) == pytest.approx(2 / 3)
    assert top_k_accuracy(logits, labels, 4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="`k` must be from 1 to 4"):
        top_k_accuracy(logits, labels, 5)


# -- prompts and the held-out split -------------------------------------------------------------
def _records() -> list[EmojiRecord]:
    records = []
    for index in range(40):
        for style in ("noto", "twemoji"):
            for tone in (None, "dark skin tone") if index % 4 == 0 else (None,):
                records.append(EmojiRecord(class_index=index, name=f"emoji {index}", short_names=(f"e{index}",),
                                           category="test", style=style, skin_tone=tone, image_path=Path("x.png")))
    # Two classes that share a name: the prompt cannot be judged, so it is never drawn.
    records.append(EmojiRecord(40, "twin", ("twin",), "test", "noto", None, Path("x.png")))
    records.append(EmojiRecord(41, "twin", ("twin",), "test", "noto", None, Path("x.png")))
    return records


def test_evaluation_prompts_are_distinct_and_deterministic_for_a_seed():
    records = _records()
    chosen = evaluation_prompts(records, 30, seed=0)
    prompts = [r.prompt for r in chosen]
    assert len(prompts) == 30 and len(set(prompts)) == 30
    assert prompts == [r.prompt for r in evaluation_prompts(records, 30, seed=0)]
    assert prompts != [r.prompt for r in evaluation_prompts(records, 30, seed=1)]
    assert all(r.prompt != "twin" for r in evaluation_prompts(records, 50, seed=0))  # 40 + 10 toned = all 50
    with pytest.raises(ValueError, match="from 1 to 50"):
        evaluation_prompts(records, 51, seed=0)


def test_holdout_split_keeps_every_class_in_training():
    labels = np.repeat(np.arange(50), [2, 12] * 25)
    train, held_out = holdout_split(labels, fraction=0.1, seed=0)
    assert len(held_out) == round(0.1 * len(labels))
    assert sorted(np.concatenate([train, held_out]).tolist()) == list(range(len(labels)))
    assert set(labels[train].tolist()) == set(range(50))


# -- the judge -------------------------------------------------------------------------------
def _shapes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """64x64 shapes on white, class = shape (disc, square, triangle, cross), colour and place random."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index in range(count):
        shape = index % 4
        image = Image.new("RGB", (64, 64), "white")
        draw = ImageDraw.Draw(image)
        colour = tuple(int(c) for c in rng.integers(0, 200, size=3))
        half = int(rng.integers(12, 20))
        cx, cy = (int(v) for v in rng.integers(22, 42, size=2))
        box = (cx - half, cy - half, cx + half, cy + half)
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        elif shape == 2:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
        else:
            draw.rectangle((cx - half, cy - 4, cx + half, cy + 4), fill=colour)
            draw.rectangle((cx - 4, cy - half, cx + 4, cy + half), fill=colour)
        images.append(np.asarray(image))
        labels.append(shape)
    return np.stack(images), np.array(labels)


@pytest.mark.slow
def test_classifier_learns_held_out_shapes():
    train_images, train_labels = _shapes(192, seed=0)
    test_images, test_labels = _shapes(80, seed=1)
    untrained = train_classifier(train_images[:64], train_labels[:64], epochs=1, seed=0, batch_size=64, lr=1e-9,
                                 log=None)
    classifier = train_classifier(train_images, train_labels, epochs=8, seed=0, batch_size=32, log=None)
    logits = classify(classifier, test_images)
    assert logits.shape == (80, 4)
    assert top_k_accuracy(logits, test_labels, 1) >= 0.9
    assert top_k_accuracy(classify(untrained, test_images), test_labels, 1) < 0.5  # chance, before learning
    assert features(classifier, test_images).shape == (80, 256)


def test_classifier_training_is_seeded():
    images, labels = _shapes(64, seed=2)
    first = train_classifier(images, labels, epochs=1, seed=5, batch_size=32, log=None)
    second = train_classifier(images, labels, epochs=1, seed=5, batch_size=32, log=None)
    np.testing.assert_array_equal(classify(first, images[:8]), classify(second, images[:8]))


def test_bug9_the_judge_the_recipe_exports_is_read_by_the_app_without_the_recipe(tmp_path):
    """Bug 9: the judge's inference side (its architecture, loading, features) lived in this recipe, so the
    app imported recipe/ to score a LoRA. It lives in pipelines/lora/judge.py; the recipe trains and exports
    the judge, and the app's loader reads what it exported, with the same features."""
    from pipelines.lora import judge as app_judge
    from recipe.evaluate import export_judge

    images, labels = _shapes(32, seed=3)
    classifier = train_classifier(images, labels, epochs=1, seed=0, batch_size=16, log=None)
    classifier.provenance = {"settings": {"epochs": 1}, "held_out_index": [0]}
    path = export_judge(classifier, ["disc", "square", "triangle", "cross"], tmp_path / "judge.safetensors")
    loaded, names = app_judge.load_judge(path)
    assert names == ["disc", "square", "triangle", "cross"] and loaded.provenance == {"settings": {"epochs": 1}}
    np.testing.assert_array_equal(app_judge.features(loaded, images[:4]), features(classifier, images[:4]))
    assert features is app_judge.features and as_array is app_judge.as_array    # one copy, the app's


def test_prepared_classifier_is_cached_and_retrained_when_its_settings_change(tmp_path):
    from recipe.evaluate import prepare_classifier

    images, labels = _shapes(40, seed=6)
    path, messages = tmp_path / "classifier.pt", []
    first = prepare_classifier(images, labels, 4, path=path, epochs=1, seed=0, retrain=False, fit_all=False,
                               log=messages.append)
    assert path.exists() and first.provenance["held_out"]["images"] == 4
    held_out = first.provenance["held_out_index"]
    assert len(set(held_out)) == 4
    cached = prepare_classifier(images, labels, 4, path=path, epochs=1, seed=0, retrain=False, fit_all=False,
                                log=messages.append)
    assert "Using the cached classifier" in messages[-1]
    np.testing.assert_array_equal(classify(first, images[:4]), classify(cached, images[:4]))
    prepare_classifier(images, labels, 4, path=path, epochs=2, seed=0, retrain=False, fit_all=False,
                       log=messages.append)
    assert any("training a new one" in m for m in messages)
    assert torch.load(path, weights_only=True)["provenance"]["settings"]["epochs"] == 2


def test_classify_rejects_images_of_another_size():
    images, labels = _shapes(8, seed=3)
    classifier = train_classifier(images, labels, epochs=1, seed=0, batch_size=8, log=None)
    with pytest.raises(ValueError, match="64px"):
        classify(classifier, np.zeros((2, 32, 32, 3), dtype=np.uint8))


def test_augment_changes_the_views_but_keeps_range_and_white_background():
    images, _ = _shapes(16, seed=4)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    views = augment(pixels, torch.Generator().manual_seed(0))
    assert views.shape == pixels.shape
    assert views.min() >= -1 - 1e-5 and views.max() <= 1 + 1e-5
    assert (views - pixels).abs().mean() > 0.01
    # Corners stay background: white (brightness jitter may dim it a little), never the zero padding.
    assert views[:, :, 0, 0].min() > 0.6


# -- sample grid -----------------------------------------------------------------------------
def test_sample_grid_lays_out_upscaled_cells_with_captions():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(10)]
    captions = [f"prompt number {i} with a rather long caption that must wrap" for i in range(10)]
    grid = sample_grid(images, captions, columns=4)
    assert grid.width == 4 * 128 + 5 * GRID_GAP_PX
    rows_height = (grid.height - 4 * GRID_GAP_PX) / 3       # 3 rows of 10 in 4 columns
    assert rows_height > 128 + 10                             # image plus caption lines
    first = np.asarray(grid)[GRID_GAP_PX:GRID_GAP_PX + 128, GRID_GAP_PX:GRID_GAP_PX + 128]
    np.testing.assert_array_equal(first, images[0].repeat(2, axis=0).repeat(2, axis=1))   # nearest 2x
    below = np.asarray(grid)[GRID_GAP_PX + 130:GRID_GAP_PX + int(rows_height), GRID_GAP_PX:GRID_GAP_PX + 128]
    assert (below < 128).any()                               # the caption is drawn
    assert np.asarray(grid)[-2, -2].tolist() == [255, 255, 255]  # white background (empty last cells)
    with pytest.raises(ValueError, match="as many captions"):
        sample_grid(images, captions[:3], columns=4)


# -- samples from the studio's generator ----------------------------------------------------
def test_generated_samples_are_seeded_per_prompt(tiny_model_dir):
    from recipe.evaluate import generate_samples, studio_defaults, studio_generator

    generator, loaded = studio_generator(str(tiny_model_dir))
    settings = studio_defaults(loaded)
    assert settings["sampler"] == "PNDM" and settings["width"] == 64
    settings.update(steps=2)
    prompts = ["red apple", "a cat"]
    first = as_array(generate_samples(generator, prompts, **settings, log=None), 64)
    again = as_array(generate_samples(generator, prompts, **settings, log=None), 64)
    assert first.shape == (2, 64, 64, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], first[1])
