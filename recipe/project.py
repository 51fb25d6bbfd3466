"""Narrow the wide (8-channel) latent space to Stable Diffusion's 4 channels, keeping what was learnt.

Stage 1 of the recipe trains the VAE and the UNet on 8 latent channels, which train fast and
sharp. But diffusers' inpainting pipeline accepts only UNets with 4 (or 9) input channels, and
the standard SD layout has 4. The 8-channel latents are nearly 4-dimensional: at every latent
pixel, the top 4 principal components of the 8 channels carry 99.8% of the variance (measured
on all 7,042 images). So the 4-channel model is made by projecting onto those components:

    z4 = P z8                      P: the top 4 principal directions (4x8, orthonormal rows)
    z8 ≈ Pᵀ z4 + (I − PᵀP) μ       μ: the channel means, kept in the dropped directions

and folding P into the layers that touch the latent channels, exactly for the 1x1 layers:

- VAE encoder: `conv_out` followed by `quant_conv` (1x1) becomes one conv whose mean rows are
  P times the old mean rows; the new log-variance of channel j is Σᵢ Pⱼᵢ² logvarᵢ (a weighted
  mean, since each row of P has unit norm). `quant_conv` becomes the identity.
- VAE decoder: `post_quant_conv` (1x1) is folded into `conv_in` through Pᵀ; the constant part
  goes into `post_quant_conv`'s bias where P's span can hold it, the rest into `conv_in`'s.
- UNet: `conv_in` reads the 4 channels through Pᵀ and `conv_out` writes P times the old output.
  The latents keep the wide model's scaling factor, so the signal in the kept directions is
  unchanged; the noise in the dropped ones is gone, which stage 2 (fine-tuning) adapts to.

Then the recipe fine-tunes the decoder (the encoder stays the exact projection, so the cached
latents stay valid) and the UNet on the 4-channel latents.
"""

from __future__ import annotations

import torch

KEPT_CHANNELS = 4


def principal_directions(latent_means: torch.Tensor, keep: int = KEPT_CHANNELS) -> dict:
    """PCA over the channel vectors of every latent pixel: P (keep x C), the channel means μ and
    the share of variance kept. Eigenvector signs are fixed (largest entry positive) so the
    projection is the same on every machine."""
    vectors = latent_means.permute(0, 2, 3, 1).reshape(-1, latent_means.shape[1]).double()
    mean = vectors.mean(0)
    centred = vectors - mean
    covariance = centred.T @ centred / len(centred)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = eigenvalues.argsort(descending=True)
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    projection = eigenvectors[:, :keep].T.clone()
    signs = torch.sign(projection.gather(1, projection.abs().argmax(1, keepdim=True)))
    projection = projection * signs
    return {"P": projection.float(), "mu": mean.float(),
            "variance_kept": (eigenvalues[:keep].sum() / eigenvalues.sum()).item()}


def project_latents(mean: torch.Tensor, std: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached posteriors, projected: means exactly, standard deviations of independent channels."""
    projected_mean = torch.einsum("kc,nchw->nkhw", P, mean)
    projected_std = torch.einsum("kc,nchw->nkhw", P.pow(2), std.pow(2)).sqrt()
    return projected_mean, projected_std


def _matrix(conv: torch.nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach()[:, :, 0, 0]


@torch.no_grad()
def narrow_vae(wide, narrow, P: torch.Tensor, mu: torch.Tensor) -> None:
    """Copy `wide` (C latent channels) into `narrow` (4), folding the projection in (see above)."""
    state = {k: v for k, v in wide.state_dict().items()
             if not k.startswith(("encoder.conv_out", "quant_conv", "post_quant_conv", "decoder.conv_in"))}
    missing = narrow.load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == sorted(k for k in narrow.state_dict() if k not in state), missing
    channels = P.shape[1]
    # Encoder: moments = quant(conv_out(h)); keep P·mean rows and the P²-weighted logvar rows.
    quant_weight, quant_bias = _matrix(wide.quant_conv), wide.quant_conv.bias.detach()
    conv_out = wide.encoder.conv_out
    rows = torch.cat([P @ quant_weight[:channels], P.pow(2) @ quant_weight[channels:]])  # (2k, 2C)
    bias = torch.cat([P @ quant_bias[:channels], P.pow(2) @ quant_bias[channels:]])
    narrow.encoder.conv_out.weight.copy_(torch.einsum("oi,ichw->ochw", rows, conv_out.weight))
    narrow.encoder.conv_out.bias.copy_(rows @ conv_out.bias + bias)
    eye = torch.eye(narrow.quant_conv.weight.shape[0])
    narrow.quant_conv.weight.copy_(eye[:, :, None, None])
    narrow.quant_conv.bias.zero_()
    # Decoder: conv_in(post(z8)) with z8 = Pᵀ z4 + (I − PᵀP) μ and post(z) = W z + b.
    post_weight, post_bias = _matrix(wide.post_quant_conv), wide.post_quant_conv.bias.detach()
    through = post_weight @ P.T  # (C, k): z4 -> the wide post-quant space
    offset = post_weight @ (mu - P.T @ (P @ mu)) + post_bias
    held = torch.linalg.lstsq(through, offset.unsqueeze(1)).solution.squeeze(1)  # the part P's span can hold
    rest = offset - through @ held
    conv_in = wide.decoder.conv_in
    narrow.post_quant_conv.weight.copy_(torch.eye(P.shape[0])[:, :, None, None])
    narrow.post_quant_conv.bias.copy_(held)
    narrow.decoder.conv_in.weight.copy_(torch.einsum("oihw,ik->okhw", conv_in.weight, through))
    narrow.decoder.conv_in.bias.copy_(conv_in.bias + torch.einsum("oihw,i->o", conv_in.weight, rest))


@torch.no_grad()
def narrow_unet(wide_state: dict, narrow, P: torch.Tensor) -> None:
    """Load a wide UNet's weights into `narrow`: conv_in reads through Pᵀ, conv_out writes P·."""
    state = dict(wide_state)
    state["conv_in.weight"] = torch.einsum("oihw,ki->okhw", wide_state["conv_in.weight"], P)
    state["conv_out.weight"] = torch.einsum("ki,iohw->kohw", P, wide_state["conv_out.weight"])
    state["conv_out.bias"] = P @ wide_state["conv_out.bias"]
    narrow.load_state_dict(state)
