"""A training's data: the files it is given (dropped files, .zip archives, or a dataset folder under
models/), read into images and captions; then, once per run, what the loop reads at every step.

Aspect-ratio bucketing (kohya's): each image goes to the bucket whose shape is nearest its own, among the
shapes of about the model's native area that the VAE and the UNet divide evenly (at most 2:1), so a tall or
wide picture is trained on whole instead of cropped to a square; a batch is drawn from one bucket. Each image
counts as often as its repeats say. Cached per image: the latents (and its mirror image's), each caption's
text embedding (the text encoder is frozen, unless it trains), and its token ids (for what encodes each step).
"""

from __future__ import annotations

import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from pipelines.core.checks import MAX_INPUT_PIXELS
from pipelines.core.denoiser import encoded_prompts, size_ids
from pipelines.core.images import fit_image, image_to_tensor, open_capped
from pipelines.core.paths import confined
from pipelines.core.vae import encode
from pipelines.tasks.txt2img import Txt2ImgRequest
from pipelines.training.request import MAX_IMAGES, TrainingRequest

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

MAX_ASPECT = 2.0


@dataclass
class Bucket:
    """The images of one shape, cached: latents [n, c, h, w] (and their mirror images'), the captions' text
    embeddings and token ids, and how often each image is drawn (its repeats)."""
    size: tuple[int, int]                # (width, height) in pixels
    latents: torch.Tensor
    mirrored: torch.Tensor
    embeddings: torch.Tensor
    input_ids: torch.Tensor
    weights: torch.Tensor                # each image's repeats
    pooled: torch.Tensor | None = None   # SDXL: the captions' pooled text embeddings (added conditioning)
    time_ids: torch.Tensor | None = None  # ... and the bucket's size and crop ids, one row


@dataclass
class TrainingData:
    """The training data, computed once: the images as trained on, their buckets, and the empty caption."""
    pictures: list                       # each image at its bucket's size, in the order given
    buckets: list[Bucket]
    empty: torch.Tensor                  # the empty caption's embedding (caption dropout)
    empty_ids: torch.Tensor
    empty_pooled: torch.Tensor | None = None   # ... and its pooled embedding (SDXL)

    def draw(self, count: int, generator: torch.Generator) -> tuple[Bucket, torch.Tensor]:
        """A batch: a bucket, chosen in proportion to the repeats it holds, and `count` of its images, each in
        proportion to its repeats (with replacement)."""
        totals = torch.stack([bucket.weights.sum() for bucket in self.buckets])
        bucket = self.buckets[int(torch.multinomial(totals, 1, generator=generator))]
        return bucket, torch.multinomial(bucket.weights, count, replacement=True, generator=generator)


def bucket_sizes(side: int, multiple: int) -> list[tuple[int, int]]:
    """The shapes (width, height), multiples of `multiple`, with at most side² pixels, the largest height for
    each width, from 1:2 to 2:1."""
    sizes = []
    for width in range(multiple, int(side * MAX_ASPECT) + 1, multiple):
        height = (side * side // width) // multiple * multiple
        if height >= multiple and max(width, height) <= MAX_ASPECT * min(width, height):
            sizes.append((width, height))
    return sizes or [(side, side)]


def bucket_of(image: Image.Image, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The shape nearest the image's aspect ratio (on a log scale); among equals, the largest."""
    aspect = math.log(image.width / image.height)
    return min(sizes, key=lambda size: (abs(math.log(size[0] / size[1]) - aspect), -size[0] * size[1]))


def size_multiple(pipeline) -> int:
    """Pixels per latent cell times the UNet's down-sampling: what a training image's sides must divide by."""
    downsamplings = len(pipeline.unet.config.down_block_types) - 1
    return pipeline.vae_scale_factor * 2 ** downsamplings


@torch.no_grad()
def prepare_data(pipeline, request: TrainingRequest, side: int, *, images=None, prompts=None,
                 repeats=None) -> TrainingData:
    """The images in their buckets (or, with `request.bucketing` off, cropped around their centre to
    side×side); the latents (the VAE's posterior mean) of each and of its mirror image, for flips; each prompt
    (trigger + caption) encoded as written. `images`, `prompts` and `repeats` default to the request's
    (DreamBooth's class images pass their own)."""
    images = request.images if images is None else images
    prompts = request.prompts() if prompts is None else prompts
    repeats = request.image_repeats() if repeats is None else repeats
    device, dtype = pipeline._execution_device, pipeline.unet.dtype
    sizes = bucket_sizes(side, size_multiple(pipeline)) if request.bucketing else [(side, side)]
    shapes = [bucket_of(image, sizes) for image in images]
    pictures = [fit_image(image, *shape) for image, shape in zip(images, shapes)]

    empty, empty_pooled = _embed(pipeline, "", device)
    # captions longer than the tokenizer's window are encoded in windows (pipelines/core/prompts.py); pad the
    # shorter ones with empty windows, as the prompt/negative pair is padded, so they stack
    encoded = [_embed(pipeline, text, device) for text in prompts]
    longest = max(item.shape[1] for item, _ in encoded)
    embeddings = torch.cat([_pad(item, empty, longest) for item, _ in encoded])
    pooled = None if empty_pooled is None else torch.cat([item for _, item in encoded])
    input_ids = token_ids(pipeline.tokenizer, prompts)

    def latents_of(chosen: list) -> torch.Tensor:
        return torch.cat([encode(pipeline.vae, image_to_tensor(image).to(device)) for image in chosen]).to(dtype)

    buckets = []
    for shape in sorted(set(shapes)):
        members = [number for number, other in enumerate(shapes) if other == shape]
        chosen = [pictures[number] for number in members]
        buckets.append(Bucket(size=shape, latents=latents_of(chosen),
                              mirrored=latents_of([ImageOps.mirror(picture) for picture in chosen]),
                              embeddings=embeddings[members], input_ids=input_ids[members],
                              weights=torch.tensor([float(repeats[number]) for number in members]),
                              pooled=None if pooled is None else pooled[members],
                              time_ids=None if pooled is None else
                              size_ids(pipeline.unet, pooled[:1], height=shape[1], width=shape[0])))
    return TrainingData(pictures=pictures, buckets=buckets, empty=_pad(empty, empty, longest),
                        empty_ids=token_ids(pipeline.tokenizer, [""]), empty_pooled=empty_pooled)


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """The prompts' token ids in one window each (what a text encoder that trains reads every step)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _embed(pipeline, text: str, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The caption's text embedding, and its pooled embedding for a model that takes one (SDXL), else None."""
    request = Txt2ImgRequest(prompt=text, guidance_scale=1.0)
    # captions are read literally, as kohya's trainer reads them unless told otherwise, and as the sample
    # images' prompts are
    embeddings, pooled, _ = encoded_prompts(pipeline, request, device, cfg=False, emphasis=False)
    return embeddings, pooled


def _pad(embedding: torch.Tensor, empty: torch.Tensor, length: int) -> torch.Tensor:
    windows = (length - embedding.shape[1]) // empty.shape[1]
    return torch.cat([embedding, *[empty] * windows], dim=1)
