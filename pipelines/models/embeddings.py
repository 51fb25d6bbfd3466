"""Textual-inversion embeddings used by name in any prompt, as in A1111: `a photo in my-style`.

- Files live under `models/embeddings/`, named by their stem: `.safetensors` holding one tensor (kohya's and
  A1111's `emb_params`, or diffusers' `{token: tensor}`), or A1111's pickled `.pt` (`string_to_param['*']`) and
  diffusers' `.bin`, read only with --allow-pickle (the one pickle policy, pipelines/core/paths.py). A link there
  may lead anywhere inside models/, never out of it. SDXL embeddings (`clip_l` + `clip_g`) are refused.
- An embedding of n vectors goes into the model's tokenizer and text encoder as n added tokens, `<ti:name>`,
  `<ti:name:1>`, …, that no prompt holds as written, and each whole-word mention of the name in a prompt is
  expanded to those tokens before the prompt is encoded (`notmy-stylex` stays text). The name itself is never a
  token: once its file is deleted, or refused for this model, the word is read as the words it is, not as the
  rows installed before.
- A changed file (retrained) is read again and its rows rewritten; nothing else of the text encoder changes.
- The infotext keeps the names, as A1111 does, and adds A1111's `TI hashes`.
- `save_embedding` writes the one format A1111, ComfyUI and diffusers all read (for the trainer).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken

from pipelines.core.paths import check_weights_file, confined, inside
from pipelines.core.prompts import embedding_tokens
from pipelines.io.files import sha256_hex
from pipelines.lora.adapters import file_stamp

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
A1111_KEY = "emb_params"          # what kohya and A1111 save a safetensors embedding under
SDXL_KEYS = ("clip_l", "clip_g")  # an SDXL embedding: one tensor per text encoder
WORD_CHARACTERS = r"\w-"          # a name is a whole word when no letter, digit, `_` or `-` touches it
# What a width of vectors says about the model an embedding was trained on
MADE_FOR_BY_WIDTH = {768: "an SD 1.x embedding", 1024: "an SD 2.x embedding",
                     256: "an embedding for the embedded model"}


# ----------------------------------------------------------------------------- files


def embedding_files(folder: Path) -> dict[str, Path]:
    """Name (the file's stem) -> file of every embedding under `folder` (models/embeddings/). Pickled ones are
    listed too (reading them needs --allow-pickle); a link that leads out of models/ is not listed."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    roots = embedding_roots(folder)
    return {entry.stem: entry for entry in sorted(folder.iterdir())
            if entry.suffix.lower() in EMBEDDING_SUFFIXES and entry.is_file() and inside(entry, roots)}


def embedding_roots(folder: Path) -> tuple[Path, ...]:
    """Where the files of the embeddings folder `folder` may lie once links are resolved: its models/ folder."""
    return (Path(folder).parent,)


def read_embedding(path: Path, *, allow_pickle: bool) -> torch.Tensor:
    """The vectors of the embedding file `path`, as a float32 [vectors, width] tensor."""
    return _read(Path(path), allow_pickle=allow_pickle)[0]


def _read(path: Path, *, allow_pickle: bool) -> tuple[torch.Tensor, dict]:
    """The vectors and the metadata (`step`, `sd_checkpoint`, `sd_checkpoint_name`, where the file says)."""
    check_weights_file(path, allow_pickle=allow_pickle)   # names the file and --allow-pickle
    try:
        return _read_file(path)
    except ValueError:
        raise
    except Exception as error:      # truncated, not what its suffix says, unreadable: refused, not a failed image
        raise ValueError(f"{path.name} could not be read as an embedding ({type(error).__name__}: {error}); "
                         "download or train it again.") from error


def _read_file(path: Path) -> tuple[torch.Tensor, dict]:
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as reader:
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
            metadata = reader.metadata() or {}
    else:
        # the user opted into pickles (--allow-pickle): A1111's files hold dicts, strings and old ParameterDicts
        data = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(data, dict):
            raise ValueError(f"{path.name} is not an embedding: it holds a {type(data).__name__}, not a dict.")
        parameters = data.get("string_to_param")
        parameters = getattr(parameters, "_parameters", parameters)   # a ParameterDict from old torch versions
        tensors = dict(parameters) if isinstance(parameters, dict) else \
            {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
        metadata = {"step": data.get("step"), "sd_checkpoint": data.get("hash") or data.get("sd_checkpoint"),
                    "sd_checkpoint_name": data.get("sd_checkpoint_name")}
    return _vectors(path, tensors), metadata


def _vectors(path: Path, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if any(key in tensors for key in SDXL_KEYS):
        raise ValueError(f"{path.name} is an SDXL embedding (one tensor for each of SDXL's two text encoders, "
                         "`clip_l` and `clip_g`); the studio applies embeddings to models with one CLIP text "
                         "encoder (SD 1.x/2.x and the embedded model).")
    if A1111_KEY in tensors:
        tensors = {A1111_KEY: tensors[A1111_KEY]}
    if len(tensors) != 1:
        raise ValueError(f"{path.name} is not a textual-inversion embedding: it holds {len(tensors)} tensors "
                         f"({', '.join(list(tensors)[:4]) or 'none'}), and an embedding holds one.")
    vectors = next(iter(tensors.values())).detach().float()
    vectors = vectors.unsqueeze(0) if vectors.dim() == 1 else vectors
    if vectors.dim() != 2 or vectors.shape[0] == 0:
        raise ValueError(f"{path.name} is not a textual-inversion embedding: its tensor is {list(vectors.shape)}, "
                         "not [vectors, width].")
    if not torch.isfinite(vectors).all():
        raise ValueError(f"{path.name} holds NaN or infinite values; train or download it again.")
    return vectors


def save_embedding(path: Path, vectors: torch.Tensor, *, name: str, metadata: dict) -> Path:
    """Write `vectors` ([vectors, width], or one vector) as `{"emb_params": …}` in a `.safetensors` file: what A1111
    reads, and diffusers' `load_textual_inversion(path, token=name)`. `metadata` (as text) joins the name and the
    vector count; A1111's `/embeddings` reports its `step`, `sd_checkpoint` and `sd_checkpoint_name`. The file
    appears complete or not at all (written to `.partial`, then renamed)."""
    path = Path(path)
    vectors = vectors.detach().float().cpu().contiguous()
    vectors = vectors.unsqueeze(0) if vectors.dim() == 1 else vectors
    if vectors.dim() != 2:
        raise ValueError(f"Embedding {name!r}: expected [vectors, width] but received a {list(vectors.shape)} tensor.")
    if not torch.isfinite(vectors).all():
        raise ValueError(f"Embedding {name!r} has NaN or infinite values; not saved over {path.name}.")
    text = {key: str(value) for key, value in metadata.items() if value is not None}
    text |= {"name": name, "vectors": str(vectors.shape[0])}
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file({A1111_KEY: vectors}, str(partial), metadata=text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def short_hash(path: Path) -> str:
    """A1111's `TI hashes` value (its embeddings' `shorthash`): the first 12 hex digits of the file's SHA-256."""
    return sha256_hex(path)[:12]


# ----------------------------------------------------------------------------- the text encoder


def text_width(pipeline) -> int | None:
    """The width of the vectors the pipeline's (first) text encoder takes, or None without one."""
    encoder = getattr(pipeline, "text_encoder", None)
    return encoder.get_input_embeddings().weight.shape[-1] if encoder is not None else None


def check_fits(pipeline, name: str, vectors: torch.Tensor) -> None:
    """Refuse an embedding the pipeline's text encoder cannot take, naming both widths."""
    if getattr(pipeline, "tokenizer_2", None) is not None or getattr(pipeline, "text_encoder", None) is None:
        raise ValueError(f"Embedding {name!r}: the studio applies embeddings to models with one CLIP text encoder "
                         "(SD 1.x/2.x and the embedded model); this one has two (SDXL) or none.")
    width, expected = vectors.shape[-1], text_width(pipeline)
    if width != expected:
        made_for = f" ({MADE_FOR_BY_WIDTH[width]})" if width in MADE_FOR_BY_WIDTH else ""
        raise ValueError(f"{name} has {width}-wide vectors{made_for}; this model's text encoder takes {expected}. "
                         "Use it with the model it was trained for.")


def install_embedding(pipeline, name: str, vectors: torch.Tensor) -> list[int]:
    """Put `vectors` into the pipeline's tokenizer and text encoder under `embedding_tokens(name, n)`: the missing
    tokens are added (the encoder's table grows only when it must), their rows written in the encoder's dtype and
    device. Installing a name again rewrites its rows (a retrained file). Returns the token ids."""
    check_fits(pipeline, name, vectors)
    if any(character in name for character in "<>:"):
        raise ValueError(f"Embedding {name!r}: a name with '<', '>' or ':' would be read as part of another "
                         "embedding's tokens; rename its file.")
    tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
    tokens = embedding_tokens(name, vectors.shape[0])
    tokenizer.add_tokens([AddedToken(token, single_word=True) for token in tokens])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if max(ids) >= encoder.get_input_embeddings().weight.shape[0]:
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)   # the new rows are written next
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = vectors.to(device=table.device, dtype=table.dtype)
    return ids


@dataclass
class LoadedEmbedding:
    name: str
    path: Path             # the file read, links resolved
    hash: str              # A1111's short hash (TI hashes)
    token_ids: list[int]   # its tokens' rows in the text encoder
    stamp: tuple           # the file's (size, mtime) when read: a changed file is read again
    metadata: dict = field(default_factory=dict)

    @property
    def vectors(self) -> int:
        return len(self.token_ids)


def load_embedding(pipeline, name: str, path: Path, *, roots: tuple[Path, ...], allow_pickle: bool) -> LoadedEmbedding:
    """Read embedding `name` from `path` (refused when it leads outside `roots`, links resolved) into `pipeline`."""
    path = confined(path, roots, what=f"Embedding {name!r}:", into="models/embeddings/")
    stamp = file_stamp(path)
    vectors, metadata = _read(path, allow_pickle=allow_pickle)
    return LoadedEmbedding(name=name, path=path, hash=short_hash(path), stamp=stamp, metadata=metadata,
                           token_ids=install_embedding(pipeline, name, vectors))


# ----------------------------------------------------------------------------- prompts


def _names_pattern(names: Iterable[str]) -> re.Pattern | None:
    """Any of `names` as a whole word, case-insensitively; the longest first."""
    names = sorted({name for name in names if name}, key=len, reverse=True)
    if not names:
        return None
    alternatives = "|".join(re.escape(name) for name in names)
    return re.compile(rf"(?<![{WORD_CHARACTERS}])(?:{alternatives})(?![{WORD_CHARACTERS}])", re.IGNORECASE)


def embeddings_in(text: str, names: Iterable[str]) -> list[str]:
    """The embedding names (among `names`) that `text` uses as whole words, in `names`' order."""
    names = list(names)
    pattern = _names_pattern(names)
    found = {match.group(0).lower() for match in pattern.finditer(text)} if pattern else set()
    return [name for name in names if name.lower() in found]


def expand_embedding_names(text: str, names_to_counts: dict[str, int]) -> str:
    """`text` with each whole-word mention of an embedding's name (any case) replaced by its tokens,
    `<ti:name> <ti:name:1> …` (A1111 reads the name as that many vectors in a row)."""
    pattern = _names_pattern(names_to_counts)
    if pattern is None:
        return text
    counts = {name.lower(): count for name, count in names_to_counts.items()}
    return pattern.sub(lambda match: " ".join(embedding_tokens(match.group(0), counts[match.group(0).lower()])), text)


def ti_hashes(text: str, loaded: dict[str, LoadedEmbedding]) -> str | None:
    """A1111's `TI hashes` infotext value for the embeddings applied to `text` (the texts as the encoder read them,
    each applied name expanded to its tokens): "name: hash, name: hash" (names without `:` and `,`, as A1111 writes
    them), or None. A name read as words (its file gone, or refused) has no hash."""
    text = text.lower()
    used = [name for name in loaded if embedding_tokens(name, 1)[0] in text]
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {loaded[name].hash}" for name in used) or None


# ----------------------------------------------------------------------------- listing


@dataclass
class EmbeddingInfo:
    """What the REST API lists: an embedding file, and why it does not fit the loaded model (None: it fits)."""
    name: str
    vectors: int | None
    width: int | None
    metadata: dict
    problem: str | None


def describe_embeddings(folder: Path, pipeline, *, allow_pickle: bool) -> list[EmbeddingInfo]:
    """Every file under `folder`, read (not installed), and whether it fits `pipeline` (None: no model loaded)."""
    described = []
    for name, path in embedding_files(folder).items():
        try:
            vectors, metadata = _read(path, allow_pickle=allow_pickle)
        except Exception as error:   # unreadable, pickled without --allow-pickle, SDXL: listed, with the reason
            described.append(EmbeddingInfo(name, None, None, {}, str(error)))
            continue
        problem = "No model is loaded." if pipeline is None else None
        if pipeline is not None:
            try:
                check_fits(pipeline, name, vectors)
            except ValueError as error:
                problem = str(error)
        described.append(EmbeddingInfo(name, vectors.shape[0], vectors.shape[1], metadata, problem))
    return described
