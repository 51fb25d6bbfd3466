"""A1111's prompt emphasis (pipelines/core/prompts.py): its parser's rules, checked against the examples in A1111's own
docstring (modules/prompt_parser.py), its "Original" emphasis, BREAK, and what a weight does to an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.core.prompts import (BREAK, BREAK_WEIGHT, _original_emphasis, parse_prompt_attention, prompt_arguments,
                                    uses_emphasis)
from pipelines.io.metadata import parse_infotext
from pipelines.tasks.txt2img import Txt2ImgRequest

# A1111's doctests of parse_prompt_attention, to the last float digit
A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]


@pytest.mark.parametrize("text, parsed", A1111_EXAMPLES)
def test_the_parser_gives_a1111s_own_answers(text, parsed):
    assert parse_prompt_attention(text) == parsed


def test_break_splits_the_prompt_and_is_not_emphasis():
    assert parse_prompt_attention("red apple BREAK green leaf") == [["red apple", 1.0], [BREAK, BREAK_WEIGHT],
                                                                    ["green leaf", 1.0]]
    assert parse_prompt_attention("BREAKFAST") == [["BREAKFAST", 1.0]]          # only the whole word
    assert not uses_emphasis("red apple BREAK green leaf") and uses_emphasis("[red] apple")
    assert not uses_emphasis("\\(red\\) apple")                                  # escaped: literal brackets


def test_a_weight_that_is_not_a_number_is_refused_by_name():
    # A1111's pattern takes `:1.2.3)` as a weight and then fails on it; we say which one
    with pytest.raises(ValueError, match=r"The weight '1\.2\.3' in the prompt .* is not a number"):
        parse_prompt_attention("(red:1.2.3) apple")


def test_original_emphasis_scales_each_token_and_keeps_the_windows_mean():
    hidden = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    multipliers = torch.tensor([[1.0, 1.5, 1.0, 1.0, 0.5, 1.0], [1.0] * 6])
    weighted = _original_emphasis(hidden, multipliers)
    torch.testing.assert_close(weighted.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)))
    ratio = weighted[0] / hidden[0]                       # one factor per token, the mean's correction apart
    torch.testing.assert_close(ratio[1] / ratio[0], torch.full((8,), 1.5))
    torch.testing.assert_close(ratio[4] / ratio[0], torch.full((8,), 0.5))
    torch.testing.assert_close(weighted[1], hidden[1])    # a window without weights is untouched


def test_plain_prompts_go_to_the_pipeline_as_text_and_weights_become_embeddings(studio):
    pipeline = studio.models.current.pipeline
    plain, _ = prompt_arguments(pipeline, "red apple", "", "cpu")
    assert plain == {"prompt": "red apple", "negative_prompt": None}
    escaped, _ = prompt_arguments(pipeline, "\\(red\\) apple", "", "cpu")
    assert escaped["prompt"] == "(red) apple"
    literal, _ = prompt_arguments(pipeline, "(red) apple", "", "cpu", emphasis=False)   # LoRA captions
    assert literal["prompt"] == "(red) apple"

    weighted, _ = prompt_arguments(pipeline, "(red:1.5) apple", "", "cpu")
    reference, _ = prompt_arguments(pipeline, "red apple", "", "cpu")
    length = pipeline.tokenizer.model_max_length
    assert weighted["prompt_embeds"].shape == weighted["negative_prompt_embeds"].shape == (1, length, pipeline.text_encoder.config.hidden_size)
    with torch.no_grad():
        plain_embeds, _ = pipeline.encode_prompt("red apple", "cpu", 1, False)
    assert not torch.allclose(weighted["prompt_embeds"], plain_embeds)
    # weight 1 everywhere is the plain prompt (A1111 multiplies by 1 and rescales by 1)
    ones, _ = prompt_arguments(pipeline, "(red apple:1.0)", "", "cpu")
    assert ones == reference


def test_break_starts_a_new_window(studio):
    pipeline = studio.models.current.pipeline
    arguments, note = prompt_arguments(pipeline, "red BREAK apple", "", "cpu")
    length = pipeline.tokenizer.model_max_length
    assert arguments["prompt_embeds"].shape[1] == 2 * length and "2 windows" in note
    assert arguments["negative_prompt_embeds"].shape[1] == 2 * length     # padded to the same windows


def test_a_weighted_prompt_changes_the_image_and_the_infotext_says_emphasis(studio):
    common = dict(steps=4, seed=3, width=64, height=64, sampler="DDIM")
    plain = studio.generate(Txt2ImgRequest(prompt="red apple", **common)).images[0]
    weighted = studio.generate(Txt2ImgRequest(prompt="(red:1.6) apple", **common)).images[0]
    lighter = studio.generate(Txt2ImgRequest(prompt="[red] apple", **common)).images[0]
    assert parse_infotext(weighted.infotext)[2]["Emphasis"] == "Original"
    assert "Emphasis" not in parse_infotext(plain.infotext)[2]
    pixels = [np.asarray(item.image, dtype=np.int16) for item in (plain, weighted, lighter)]
    assert np.abs(pixels[1] - pixels[0]).mean() > 1.0 and np.abs(pixels[2] - pixels[0]).mean() > 0.1
    assert parse_infotext(weighted.infotext)[0] == "(red:1.6) apple"        # the prompt is recorded as written
