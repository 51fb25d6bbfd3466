"""The recipe's narrowing of an 8-channel latent model to 4 channels keeps what each part computes."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from recipe import project


def _vae(latent_channels: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16,
                         mid_block_add_attention=False).eval()


def _unet(latent_channels: int) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=latent_channels, out_channels=latent_channels,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                                attention_head_dim=4).eval()


@pytest.fixture(scope="module")
def directions():
    # latents that really are 4-dimensional plus a little noise, around a non-zero mean
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=generator))[0][:, :4]  # 4 orthonormal columns
    codes = torch.randn(200, 4, 4, 4, generator=generator) * torch.tensor([5.0, 3.0, 2.0, 1.0]).view(1, 4, 1, 1)
    latents = torch.einsum("ck,nkhw->nchw", basis, codes) + 0.01 * torch.randn(200, 8, 4, 4, generator=generator)
    latents += torch.arange(8.0).view(1, 8, 1, 1)
    return project.principal_directions(latents), basis


def test_the_principal_directions_find_the_latents_subspace(directions):
    found, basis = directions
    P = found["P"]
    assert found["variance_kept"] > 0.999
    assert torch.allclose(P @ P.T, torch.eye(4), atol=1e-5)  # orthonormal rows
    assert torch.allclose(P.T @ P, basis @ basis.T, atol=1e-3)  # the same subspace
    assert torch.allclose(found["mu"], torch.arange(8.0), atol=0.1)


def test_projected_latents_are_the_projection_of_the_cached_posteriors(directions):
    P = directions[0]["P"]
    mean, std = torch.randn(3, 8, 4, 4), torch.rand(3, 8, 4, 4)
    projected_mean, projected_std = project.project_latents(mean, std, P)
    assert torch.allclose(projected_mean[1, :, 2, 3], P @ mean[1, :, 2, 3], atol=1e-5)
    assert torch.allclose(projected_std[1, :, 2, 3], (P.pow(2) @ std[1, :, 2, 3].pow(2)).sqrt(), atol=1e-5)


def test_the_narrowed_vae_encodes_to_the_projection_and_decodes_like_the_wide_one(directions):
    P, mu = directions[0]["P"], directions[0]["mu"]
    wide, narrow = _vae(8), _vae(4)
    with torch.no_grad():
        wide.post_quant_conv.bias.zero_()  # then the decoder's constant offset is zero and the fold is exact
    project.narrow_vae(wide, narrow, P, torch.zeros(8))
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(narrow.encode(image).latent_dist.mean,
                              torch.einsum("kc,nchw->nkhw", P, wide.encode(image).latent_dist.mean), atol=1e-4)
        z4 = torch.randn(2, 4, 4, 4)
        assert torch.allclose(narrow.decode(z4).sample, wide.decode(torch.einsum("kc,nkhw->nchw", P, z4)).sample,
                              atol=1e-4)
    # A constant the 4 kept directions can carry goes into post_quant_conv's bias, exactly. (One they
    # cannot carry is folded into conv_in's bias, exact away from the zero-padded border only; the
    # recipe's decoder fine-tuning takes up that difference.)
    wide, narrow = _vae(8), _vae(4)
    mu = P.T @ torch.randn(4)  # channel means inside the kept subspace
    with torch.no_grad():
        wide.post_quant_conv.bias.copy_(wide.post_quant_conv.weight[:, :, 0, 0] @ P.T @ torch.randn(4))
    project.narrow_vae(wide, narrow, P, mu)
    with torch.no_grad():
        assert torch.allclose(narrow.decode(z4).sample, wide.decode(torch.einsum("kc,nkhw->nchw", P, z4)).sample,
                              atol=1e-4)


def test_the_narrowed_unet_predicts_the_projection_of_the_wide_prediction(directions):
    P = directions[0]["P"]
    wide, narrow = _unet(8), _unet(4)
    project.narrow_unet(wide.state_dict(), narrow, P)
    x4, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = torch.einsum("kc,nchw->nkhw", P, wide(torch.einsum("kc,nkhw->nchw", P, x4), 10, text).sample)
        assert torch.allclose(narrow(x4, 10, text).sample, expected, atol=1e-4)
