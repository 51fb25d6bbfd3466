"""Distil the embedded model into a four-step one: an LCM-LoRA (latent consistency distillation,
Luo et al. 2023, with the LoRA form of Luo et al.'s "LCM-LoRA"), guidance distilled in.

    python -m recipe.lcm                          # train (resumes from .cache/train/lcm.pt), then export
    python -m recipe.lcm --steps 2400 --threads 1 # the shipped run (the default steps)
    python -m recipe.lcm export                   # write assets/emoji-ldm-lcm from the checkpoint

What it learns (Algorithm 1 of the LCM paper, as diffusers' train_lcm_distill_lora_sd_wds.py runs it):
the teacher is the embedded UNet with classifier-free guidance at scale w (sampled per row around the
studio's default CFG); its probability-flow ODE is solved by DDIM over 50 timesteps (skip k = 20). The
student (the same UNet plus a LoRA) maps a noised latent at t_{n+k} straight to the ODE's end point, its
output parameterised as c_skip(t)·x_t + c_out(t)·x̂_0(t) so that it is the identity at t = 0; the loss is
a pseudo-Huber distance to the student's own (no-gradient) map of the point one DDIM step of the guided
teacher earlier, x_{t_n}. Guidance is in the weights, so the distilled model takes one UNet pass per step
(CFG 1) with diffusers' LCMScheduler.

Data: the shipped VAE's latents of the training art, captions as in the main recipe, with the classes of
the evaluation prompts held out (as recipe/draft.py: the held-out figures are measured on them).

The LoRA is saved in diffusers' format (`pytorch_lora_weights.safetensors`): the studio applies it like any
user's LCM-LoRA and plain diffusers reads it with `pipeline.load_lora_weights(folder)`. Seeded and
resumable; loss logs in .cache/train/lcm.log.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from tqdm import tqdm

from recipe import architecture
from recipe.draft import Teacher, resume, run_stages
from recipe.train import _log, _save_atomically, clipped_step

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "assets" / "emoji-ldm"
OUT = ROOT / "assets" / "emoji-ldm-lcm"
WORK = ROOT / ".cache" / "train"
CHECKPOINT = WORK / "lcm.pt"
RANK = 64
# The LoRA's layers: diffusers' LCM-LoRA script's list (attention, feed-forward, resnets, resampling, time)
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                  "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
DDIM_STEPS = 50
# CFG scales the teacher guides with, in the studio's (Imagen) convention: around its default 7.5
GUIDANCE_RANGE = (6.0, 9.0)
HUBER_C = 0.001
TIMESTEP_SCALING = 10.0


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t) of LCMScheduler (its discrete boundary condition): c_skip(0) = 1, c_out(0) = 0."""
    scaled = TIMESTEP_SCALING * t.float()
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


class DDIMSolver:
    """DDIM on the `DDIM_STEPS` timesteps [k-1, 2k-1, ..., 999]: one step from timestep index n to n-1."""

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int = DDIM_STEPS):
        self.skip = len(alphas_cumprod) // steps
        self.timesteps = torch.arange(1, steps + 1) * self.skip - 1
        self.alphas_cumprod = alphas_cumprod
        previous = self.timesteps - self.skip
        self.previous_alpha = torch.where(previous >= 0, alphas_cumprod[previous.clamp(min=0)], alphas_cumprod[0])

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        alpha_prev = self.previous_alpha[index].view(-1, 1, 1, 1)
        return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def consistency_output(eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
                       ) -> torch.Tensor:
    """The consistency map f(x_t, t) = c_skip·x_t + c_out·x̂_0 for an ε-predicting UNet's output `eps`."""
    alpha = alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (x_t - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    c_skip, c_out = boundary_scalings(t)
    return c_skip * x_t + c_out * x0


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float = HUBER_C) -> torch.Tensor:
    return (torch.sqrt((prediction.float() - target.float()) ** 2 + c ** 2) - c).mean()


def lora_unet(teacher_folder: Path = TEACHER, rank: int = RANK) -> UNet2DConditionModel:
    """The teacher's UNet with a fresh LoRA on it (B = 0: it starts as the teacher); only the LoRA trains."""
    from peft import LoraConfig
    unet = UNet2DConditionModel.from_pretrained(teacher_folder / "unet", torch_dtype=torch.float32)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=TARGET_MODULES))
    return unet


