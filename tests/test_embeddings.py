"""Textual-inversion embeddings used by name in prompts (pipelines/models/embeddings.py): files made in-process for
the tiny model (text width 32), applied through the studio's generator."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from pipelines.core.paths import ModelLoadError
from pipelines.io.metadata import infotext_to_settings_and_dropped, parse_infotext, read_png_metadata
from pipelines.models.embeddings import (embedding_files, embedding_roots, embeddings_in, expand_embedding_names,
                                         install_embedding, load_embedding, read_embedding, save_embedding)
from pipelines.tasks.txt2img import Txt2ImgRequest

WIDTH = 32   # the tiny model's text encoder


def vectors(count: int, *, seed: int = 0, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def put(studio, name: str, values: torch.Tensor, **metadata) -> Path:
    return save_embedding(studio.models.embeddings_dir / f"{name}.safetensors", values, name=name, metadata=metadata)


def request(prompt: str, **overrides) -> Txt2ImgRequest:
    return Txt2ImgRequest(**(dict(prompt=prompt, steps=4, seed=21, width=64, height=64) | overrides))


def pixels(studio, prompt: str, **overrides) -> np.ndarray:
    return np.asarray(studio.generate(request(prompt, **overrides)).images[0].image, dtype=np.int16)


def test_names_are_whole_words_any_case_and_expand_to_every_token():
    counts = {"my-style": 3, "bad_hands": 1}
    text = "a MY-STYLE cat, notmy-stylex, my-style_2, (my-style:1.2) [bad_hands] my-styles"
    tokens = "<ti:my-style> <ti:my-style:1> <ti:my-style:2>"
    assert expand_embedding_names(text, counts) == (f"a {tokens} cat, notmy-stylex, my-style_2, ({tokens}:1.2) "
                                                    "[<ti:bad_hands>] my-styles")
    assert embeddings_in(text, ["bad_hands", "my-style", "absent"]) == ["bad_hands", "my-style"]
    assert embeddings_in("bad_hands_x my-style-2", counts) == []
    assert expand_embedding_names("red apple", {}) == "red apple"


def test_a_saved_embedding_loads_in_plain_diffusers_with_the_saved_rows(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    saved = vectors(3)
    path = save_embedding(tmp_path / "my-style.safetensors", saved, name="my-style",
                          metadata={"step": 120, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny-sd"})
    assert sorted(os.listdir(tmp_path)) == ["my-style.safetensors"]          # no .partial left behind
    with safe_open(str(path), framework="pt") as reader:
        assert list(reader.keys()) == ["emb_params"]
        assert reader.metadata() | {} == {"name": "my-style", "vectors": "3", "step": "120",
                                          "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny-sd"}
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipeline.load_textual_inversion(str(path), token="my-style")
    ids = pipeline.tokenizer.convert_tokens_to_ids(["my-style", "my-style_1", "my-style_2"])
    assert torch.equal(pipeline.text_encoder.get_input_embeddings().weight[ids], saved)
    assert torch.equal(read_embedding(path, allow_pickle=False), saved)
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_embedding(tmp_path / "broken.safetensors", torch.full((2, WIDTH), torch.nan), name="broken",
                       metadata={})
    assert not (tmp_path / "broken.safetensors").exists()


def test_installing_adds_tokens_no_prompt_holds_and_leaves_the_vocabulary_as_it_was(studio):
    pipeline = studio.models.current.pipeline
    table_before = pipeline.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = install_embedding(pipeline, "My-Style", vectors(2))
    table = pipeline.text_encoder.get_input_embeddings().weight
    assert ids == list(range(len(table_before), len(table_before) + 2))
    assert torch.equal(table[:len(table_before)], table_before)              # the vocabulary's rows untouched
    assert ids == pipeline.tokenizer(expand_embedding_names("a My-style", {"my-style": 2})).input_ids[2:4]
    # the name itself is no token: a prompt that holds it unexpanded (its file deleted or refused) reads words
    assert not set(ids) & set(pipeline.tokenizer("a my-style, notmy-stylex").input_ids)
    assert install_embedding(pipeline, "My-Style", vectors(2, seed=1)) == ids   # rewritten in place, not added
    assert torch.equal(table[ids], vectors(2, seed=1))
    # a name that is a word of the vocabulary takes no row of it: `a` keeps its own vector
    word = pipeline.tokenizer("a", add_special_tokens=False).input_ids
    [row] = install_embedding(pipeline, "a", vectors(1))
    assert pipeline.tokenizer("a", add_special_tokens=False).input_ids == word and row not in word
    assert torch.equal(pipeline.text_encoder.get_input_embeddings().weight[:len(table_before)], table_before)
    with pytest.raises(ValueError, match="would be read as part of another embedding's tokens; rename its file"):
        install_embedding(pipeline, "my-style:1", vectors(1))               # `<ti:my-style:1>` is My-Style's


def test_a_long_prompt_s_windows_keep_each_embedding_whole(studio):
    """As A1111 fills its chunks: an embedding that does not fit what is left of a window starts the next one,
    emphasis or not."""
    from pipelines.core.prompts import _weighted_windows, _windows, window

    pipeline = studio.models.current.pipeline
    ids = install_embedding(pipeline, "my-style", vectors(3))
    size = window(pipeline.tokenizer)
    text = "red " * (size - 1) + expand_embedding_names("my-style, green", {"my-style": 3})
    windows = _windows(pipeline.tokenizer, text)
    assert len(windows[0]) == size - 1 and windows[1][:3] == ids
    styled = expand_embedding_names("my-style green", {"my-style": 3})
    weighted, weights = _weighted_windows(pipeline.tokenizer, [["red " * (size - 2), 1.0], [styled, 1.3]])
    assert len(weighted[0]) == size - 2 and weighted[1][:3] == ids and weights[1][:3] == [1.3] * 3


def test_a_named_embedding_changes_the_image_in_the_prompt_and_in_the_negative(studio):
    prompt = "red apple my-style"
    literal, literal_negative = pixels(studio, prompt), pixels(studio, "red apple", negative_prompt="my-style")
    put(studio, "my-style", vectors(3) * 4)
    seen: list[torch.Tensor] = []
    encoder = studio.models.current.pipeline.text_encoder
    hook = encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].flatten()))
    try:
        done = studio.generate(request(prompt))
        plain_calls = len(seen)
        studio.generate(request("red apple (my-style:1.3) BREAK green"))    # emphasis and BREAK: window by window
    finally:
        hook.remove()
    assert "Embedding my-style: 3 vectors." in done.messages
    ids = studio.models.current.embeddings["my-style"].token_ids
    assert len(ids) == 3
    for calls in (seen[:plain_calls], seen[plain_calls:]):      # every token of the embedding reaches the encoder
        assert all(any(token in batch for batch in calls) for token in ids)
    # ... once each, in order, where the name stood (diffusers' own expansion does not run a second time)
    tokenizer = studio.models.current.pipeline.tokenizer
    words = tokenizer("red apple", add_special_tokens=False).input_ids
    assert any(batch.tolist()[:len(words) + 5] == [tokenizer.bos_token_id, *words, *ids, tokenizer.eos_token_id]
               for batch in seen[:plain_calls])
    named = np.asarray(done.images[0].image, dtype=np.int16)
    assert np.abs(named - literal).mean() > 1
    assert np.abs(pixels(studio, "red apple", negative_prompt="my-style") - literal_negative).mean() > 1
    assert np.array_equal(pixels(studio, prompt), named)                     # loaded once, the same image again
    # its file deleted: the name is words again (the tokens installed stay unread) and no hash is claimed
    (studio.models.embeddings_dir / "my-style.safetensors").unlink()
    done = studio.generate(request(prompt))
    assert np.array_equal(np.asarray(done.images[0].image, dtype=np.int16), literal)
    assert "TI hashes" not in parse_infotext(done.images[0].infotext)[2]


def test_a_retrained_file_is_read_again(studio):
    path = put(studio, "my-style", vectors(3))
    first = pixels(studio, "red apple my-style")
    put(studio, "my-style", vectors(4, seed=5))
    stamp = path.stat().st_mtime_ns
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))    # a later mtime, whatever the file system's resolution
    done = studio.generate(request("red apple my-style"))
    loaded = studio.models.current.embeddings["my-style"]
    assert "Embedding my-style: 4 vectors." in done.messages
    assert torch.equal(studio.models.current.pipeline.text_encoder.get_input_embeddings().weight[loaded.token_ids],
                       vectors(4, seed=5))
    assert np.abs(np.asarray(done.images[0].image, dtype=np.int16) - first).mean() > 1


def test_an_embedding_made_for_another_model_or_pickled_is_not_applied_and_says_why(studio):
    """As A1111 skips them: the word is read as text, the image is made, and a note names the reason."""
    literal = pixels(studio, "red apple wide")
    put(studio, "wide", vectors(2, width=768))
    done = studio.generate(request("red apple wide"))
    assert any("Embedding wide not applied" in note and "wide has 768-wide vectors (an SD 1.x embedding); this "
               "model's text encoder takes 32" in note for note in done.messages)
    assert np.array_equal(np.asarray(done.images[0].image, dtype=np.int16), literal)
    sdxl = studio.models.embeddings_dir / "xl-style.safetensors"
    save_file({"clip_l": vectors(2, width=768), "clip_g": vectors(2, width=1280)}, str(sdxl))
    done = studio.generate(request("red apple xl-style"))
    assert any("xl-style.safetensors is an SDXL embedding" in note for note in done.messages)
    (studio.models.embeddings_dir / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")   # truncated
    done = studio.generate(request("red apple wide, cut"))
    assert any("Embedding cut not applied" in note and "cut.safetensors could not be read as an embedding" in note
               for note in done.messages)


def test_a_pickled_embedding_needs_allow_pickle(studio):
    folder = studio.models.embeddings_dir
    folder.mkdir(parents=True)
    torch.save({"string_to_param": {"*": vectors(2)}, "name": "old-style", "step": 7}, folder / "old-style.pt")
    torch.save({"<concept>": vectors(1)[0]}, folder / "concept.bin")           # diffusers' learned_embeds.bin, 1-D
    assert list(embedding_files(folder)) == ["concept", "old-style"]
    done = studio.generate(request("red apple old-style"))
    assert any(re.search("Embedding old-style not applied.*old-style.pt is a pickled checkpoint.*--allow-pickle", note)
               for note in done.messages)
    studio.models.allow_pickle = True
    done = studio.generate(request("red apple old-style, concept"))
    assert {"Embedding old-style: 2 vectors.", "Embedding concept: 1 vector."} <= set(done.messages)
    assert torch.equal(read_embedding(folder / "concept.bin", allow_pickle=True), vectors(1))


def test_a_file_outside_models_cannot_be_reached(studio, tmp_path):
    outside = save_embedding(tmp_path / "elsewhere" / "leak.safetensors", vectors(2), name="leak", metadata={})
    folder = studio.models.embeddings_dir
    folder.mkdir(parents=True)
    (folder / "leak.safetensors").symlink_to(outside)
    assert embedding_files(folder) == {}
    done = studio.generate(request(f"red apple leak {outside} ../elsewhere/leak"))
    assert not studio.models.current.embeddings and not any("Embedding" in note for note in done.messages)
    with pytest.raises(ModelLoadError, match="outside the app's model folders"):
        load_embedding(studio.models.current.pipeline, "leak", folder / "leak.safetensors",
                       roots=embedding_roots(folder), allow_pickle=False)


def test_the_infotext_carries_ti_hashes_and_png_info_reads_them_back(studio):
    path = put(studio, "my-style", vectors(2))
    put(studio, "unused", vectors(1))
    done = studio.generate(request("red apple my-style", negative_prompt="blurry, My-Style"))
    image = done.images[0]
    expected = f"my-style: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    prompt, negative, parameters = parse_infotext(image.infotext)
    assert (prompt, negative) == ("red apple my-style", "blurry, My-Style")   # the names, as written
    assert parameters["TI hashes"] == expected and list(parameters)[-2:] == ["TI hashes", "Version"]
    text, _ = read_png_metadata(image.path)
    assert text == image.infotext
    settings, dropped = infotext_to_settings_and_dropped(parse_infotext(text)[2])
    assert "TI hashes" not in dropped and settings["seed"] == 21
    assert Image.open(image.path).size == (64, 64)


def test_the_rest_api_lists_the_embeddings_that_fit_and_skips_the_others(studio, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from studio.context import StudioContext
    from studio.rest_api import mount_rest_api

    put(studio, "my-style", vectors(3), step=120, sd_checkpoint="0123456789", sd_checkpoint_name="tiny-sd")
    put(studio, "wide", vectors(2, width=768))
    app = FastAPI()
    mount_rest_api(app, StudioContext(models=studio.models, generator=studio, outputs_dir=tmp_path / "outputs"))
    answer = TestClient(app).get("/sdapi/v1/embeddings").json()
    assert answer == {"loaded": {"my-style": {"step": 120, "sd_checkpoint": "0123456789",
                                              "sd_checkpoint_name": "tiny-sd", "shape": 32, "vectors": 3}},
                      "skipped": {"wide": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                           "shape": 768, "vectors": 2}}}


def test_icg_s_random_prompt_ignores_the_tokens_embeddings_add(studio):
    before = pixels(studio, "red apple", cfg_method="ICG")
    # enough tokens that a draw over the grown vocabulary would pick other tokens
    install_embedding(studio.models.current.pipeline, "my-style", vectors(450))
    assert np.array_equal(pixels(studio, "red apple", cfg_method="ICG"), before)
