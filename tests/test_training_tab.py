"""The Training tab without a browser: the method switch, presets and the settings file, the request it builds, and
/train_textual_inversion on the tiny model (its handler, as Gradio calls it)."""

from __future__ import annotations

import shlex

import gradio as gr
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.training.presets import read_settings
from pipelines.training.request import CAPTION_DROPOUTS, LEARNING_RATES
from studio.context import StudioContext
from studio.tabs import lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The page's values for a textual inversion, as its controls hold them (other methods' settings too, hidden)
PAGE = {"method": "textual_inversion", "name": "pencil-style", "trigger": "ignored here", "steps": 30, "rank": 16,
        "batch_size": 2, "learning_rate": None, "alpha": 4.0, "warmup_steps": 0, "min_snr_gamma": 5.0,
        "noise_offset": 0.0, "caption_dropout": 0.0, "flip": False, "seed": 3, "checkpoint_every": 50,
        "sample_every": 0, "sample_prompts": "a pencil-style cat\n\n a pencil-style house ", "bucketing": False,
        "train_text_encoder": True, "vectors": 2, "init_word": "sketch", "class_prompt": "", "class_images": 50,
        "prior_loss_weight": 1.0, "sample_steps": 20}


@pytest.fixture
def page(studio, tmp_path):
    """The tab in a Blocks of its own, on the tiny model; models/ under tmp."""
    context = StudioContext(models=studio.models, generator=studio, outputs_dir=tmp_path / "outputs")
    with gr.Blocks() as blocks:
        tab = lora.build_lora_tab(context)
    return blocks, tab, context


def on(blocks: gr.Blocks, component, event: str):
    """The handler `component`'s `event` triggers (the one of several that is a page's, not the API's)."""
    (found,) = [fn.fn for fn in blocks.fns.values() if (component._id, event) in fn.targets]
    return found


def endpoint(blocks: gr.Blocks, name: str):
    (found,) = [fn.fn for fn in blocks.fns.values() if fn.api_name == name]
    return found


def values(tab, settings: dict) -> list:
    """`settings` in the order of the tab's controls, as the page's buttons send them."""
    return [settings[key] for key in tab.settings]


def _images(folder, count: int = 2) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for number in range(count):
        path = folder / f"image-{number}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_the_method_shows_its_own_settings_and_its_learning_rate(page):
    blocks, tab, _ = page

    def shown(updates) -> set[str]:
        return {key for key, control in tab.settings.items() if updates.get(control, {}).get("visible")}

    def hidden(updates) -> set[str]:
        return {key for key, control in tab.settings.items() if updates.get(control, {}).get("visible") is False}

    switched = on(blocks, tab.settings["method"], "change")
    inversion = switched("textual_inversion")
    assert shown(inversion) == {"vectors", "init_word"}
    assert {"trigger", "rank", "alpha", "class_prompt", "train_text_encoder"} <= hidden(inversion)
    dreambooth = switched("dreambooth")
    assert shown(dreambooth) == {"trigger", "rank", "alpha", "train_text_encoder", "class_prompt", "class_images",
                                 "prior_loss_weight"}
    assert dreambooth[tab.settings["trigger"]]["placeholder"] == "sks dog"
    assert "Identifier" in dreambooth[tab.settings["trigger"]]["label"]
    assert shown(switched("lora")) == {"trigger", "rank", "alpha", "train_text_encoder"}
    # the user's choice sets the method's learning rate and caption dropout
    chosen = on(blocks, tab.settings["method"], "input")
    assert [chosen(method) for method in ("textual_inversion", "dreambooth", "lora")] == \
        [(LEARNING_RATES[method], CAPTION_DROPOUTS[method]) for method in ("textual_inversion", "dreambooth", "lora")]
    assert CAPTION_DROPOUTS["dreambooth"] == CAPTION_DROPOUTS["textual_inversion"] == 0 < CAPTION_DROPOUTS["lora"]


def test_a_preset_round_trips_on_the_page_and_through_the_api(page):
    blocks, tab, _ = page
    on(blocks, tab.presets.save, "click")(" pencil ", *values(tab, PAGE))
    saved = endpoint(blocks, "load_training_preset")("pencil")
    assert saved == lora.request_settings(PAGE)
    assert "learning_rate" not in saved             # empty: the method's default, whatever it becomes
    assert saved["sample_prompts"] == ["a pencil-style cat", "a pencil-style house"]
    assert "rank" not in saved and "train_text_encoder" not in saved           # a LoRA's, not an embedding's

    endpoint(blocks, "save_training_preset")("portrait", {"name": "face", "method": "lora", "rank": 4})
    assert endpoint(blocks, "training_presets")() == ["pencil", "portrait"]
    # a DreamBooth preset need not hold its identifier and class yet (a run asks for them)
    dreambooth = PAGE | {"method": "dreambooth", "trigger": "", "class_prompt": "", "caption_dropout": None}
    assert lora.request_settings(dreambooth)["method"] == "dreambooth"
    assert endpoint(blocks, "load_training_preset")("portrait") == {"name": "face", "method": "lora", "rank": 4}

    filled = on(blocks, tab.presets.load, "click")("pencil")     # the controls, filled
    assert filled[tab.settings["method"]] == "textual_inversion" and filled[tab.settings["vectors"]] == 2
    assert filled[tab.settings["sample_prompts"]] == "a pencil-style cat\na pencil-style house"
    assert filled[tab.settings["learning_rate"]] == LEARNING_RATES["textual_inversion"]
    filled = on(blocks, tab.presets.load, "click")("portrait")   # what it leaves out: a request's defaults
    assert (filled[tab.settings["rank"]], filled[tab.settings["steps"]]) == (4, 300)
    assert filled[tab.settings["learning_rate"]] == LEARNING_RATES["lora"]

    with pytest.raises(gr.Error, match="preset's name must be"):
        endpoint(blocks, "save_training_preset")("../escape", {"name": "x"})
    with pytest.raises(gr.Error, match="No training preset 'missing' \\(presets: pencil, portrait\\)"):
        endpoint(blocks, "load_training_preset")("missing")
    with pytest.raises(gr.Error, match="Not training settings: colour"):
        endpoint(blocks, "save_training_preset")("bad", {"name": "x", "colour": "red"})
    with pytest.raises(gr.Error, match="`rank` must be"):
        endpoint(blocks, "save_training_preset")("bad", {"name": "x", "rank": 0})


