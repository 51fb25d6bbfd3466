"""Train the draft model for speculative sampling: a small UNet that imitates the embedded model.

    python -m recipe.draft                      # train (resumes from .cache/train/draft.pt), then export
    python -m recipe.draft --steps 3000 --threads 1   # the shipped run (39 min here)
    python -m recipe.draft export               # write assets/emoji-ldm-draft from the checkpoint

The draft proposes DDPM steps that the embedded model (the target) then verifies
(pipelines/sampling/speculative.py). A drafted step is accepted with probability 2 Φ(-|m_p - m_q| / 2σ), and
the means differ by a multiple of the difference between the two models' *guided* noise predictions,
so the draft is distilled on exactly that:

- data: the real emoji latents (the shipped VAE's posterior, sampled) noised to a uniform timestep,
  captions as in the main recipe; every sample trains both of CFG's branches (its caption and the
  empty prompt);
- loss: MSE to the target's unconditional prediction, plus MSE to the target's guided prediction at
  CFG 7.5 (divided by 7.5², so both terms weigh alike), weighted per timestep by how much an error there
  moves the transition's mean relative to its standard deviation (≈ sqrt(beta_t / (1 - abar_t)), larger
  near the data; capped);
- held out: every class named by the 300 evaluation prompts (`recipe.evaluate.evaluation_prompts`):
  the draft never trains on them, and the speculative table is measured on them.

The draft shares the target's text encoder (it reads the same prompt embeddings), so only its UNet is
shipped: `UNet2DConditionModel.from_pretrained("assets/emoji-ldm-draft")` loads it. Seeded and
resumable; loss logs in .cache/train/draft.log.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from recipe import architecture, data
from recipe.train import _log, _save_atomically, clipped_step, export_model

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "assets" / "emoji-ldm"
OUT = ROOT / "assets" / "emoji-ldm-draft"
WORK = ROOT / ".cache" / "train"
CHECKPOINT = WORK / "draft.pt"
GUIDANCE = 7.5
HELD_OUT_PROMPTS = 300


def draft_unet() -> UNet2DConditionModel:
    """3.3M parameters (the target has 19M): two resolutions, cross-attention at the first. On this
    2-core CPU one call costs 0.42 of the target's (bench/speculative.py)."""
    return UNet2DConditionModel(
        sample_size=architecture.LATENT_SIZE, in_channels=architecture.LATENT_CHANNELS,
        out_channels=architecture.LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=32,
        cross_attention_dim=architecture.TEXT_WIDTH, attention_head_dim=8)


def held_out_classes(records) -> set[int]:
    from recipe.evaluate import evaluation_prompts
    return {record.class_index for record in evaluation_prompts(records, HELD_OUT_PROMPTS)}


def training_latents(records, vae: AutoencoderKL) -> dict:
    """The shipped VAE's posterior (mean, std) of every training image, scaled as the UNet sees it; cached."""
    stored = WORK / "draft-latents.pt"
    if stored.exists():
        return torch.load(stored)
    images = data.load_images(records)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    means, stds = [], []
    with torch.no_grad():
        for chunk in pixels.split(256):
            posterior = vae.encode(chunk).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    scale = float(vae.config.scaling_factor)
    cached = {"mean": torch.cat(means) * scale, "std": torch.cat(stds) * scale}
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save(cached, stored)
    return cached


def _loss_weights(alphas_cumprod: torch.Tensor, cap: float = 3.0) -> torch.Tensor:
    """How much a noise-prediction error at t moves DDPM's mean, in units of its standard deviation
    (≈ sqrt(beta_t / (1 - abar_t)) for a 100-step schedule), squared, capped, normalised to mean 1."""
    beta = 1 - alphas_cumprod / torch.cat([torch.ones(10), alphas_cumprod[:-10]])   # over 10 training steps
    weight = (beta / (1 - alphas_cumprod)).clamp(max=cap)
    return weight / weight.mean()


