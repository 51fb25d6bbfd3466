"""A LoRA training's data: the files it is given (dropped files, .zip archives, or a dataset folder under
models/), read into images and captions; then, once per run, what the loop reads at every step: the
latents of each image (and of its mirror image) and each caption's text embedding. The VAE and the text
encoder are frozen, so neither changes during a run."""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from pipelines.core.checks import MAX_INPUT_PIXELS
from pipelines.core.denoiser import prompt_embeddings
from pipelines.core.images import fit_image, image_to_tensor, open_capped
from pipelines.core.paths import confined
from pipelines.core.vae import encode
from pipelines.training.request import MAX_IMAGES, LoraTrainingRequest
from pipelines.tasks.txt2img import Txt2ImgRequest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_FILE_BYTES = 50 << 20
MAX_DATASET_BYTES = 1 << 30


@dataclass
class TrainingImage:
    name: str
    image: Image.Image
    caption: str


# ----------------------------------------------------------------------------- files -> images and captions


def dataset_folder(spec: str, models_dir: Path) -> list[Path]:
    """The files of a dataset folder, which must lie under the app's models/ folder, as must every file in it
    once its links are resolved (the one path policy, pipelines/models/sources.py): a link to a picture
    elsewhere is refused, never read. Returns the resolved paths, so that what is read is what was checked."""
    advice = " (e.g. models/datasets/my-style) and name it relative to models/"
    folder = confined(models_dir / spec, [models_dir], what="The dataset folder", advice=advice)
    if not folder.is_dir():
        raise ValueError(f"No folder {folder}: name a dataset folder under {models_dir} (e.g. datasets/my-style).")
    return sorted(confined(path, [models_dir], what=f"The file {path.name} of the dataset folder {spec!r}",
                           advice=" (a copy, not a link to a file elsewhere)")
                  for path in folder.iterdir() if path.is_file())


def read_dataset(paths: list[str | Path]) -> list[TrainingImage]:
    """Images from files and .zip archives (read in memory, nothing extracted); each caption from a .txt
    file of the same name, or else from the file name ("red_apple-2.png" -> "red apple"). Each image is
    decoded only once its header declares at most MAX_INPUT_PIXELS pixels (a small file can declare a huge
    picture: a decompression bomb)."""
    files = _read_files(paths)
    images = [name for name in files if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    if len(images) > MAX_IMAGES:
        raise ValueError(f"At most {MAX_IMAGES} images train one LoRA here, but {len(images)} were given.")
    dataset = []
    for name in sorted(images):
        image = ImageOps.exif_transpose(open_capped(files[name], name, max_pixels=MAX_INPUT_PIXELS))  # upright
        sidecar = files.get(Path(name).stem + ".txt")
        caption = sidecar.decode("utf-8", errors="replace").strip() if sidecar is not None else \
            re.sub(r"[-_\d]+", " ", Path(name).stem).strip()
        dataset.append(TrainingImage(name=name, image=image.convert("RGB"), caption=caption))
    if not dataset:
        raise ValueError("No images among the files given (png, jpg, webp or bmp, or a .zip of them).")
    return dataset


def _read_files(paths: list[str | Path]) -> dict[str, bytes]:
    """name -> bytes of every image and caption file given, archives opened; sizes capped before reading."""
    files: dict[str, bytes] = {}

    def add(name: str, size: int, read) -> None:
        if name in files:
            raise ValueError(f"Two files are named {name}; rename one (captions pair with images by name).")
        if size > MAX_FILE_BYTES or sum(map(len, files.values())) + size > MAX_DATASET_BYTES:
            raise ValueError(f"{name} makes the dataset too big: at most {MAX_FILE_BYTES >> 20} MB a file and "
                             f"{MAX_DATASET_BYTES >> 20} MB in all.")
        files[name] = read()

    wanted = IMAGE_SUFFIXES + (".txt",)
    for path in map(Path, paths):
        if path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and Path(info.filename).suffix.lower() in wanted:
                        add(Path(info.filename).name, info.file_size, lambda info=info: archive.read(info))
        elif path.suffix.lower() in wanted:
            add(path.name, path.stat().st_size, path.read_bytes)
    return files


# ----------------------------------------------------------------------------- images -> what the loop reads


@dataclass
class TrainingData:
    """The training data, computed once: the cropped images, their latents (and their mirror images'),
    each caption's text embedding, and the empty caption's."""
    pictures: list
    latents: torch.Tensor
    mirrored: torch.Tensor
    embeddings: torch.Tensor
    empty: torch.Tensor


@torch.no_grad()
def prepare_data(pipeline, request: LoraTrainingRequest, side: int) -> TrainingData:
    """The images cropped around their centre to side×side; the latents (the VAE's posterior mean) of each and
    of its mirror image, for flips; each prompt (trigger + caption) encoded as written."""
    device, dtype = pipeline._execution_device, pipeline.unet.dtype
    pictures = [fit_image(image, side, side) for image in request.images]

    def latents_of(images: list) -> torch.Tensor:
        return torch.cat([encode(pipeline.vae, image_to_tensor(image).to(device)) for image in images]).to(dtype)

    empty = _embed(pipeline, "", device)
    # captions longer than the tokenizer's window are encoded in windows (pipelines/core/prompts.py); pad the
    # shorter ones with empty windows, as the prompt/negative pair is padded, so they stack
    encoded = [_embed(pipeline, text, device) for text in request.prompts()]
    longest = max(item.shape[1] for item in encoded)
    return TrainingData(pictures=pictures, latents=latents_of(pictures),
                        mirrored=latents_of([ImageOps.mirror(picture) for picture in pictures]),
                        embeddings=torch.cat([_pad(item, empty, longest) for item in encoded]),
                        empty=_pad(empty, empty, longest))


def _embed(pipeline, text: str, device) -> torch.Tensor:
    request = Txt2ImgRequest(prompt=text, guidance_scale=1.0)
    # captions are read literally, as kohya's trainer reads them unless told otherwise, and as the sample
    # images' prompts are
    embeddings, _ = prompt_embeddings(pipeline, request, device, cfg=False, emphasis=False)
    return embeddings


def _pad(embedding: torch.Tensor, empty: torch.Tensor, length: int) -> torch.Tensor:
    windows = (length - embedding.shape[1]) // empty.shape[1]
    return torch.cat([embedding, *[empty] * windows], dim=1)