def distillation_loss(student, teacher, x0, conditional, empty, guidance, solver: DDIMSolver,
                      alphas_cumprod) -> torch.Tensor:
    """One LCM step's loss on latents `x0` with prompt embeddings `conditional` (Algorithm 1)."""
    batch = x0.shape[0]
    index = torch.randint(0, len(solver.timesteps), (batch,))
    start = solver.timesteps[index]
    end = (start - solver.skip).clamp(min=0)
    alpha = alphas_cumprod[start].view(-1, 1, 1, 1)
    noise = torch.randn_like(x0)
    x_start = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    prediction = consistency_output(student(x_start, start, conditional).sample, x_start, start, alphas_cumprod)
    with torch.no_grad():
        both = torch.cat([empty.expand(batch, -1, -1), conditional])
        eps_u, eps_c = teacher(torch.cat([x_start, x_start]), torch.cat([start, start]), both).sample.chunk(2)
        w = guidance.view(-1, 1, 1, 1)
        eps = eps_u + w * (eps_c - eps_u)       # the studio's CFG; the LCM paper's w is this w - 1
        teacher_x0 = (x_start - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        x_end = solver.step(teacher_x0, eps, index)
        target = consistency_output(student(x_end, end, conditional).sample, x_end, end, alphas_cumprod)
    return pseudo_huber(prediction, target)


def train(steps: int, batch_size: int = 32, lr: float = 5e-4) -> None:
    parts = Teacher(TEACHER)
    alphas_cumprod = architecture.scheduler().alphas_cumprod
    solver = DDIMSolver(alphas_cumprod)

    torch.manual_seed(3)
    student = lora_unet()
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    caption_rng = random.Random(0)
    step = resume(CHECKPOINT, student, optimizer, caption_rng, strict=False)   # the LoRA's weights only
    progress = tqdm(total=steps, initial=step, desc="lcm")
    student.train()
    while step < steps:
        for group in optimizer.param_groups:   # warm-up, then a cosine to 10%
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.55 + 0.45 * np.cos(np.pi * step / steps))
        conditional, x0 = parts.batch(batch_size, caption_rng)
        low, high = GUIDANCE_RANGE
        guidance = low + (high - low) * torch.rand(batch_size)
        loss = distillation_loss(student, parts.unet, x0, conditional, parts.empty, guidance, solver, alphas_cumprod)
        clipped_step(optimizer, loss, trainable)
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.5f}")
        if step % 25 == 0:
            _log("lcm", step, loss=loss.item())
        if step % 100 == 0 or step == steps:
            lora = {k: v for k, v in student.state_dict().items() if "lora_" in k}
            _save_atomically({"unet": lora, "optimizer": optimizer.state_dict(), "step": step,
                              "rng": torch.get_rng_state(), "caption_rng": caption_rng.getstate()}, CHECKPOINT)
    progress.close()


def export(out: Path = OUT) -> Path:
    """The checkpoint's LoRA as a diffusers LoRA folder (fp16), written beside `out` and renamed into place."""
    import json
    import shutil

    from peft.utils import get_peft_model_state_dict
    state = torch.load(CHECKPOINT, weights_only=False)
    unet = lora_unet()
    unet.load_state_dict(state["unet"], strict=False)
    layers = {k: v.half() for k, v in get_peft_model_state_dict(unet).items()}
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    StableDiffusionPipeline.save_lora_weights(partial, unet_lora_layers=layers, safe_serialization=True)
    (partial / "LCM.json").write_text(json.dumps({
        "base": "assets/emoji-ldm", "kind": "LCM-LoRA", "rank": RANK, "steps": state["step"],
        "sampler": "LCM", "guidance_scale": 1.0, "distilled_cfg": list(GUIDANCE_RANGE), "ddim_steps": DDIM_STEPS,
        "recipe": "python -m recipe.lcm",
        "held_out": "the classes of the 300 evaluation prompts (recipe.evaluate.evaluation_prompts)"}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def main() -> None:
    run_stages(__doc__, train, export, default_steps=2400)   # the shipped run


if __name__ == "__main__":
    main()
