"""UI helpers that need no browser: restoring settings from infotexts, the error boundary."""

from __future__ import annotations

import gradio as gr
import pytest

from studio.errors import user_errors
from studio.tabs.generate import settings_from_infotext

A1111 = ("a castle on a hill, sunset\nNegative prompt: blurry, lowres\n"
         "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3456, Size: 512x768, "
         "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")


def test_a1111_infotext_restores_into_the_tab_controls():
    prompt, negative, sampler, steps, cfg, rescale, width, height, seed = settings_from_infotext(A1111)
    assert (prompt, negative) == ("a castle on a hill, sunset", "blurry, lowres")
    assert (sampler, steps, cfg, rescale, width, height, seed) == ("DPM++ 2M Karras", 30, 6.5, 0.0, 512, 768, 3456)


def test_text_without_parameters_is_refused_clearly():
    with pytest.raises(gr.Error, match="no `Steps"):
        settings_from_infotext("just a prompt")


def test_error_boundary_turns_bad_input_into_gr_error_and_keeps_generators_streaming():
    @user_errors
    def handler(value):
        if value < 0:
            raise ValueError(f"`value` must be positive but is {value}.")
        return value

    @user_errors
    def streaming(count):
        yield from range(count)
        raise RuntimeError("disk on fire")

    assert handler(2) == 2
    with pytest.raises(gr.Error, match="must be positive but is -1"):
        handler(-1)
    stream = streaming(2)
    assert [next(stream), next(stream)] == [0, 1]
    with pytest.raises(gr.Error, match="Unexpected error \\(RuntimeError: disk on fire\\).*still running"):
        next(stream)
