"""Prompts as the text encoder reads them: A1111's emphasis syntax, BREAK, and prompts longer than the window.

Emphasis, as in A1111 (modules/prompt_parser.py; its rules and examples are kept in tests/test_prompt_weighting.py):

    (word)  × 1.1        ((word))  × 1.21        (word:1.5)  × 1.5        [word]  ÷ 1.1
    \\( \\) \\[ \\] \\\\   the literal character      BREAK   starts a new window

A weighted prompt is encoded window by window and each token's embedding multiplied by its weight, then the
window rescaled so that its mean is what it was: A1111's "Original" emphasis (modules/sd_emphasis.py). The
infotext says so with `Emphasis: Original`. A prompt without weights or BREAK goes the plain way, so it gives
the very same image as before weights existed.

A CLIP text encoder reads at most `model_max_length` tokens (77 for SD, 24 for the embedded model). Like A1111
we split a longer prompt into windows, encode each window with its own start/end tokens, and concatenate the
embeddings along the sequence axis: cross-attention accepts any sequence length. The negative prompt is padded
with empty windows to the same length, since the conditional and unconditional passes share one batch.

LoRA tags (`<lora:name:weight>`) are prompt syntax too: `split_lora_tags` takes them out of the text the
encoder reads and says which LoRAs the prompt asks for (pipelines/lora/ applies them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pipelines.core.checks import NUMBER_RANGES, check_number

EMPHASIS = "Original"             # A1111's name for the emphasis we apply
ROUND_BRACKET_FACTOR = 1.1
SQUARE_BRACKET_FACTOR = 1 / 1.1   # A1111 multiplies by this rather than dividing: the same floats as A1111
BREAK = "BREAK"
BREAK_WEIGHT = -1                 # A1111's mark of a BREAK among the parsed fragments

# A1111's tokens of the emphasis syntax, in its order of preference.
EMPHASIS_TOKEN = re.compile(r"""
    \\[()\[\]\\]?             # an escaped bracket or backslash: that character; a lone backslash: nothing
  | \(                        # opens a group weighted × 1.1, or by the weight its closing gives
  | \[                        # opens a group weighted ÷ 1.1
  | :\s*([+-]?[.\d]+)\s*\)    # closes a ( group with its weight: `:1.5)`
  | \)
  | ]
  | [^\\()\[\]:]+             # text
  | :                         # a colon that closes nothing is text
