"""Prompts longer than the tokenizer window.

A CLIP text encoder reads at most `model_max_length` tokens (77 for SD, 24 for the embedded
model). Like A1111 we split a longer prompt into windows, encode each window with its own
start/end tokens, and concatenate the embeddings along the sequence axis: cross-attention
accepts any sequence length. The negative prompt is padded with empty windows to the same
length, since the conditional and unconditional passes share one batch.
"""

from __future__ import annotations

import torch


def token_count(tokenizer, text: str) -> int:
    """Tokens of `text`, without the start and end tokens."""
    return len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def window(tokenizer) -> int:
    return tokenizer.model_max_length - 2


def needs_chunking(pipeline, *texts: str) -> bool:
    tokenizer = getattr(pipeline, "tokenizer", None)
    return tokenizer is not None and any(token_count(tokenizer, t) > window(tokenizer) for t in texts)


def can_chunk(pipeline) -> bool:
    """Only single-encoder CLIP pipelines (SD 1.x/2.x family) take chunked embeddings here."""
    return getattr(pipeline, "tokenizer", None) is not None and getattr(pipeline, "tokenizer_2", None) is None \
        and getattr(pipeline, "text_encoder", None) is not None


def _windows(tokenizer, text: str) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    size = window(tokenizer)
    return [ids[i:i + size] for i in range(0, len(ids), size)] or [[]]


def _encode_windows(pipeline, windows: list[list[int]], device) -> torch.Tensor:
    tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [[tokenizer.bos_token_id, *w, tokenizer.eos_token_id] + [pad] * (length - len(w) - 2) for w in windows]
    ids = torch.tensor(rows, device=device)
    with torch.no_grad():
        hidden = encoder(ids)[0]                      # (windows, length, width)
    return hidden.reshape(1, -1, hidden.shape[-1]).to(pipeline.unet.dtype)


def chunked_embeddings(pipeline, prompt: str, negative_prompt: str, device) -> dict:
    """`prompt_embeds` and `negative_prompt_embeds` for a prompt longer than one window."""
    prompt_windows = _windows(pipeline.tokenizer, prompt)
    negative_windows = _windows(pipeline.tokenizer, negative_prompt)
    count = max(len(prompt_windows), len(negative_windows))
    prompt_windows += [[]] * (count - len(prompt_windows))
    negative_windows += [[]] * (count - len(negative_windows))
    return {"prompt_embeds": _encode_windows(pipeline, prompt_windows, device),
            "negative_prompt_embeds": _encode_windows(pipeline, negative_windows, device)}


def prompt_arguments(pipeline, prompt: str, negative_prompt: str, device) -> tuple[dict, str | None]:
    """Pipeline keyword arguments for the prompts, and a note for the user when chunked."""
    if not needs_chunking(pipeline, prompt, negative_prompt):
        return {"prompt": prompt, "negative_prompt": negative_prompt or None}, None
    tokens = max(token_count(pipeline.tokenizer, prompt), token_count(pipeline.tokenizer, negative_prompt))
    if not can_chunk(pipeline):
        raise ValueError(f"The prompt is {tokens} tokens long but this model reads at most "
                         f"{window(pipeline.tokenizer)}; shorten it.")
    windows = -(-tokens // window(pipeline.tokenizer))
    note = (f"The prompt is {tokens} tokens; this model reads {window(pipeline.tokenizer)} at a time, "
            f"so it was encoded in {windows} windows.")
    return chunked_embeddings(pipeline, prompt, negative_prompt, device), note