class Teacher:
    """The embedded model as a distillation teacher (here and recipe/lcm.py): its text encoder and UNet, frozen,
    the training records (the evaluation prompts' classes held out) and their cached latents."""

    def __init__(self, folder: Path = TARGET):
        records, _ = data.load_records(data.fetch())
        held_out = held_out_classes(records)
        self.training = [r for r in records if r.class_index not in held_out]
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False)
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
        self.latents = training_latents(self.training, AutoencoderKL.from_pretrained(folder / "vae").eval()
                                        .requires_grad_(False))
        self.empty = self.embed([""])

    def embed(self, captions: list[str]) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids
            return self.text_encoder(tokens)[0]

    def batch(self, batch_size: int, caption_rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: the captions' embeddings, and latents drawn from the records' posteriors."""
        index = torch.randint(len(self.training), (batch_size,))
        conditional = self.embed([data.caption(self.training[i], caption_rng) for i in index.tolist()])
        mean, std = self.latents["mean"][index], self.latents["std"][index]
        return conditional, mean + std * torch.randn_like(std)


def resume(checkpoint: Path, student, optimizer, caption_rng: random.Random, *, strict: bool = True) -> int:
    """Continue from `checkpoint` if there is one: the student, the optimiser and both random states; its step."""
    if not checkpoint.exists():
        return 0
    state = torch.load(checkpoint, weights_only=False)
    student.load_state_dict(state["unet"], strict=strict)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    caption_rng.setstate(state["caption_rng"])
    return state["step"]


def train(steps: int, batch_size: int = 32, lr: float = 1e-3) -> None:
    parts = Teacher()
    teacher, empty = parts.unet, parts.empty
    noise_scheduler = architecture.scheduler()
    weights = _loss_weights(noise_scheduler.alphas_cumprod)

    student = draft_unet()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    caption_rng = random.Random(0)
    step = resume(CHECKPOINT, student, optimizer, caption_rng)
    if step == 0:
        torch.manual_seed(2)
    progress = tqdm(total=steps, initial=step, desc="draft")
    student.train()
    while step < steps:
        for group in optimizer.param_groups:   # warm-up, then a cosine to 10%
            group["lr"] = lr * min(1.0, (step + 1) / 200) * (0.55 + 0.45 * np.cos(np.pi * step / steps))
        conditional, x0 = parts.batch(batch_size, caption_rng)
        with torch.no_grad():
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
            x_t = noise_scheduler.add_noise(x0, torch.randn_like(x0), t)
            both = torch.cat([empty.expand(batch_size, -1, -1), conditional])
            teacher_u, teacher_c = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), both).sample.chunk(2)
            teacher_guided = teacher_u + GUIDANCE * (teacher_c - teacher_u)
        student_u, student_c = student(torch.cat([x_t, x_t]), torch.cat([t, t]), both).sample.chunk(2)
        student_guided = student_u + GUIDANCE * (student_c - student_u)
        per_sample = F.mse_loss(student_u, teacher_u, reduction="none").mean(dim=(1, 2, 3)) + \
            F.mse_loss(student_guided, teacher_guided, reduction="none").mean(dim=(1, 2, 3)) / GUIDANCE ** 2
        loss = (per_sample * weights[t]).mean()
        clipped_step(optimizer, loss, student.parameters())
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if step % 50 == 0:
            _log("draft", step, loss=loss.item())
        if step % 250 == 0 or step == steps:
            _save_atomically({"unet": student.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                              "rng": torch.get_rng_state(), "caption_rng": caption_rng.getstate()}, CHECKPOINT)
    progress.close()


def export(out: Path = OUT) -> Path:
    state = torch.load(CHECKPOINT, weights_only=False)
    unet = draft_unet()
    unet.load_state_dict(state["unet"])
    return export_model(unet, out, "DRAFT.json", {   # fp16 on disk, as the target's weights
        "target": "assets/emoji-ldm", "steps": state["step"], "recipe": "python -m recipe.draft",
        "held_out": f"the classes of the {HELD_OUT_PROMPTS} evaluation prompts (recipe.evaluate.evaluation_prompts)"})


def run_stages(description: str, train, export, default_steps: int) -> None:
    """The command line of a distillation recipe (here and recipe/lcm.py): train (resuming), then export."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", nargs="?", default="all", choices=("all", "train", "export"))
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage in ("all", "train"):
        train(args.steps)
    if args.stage in ("all", "export"):
        print(f"Wrote {export()}")


def main() -> None:
    run_stages(__doc__, train, export, default_steps=3000)


if __name__ == "__main__":
    main()
