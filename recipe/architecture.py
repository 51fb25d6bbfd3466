"""The embedded model's parts, in the standard Stable Diffusion layout, at emoji size.

64x64 RGB --VAE (f=8)--> 8x8x4 latents; a 3-layer CLIP text encoder over a BPE vocabulary
learnt from our captions; a cross-attention UNet; the scaled-linear DDPM schedule of SD 1.x.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

IMAGE_SIZE = 64
MAX_TOKENS = 24   # captions are short; longer prompts are chunked by the studio
TEXT_WIDTH = 256
LATENT_CHANNELS = 4       # the shipped model: Stable Diffusion's 4 channels
WIDE_LATENT_CHANNELS = 8  # stage 1 of the recipe trains on 8, then narrows to 4 (recipe/project.py)
LATENT_SIZE = IMAGE_SIZE // 8


def vae(latent_channels: int = LATENT_CHANNELS) -> AutoencoderKL:
    # f=8 keeps the UNet's work at 8x8 (about half the time of f=4 per step on a CPU).
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16,
        sample_size=IMAGE_SIZE, mid_block_add_attention=False)


def text_encoder(vocab_size: int, eos_token_id: int, pad_token_id: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=eos_token_id - 1))


def unet(latent_channels: int = LATENT_CHANNELS) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(128, 192, 256), layers_per_block=1, norm_num_groups=32,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8)


def scheduler() -> DDPMScheduler:
    # Stable Diffusion 1.x's schedule: scaled-linear betas, epsilon prediction.
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon",
                         clip_sample=False, steps_offset=1)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_tokenizer(phrases: list[str], folder: Path, merges: int = 3000) -> CLIPTokenizer:
    """Learn a CLIP-format BPE (vocab.json + merges.txt) from our caption phrases.

    Pre-tokenisation is CLIP's own (lower-case words, digits, punctuation runs; each byte mapped
    to a printable character; "</w>" marks a word's end), so the stock CLIPTokenizer reads it.
    """
    import regex
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    byte_chars = bytes_to_unicode()
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                            regex.IGNORECASE)
    words = [" ".join("".join(byte_chars[b] for b in w.encode()) for w in pattern.findall(p.lower()))
             for p in phrases]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    base = sorted(set(byte_chars.values()))
    trainer = trainers.BpeTrainer(vocab_size=2 * len(base) + merges, initial_alphabet=base,
                                  end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(words, trainer)
    learnt_merges = [" ".join(pair) for pair in bpe.model.get_merges()] \
        if hasattr(bpe.model, "get_merges") else _merges_from_saved(bpe)

    vocab: dict[str, int] = {}
    for token in base + [c + "</w>" for c in base]:
        vocab.setdefault(token, len(vocab))
    for merge in learnt_merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(learnt_merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True}))
    return CLIPTokenizer.from_pretrained(folder)


def _merges_from_saved(bpe) -> list[str]:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        bpe.model.save(tmp)
        lines = Path(tmp, "merges.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]