def test_the_exported_settings_file_is_what_the_command_line_reads(page):
    blocks, tab, context = page
    path, hint = on(blocks, tab.presets.export, "click")("datasets/pencils", *values(tab, PAGE))
    assert path.name == "pencil-style.json"
    assert read_settings(path.read_text(), source=str(path)) == lora.request_settings(PAGE)
    model = context.models.current.source.location           # the loaded model, not the command line's default
    assert f"python -m pipelines.training --settings pencil-style.json --data models/datasets/pencils --model " \
           f"{shlex.quote(model)}`" in hint
    assert "torchrun --nproc_per_node" in hint


def test_the_tab_s_values_make_a_textual_inversion_request_with_repeats_and_sample_prompts(tmp_path):
    files = _images(tmp_path)
    table = pd.DataFrame([["image-0.png", "a cat", 3], ["image-1.png", "a house", np.nan]],
                         columns=["file", "caption", "repeats"])
    request = lora.training_request(files, table, PAGE)
    assert request.method == "textual_inversion" and request.name == "pencil-style"
    assert request.repeats == [3, 1] and request.captions == ["a cat", "a house"]
    assert request.sample_prompts == ["a pencil-style cat", "a pencil-style house"]
    assert request.learning_rate == LEARNING_RATES["textual_inversion"]
    assert (request.vectors, request.init_word, request.bucketing) == (2, "sketch", False)
    assert request.rank == 8 and not request.train_text_encoder        # the hidden LoRA settings are not its
    assert request.prompts() == ["pencil-style, a cat", "pencil-style, a house"]
    assert lora.training_request(files, None, PAGE, repeats=2).repeats == [2, 2]      # the API's, every image's
    with pytest.raises(ValueError, match="The repeats of image-0.png must be a whole number"):
        lora.training_request(files, table.assign(repeats=[1.5, 1]), PAGE)


def test_train_textual_inversion_saves_an_embedding_and_says_how_to_use_it(page, tmp_path):
    blocks, tab, context = page
    train = endpoint(blocks, "train_textual_inversion")
    updates = list(train(images=_images(tmp_path), name="tiny-style", steps=3, batch_size=2, warmup_steps=0,
                         sample_every=0, sample_steps=6, checkpoint_every=50, vectors=2, init_word="red",
                         sample_prompts="tiny-style square"))
    final = updates[-1]
    assert final[tab.result]["method"] == "textual_inversion" and final[tab.result]["embedding"] == "tiny-style"
    assert final[tab.result]["file"] == "models/embeddings/tiny-style.safetensors" and final[tab.result]["steps"] == 3
    assert (context.models.embeddings_dir / "tiny-style.safetensors").is_file()
    assert "Use it as `tiny-style` in a prompt or negative prompt" in final[tab.status]
    assert [caption.split(":")[0] for _, caption in final[tab.samples]] == ["initial vectors", "trained"]


def test_train_dreambooth_shows_the_identifier_beside_its_class_at_the_same_seeds(page, tmp_path):
    blocks, tab, _ = page
    train = endpoint(blocks, "train_dreambooth")
    final = list(train(images=_images(tmp_path), name="tiny-dog", identifier="sks dog", class_prompt="dog",
                       class_images=1, steps=2, sample_steps=6, batch_size=2, warmup_steps=0, sample_every=0,
                       checkpoint_every=50))[-1]
    assert final[tab.result]["method"] == "dreambooth" and final[tab.result]["lora"] == "tiny-dog"
    assert final[tab.result]["file"] == "models/lora/tiny-dog.safetensors"
    assert "Use it as `<lora:tiny-dog:1>`" in final[tab.status]
    captions = [caption for _, caption in final[tab.samples]]
    identifier = captions[-4].split(" · ")[0]          # the first caption with the identifier in front
    assert identifier.startswith("sks dog, ")
    assert captions[-4:] == [f"{identifier} · seed 1", "dog · seed 1", f"{identifier} · seed 2", "dog · seed 2"]