""", re.VERBOSE)
BREAK_PATTERN = re.compile(r"\s*\bBREAK\b\s*", re.S)


# ----------------------------------------------------------------------------- A1111's emphasis syntax


def parse_prompt_attention(text: str) -> list[list]:
    """[fragment, weight] pairs of a prompt, as A1111's parser of the same name returns them (its rules, and its
    outputs to the last float digit): a BREAK is the pair ["BREAK", -1], and neighbours of equal weight merge."""
    fragments: list[list] = []
    open_round: list[int] = []     # where each open bracket's fragments start
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in EMPHASIS_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), _weight(weight, text))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_BRACKET_FACTOR)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_BRACKET_FACTOR)
        else:   # text, or a bracket that closes nothing
            for index, part in enumerate(BREAK_PATTERN.split(token)):
                if index > 0:
                    fragments.append([BREAK, BREAK_WEIGHT])
                fragments.append([part, 1.0])
    # brackets left open weigh everything after them
    for start in open_round:
        multiply_from(start, ROUND_BRACKET_FACTOR)
    for start in open_square:
        multiply_from(start, SQUARE_BRACKET_FACTOR)

    merged: list[list] = []
    for fragment in fragments or [["", 1.0]]:
        if merged and merged[-1][1] == fragment[1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return merged


def _weight(text: str, prompt: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"The weight {text!r} in the prompt {prompt!r} is not a number; write weights as in "
                         "(word:1.2), and literal brackets as \\( and \\).") from None


def _is_break(fragment: list) -> bool:
    return fragment[0] == BREAK and fragment[1] == BREAK_WEIGHT


def uses_emphasis(text: str) -> bool:
    """Whether the prompt weighs any of its words (BREAK alone is no emphasis)."""
    return any(fragment[1] != 1.0 for fragment in parse_prompt_attention(text) if not _is_break(fragment))


def _is_plain(fragments: list[list]) -> bool:
    return len(fragments) == 1 and fragments[0][1] == 1.0


# ----------------------------------------------------------------------------- windows


def token_count(tokenizer, text: str) -> int:
    """Tokens of `text`, without the start and end tokens."""
    return len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def window(tokenizer) -> int:
    return tokenizer.model_max_length - 2


def needs_chunking(pipeline, *texts: str) -> bool:
    tokenizer = getattr(pipeline, "tokenizer", None)
    return tokenizer is not None and any(token_count(tokenizer, t) > window(tokenizer) for t in texts)


def has_added_tokens(tokenizer, *texts: str) -> bool:
    """Whether a text holds tokens added to the tokenizer's vocabulary (textual-inversion embeddings)."""
    return any(token >= tokenizer.vocab_size for text in texts if text
               for token in tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def can_chunk(pipeline) -> bool:
    """Only single-encoder CLIP pipelines (SD 1.x/2.x family) take chunked embeddings here."""
    return getattr(pipeline, "tokenizer", None) is not None and getattr(pipeline, "tokenizer_2", None) is None \
        and getattr(pipeline, "text_encoder", None) is not None


def embedding_tokens(name: str, count: int) -> list[str]:
    """The tokens a textual-inversion embedding of `count` vectors is installed under (pipelines/models/
    embeddings.py): `<ti:name>`, `<ti:name:1>`, …, lower-cased (CLIP's tokenizers lower-case the text before they
    look for added tokens)."""
    token = name.lower()
    return [f"<ti:{token}>"] + [f"<ti:{token}:{index}>" for index in range(1, count)]


EMBEDDING_VECTOR = re.compile(r"<ti:.+:\d+>")    # an embedding's second vector and those after it


def _units(tokenizer, ids: list[int]) -> list[list[int]]:
    """`ids` in the pieces a window must not split: each embedding's vectors together (A1111 moves an embedding
    that does not fit what is left of a window to the next), every other token alone."""
    units: list[list[int]] = []
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if units and token_id >= tokenizer.vocab_size and EMBEDDING_VECTOR.fullmatch(token):
            units[-1].append(token_id)
        else:
            units.append([token_id])
    return units


def _windows(tokenizer, text: str) -> list[list[int]]:
    windows, _ = _weighted_windows(tokenizer, [[text, 1.0]])
    return windows


def _weighted_windows(tokenizer, fragments: list[list]) -> tuple[list[list[int]], list[list[float]]]:
    """Token ids and their weights, window by window, as A1111 fills its chunks: a full window or a BREAK
    starts the next one (a BREAK even when the window is empty)."""
    size = window(tokenizer)
    windows: list[list[int]] = []
    weights: list[list[float]] = []
    ids: list[int] = []
    multipliers: list[float] = []

    def close_window() -> None:
        nonlocal ids, multipliers
        windows.append(ids)
        weights.append(multipliers)
        ids, multipliers = [], []

    for fragment in fragments:
        if _is_break(fragment):
            close_window()
            continue
        text, weight = fragment
        for unit in _units(tokenizer, tokenizer(text, add_special_tokens=False, truncation=False).input_ids):
            if ids and len(ids) + len(unit) > size >= len(unit):     # an embedding goes whole to the next window
                close_window()
            for token in unit:
                if len(ids) == size:
                    close_window()
                ids.append(token)
                multipliers.append(weight)
    if ids or not windows:
        close_window()
    return windows, weights


def _encode_windows(pipeline, windows: list[list[int]], device,
                    weights: list[list[float]] | None = None) -> torch.Tensor:
    tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [[tokenizer.bos_token_id, *w, tokenizer.eos_token_id] + [pad] * (length - len(w) - 2) for w in windows]
    ids = torch.tensor(rows, device=device)
    with torch.no_grad():
        hidden = encoder(ids)[0]                      # (windows, length, width)
    if weights is not None:
        # the start, end and padding tokens keep weight 1, as in A1111
        multipliers = torch.tensor([[1.0, *w] + [1.0] * (length - len(w) - 1) for w in weights], device=hidden.device)
        hidden = _original_emphasis(hidden.float(), multipliers)
    return hidden.reshape(1, -1, hidden.shape[-1]).to(pipeline.unet.dtype)


def _original_emphasis(hidden: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis, window by window: z ← z · w (per token), then z ← z · mean(z_before) / mean(z)."""
    mean_before = hidden.mean(dim=(1, 2), keepdim=True)
    weighted = hidden * multipliers[..., None]
    return weighted * (mean_before / weighted.mean(dim=(1, 2), keepdim=True))


def _same_count(prompt_rows: list, negative_rows: list, empty) -> tuple[list, list]:
    count = max(len(prompt_rows), len(negative_rows))
    return prompt_rows + [empty] * (count - len(prompt_rows)), negative_rows + [empty] * (count - len(negative_rows))


def chunked_embeddings(pipeline, prompt: str, negative_prompt: str, device) -> dict:
    """`prompt_embeds` and `negative_prompt_embeds` for a prompt longer than one window."""
    prompt_windows, negative_windows = _same_count(_windows(pipeline.tokenizer, prompt),
                                                   _windows(pipeline.tokenizer, negative_prompt), [])
    return {"prompt_embeds": _encode_windows(pipeline, prompt_windows, device),
            "negative_prompt_embeds": _encode_windows(pipeline, negative_windows, device)}


def weighted_embeddings(pipeline, prompt: list[list], negative_prompt: list[list], device) -> tuple[dict, int]:
    """`prompt_embeds` and `negative_prompt_embeds` for parsed prompts with weights or BREAKs, and the number of
    windows each was encoded in."""
    prompt_windows, prompt_weights = _weighted_windows(pipeline.tokenizer, prompt)
    negative_windows, negative_weights = _weighted_windows(pipeline.tokenizer, negative_prompt)
    prompt_windows, negative_windows = _same_count(prompt_windows, negative_windows, [])
    prompt_weights, negative_weights = _same_count(prompt_weights, negative_weights, [])
    return {"prompt_embeds": _encode_windows(pipeline, prompt_windows, device, prompt_weights),
            "negative_prompt_embeds": _encode_windows(pipeline, negative_windows, device, negative_weights)}, \
        len(prompt_windows)


# ----------------------------------------------------------------------------- what the pipeline call takes


def prompt_arguments(pipeline, prompt: str, negative_prompt: str, device, *,
                     emphasis: bool = True) -> tuple[dict, str | None]:
    """Pipeline keyword arguments for the prompts, and a note for the user when they were encoded in windows.

    With `emphasis` (A1111's syntax applies) a prompt with weights or BREAK becomes embeddings; otherwise, and
    for a prompt without them, the text (its escapes resolved) goes to the pipeline as before. Without
    `emphasis` the text is read literally.
    """
    if emphasis:
        parsed_prompt, parsed_negative = parse_prompt_attention(prompt), parse_prompt_attention(negative_prompt)
        if not (_is_plain(parsed_prompt) and _is_plain(parsed_negative)):
            return _weighted_arguments(pipeline, parsed_prompt, parsed_negative, device)
        prompt, negative_prompt = parsed_prompt[0][0], parsed_negative[0][0]
    long = needs_chunking(pipeline, prompt, negative_prompt)
    # diffusers' encode_prompt would expand embedding names again (maybe_convert_prompt), and these texts have
    # theirs expanded already (the manager's use_embeddings): their tokens are encoded here, as they stand
    if not long and not (can_chunk(pipeline) and has_added_tokens(pipeline.tokenizer, prompt, negative_prompt)):
        return {"prompt": prompt, "negative_prompt": negative_prompt or None}, None
    tokens = max(token_count(pipeline.tokenizer, prompt), token_count(pipeline.tokenizer, negative_prompt))
    if not can_chunk(pipeline):
        raise ValueError(f"The prompt is {tokens} tokens long but this model reads at most "
                         f"{window(pipeline.tokenizer)}; shorten it.")
    if not long:
        return chunked_embeddings(pipeline, prompt, negative_prompt, device), None
    windows = -(-tokens // window(pipeline.tokenizer))
    note = (f"The prompt is {tokens} tokens; this model reads {window(pipeline.tokenizer)} at a time, "
            f"so it was encoded in {windows} windows.")
    return chunked_embeddings(pipeline, prompt, negative_prompt, device), note


def _weighted_arguments(pipeline, prompt: list[list], negative_prompt: list[list], device) -> tuple[dict, str | None]:
    if not can_chunk(pipeline):
        raise ValueError("Prompt weights such as (word:1.2) or [word], and BREAK, are applied on models with one "
                         "CLIP text encoder (SD 1.x/2.x); this one has more. Take them out of the prompt, and write "
                         "brackets meant literally as \\( \\) \\[ \\].")
    arguments, windows = weighted_embeddings(pipeline, prompt, negative_prompt, device)
    note = None
    if windows > 1:
        note = (f"The prompt was encoded in {windows} windows of {window(pipeline.tokenizer)} tokens "
                f"(a longer prompt, or BREAK, starts the next one).")
    return arguments, note


# ----------------------------------------------------------------------------- LoRA tags (A1111's <lora:name:weight>)


LORA_TAG = re.compile(r"<lora:([^:>]+)(?::\s*([-+]?(?:\d+\.?\d*|\.\d+)))?\s*>")




@dataclass(frozen=True)
class LoraUse:
    name: str
    weight: float


MALFORMED_TAG = re.compile(r"<lora:[^>]*>")


def split_lora_tags(prompt: str) -> tuple[str, list[LoraUse]]:
    """The prompt without its `<lora:name:weight>` tags, and the LoRAs they ask for (weight 1 when left out).
    A prompt without tags comes back exactly as it was."""
    malformed = [tag for tag in MALFORMED_TAG.findall(prompt) if not LORA_TAG.fullmatch(tag)]
    if malformed:
        raise ValueError(f"{malformed[0]} is not a LoRA tag this studio reads: write <lora:name> or "
                         "<lora:name:0.8> (a plain decimal weight).")
    if not LORA_TAG.search(prompt):
        return prompt, []
    uses = {}
    for match in LORA_TAG.finditer(prompt):
        name, weight = match.group(1).strip(), float(match.group(2)) if match.group(2) else 1.0
        check_number(f"<lora:{name}:…>", weight, *NUMBER_RANGES["lora_weight"], "'s weight")
        uses[name] = LoraUse(name, weight)       # a LoRA named twice: the last weight counts, as in A1111
    text = re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt)).strip(" ,")
    return text, list(uses.values())


def prompt_texts(request) -> tuple[str, str, list[LoraUse], list[str]]:
    """The prompt and negative prompt as the text encoder reads them (LoRA tags taken out), the LoRAs the
    prompt asks for, and notes. Tags in the negative prompt are taken out and not applied, as in A1111."""
    prompt, uses = split_lora_tags(request.prompt)
    negative_prompt, ignored = split_lora_tags(request.negative_prompt)
    notes = [f"<lora:{use.name}:…> in the negative prompt is not applied; LoRAs go in the prompt."
             for use in ignored]
    return prompt, negative_prompt, uses, notes
