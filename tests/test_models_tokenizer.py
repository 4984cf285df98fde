from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_rounding_close
from torch.distributions import Normal, kl_divergence

from latentforge.models.tokenizer import (
    TOKENIZER_SIZES,
    FSQuantizer,
    KLQuantizer,
    Tokenizer,
    TokenizerModelConfig,
    VectorQuantizer,
    tokenizer_config,
)

LAYOUTS_AND_QUANTIZERS = [(lay, q) for lay in ("1d", "2d") for q in ("kl", "fsq", "vq")]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _config(**overrides) -> TokenizerModelConfig:
    """8x8 grayscale, 4 patches of 4x4, 4 tokens of dim 4: the smallest useful model."""
    base = {
        "image_size": 8,
        "channels": 1,
        "patch_size": 4,
        "num_tokens": 4,
        "token_dim": 4,
        "fsq_levels": [8, 5, 5, 3],
        "codebook_size": 32,
    }
    return tokenizer_config("tiny", **{**base, **overrides})


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1


# ------------------------------------------------------------------------------ config


def test_size_registry() -> None:
    assert list(TOKENIZER_SIZES) == ["tiny", "small", "base", "large"]
    cfg = tokenizer_config("small", image_size=16, channels=1, depth=1)
    assert (cfg.width, cfg.depth, cfg.heads) == (128, 1, 4)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"patch_size": 3}, "not divisible by patch_size"),
        ({"heads": 5}, "not divisible by heads"),
        ({"layout": "3d"}, "layout"),
        ({"quantizer": "lfq"}, "quantizer"),
        ({"quantizer": "fsq", "token_dim": 3}, "len\\(fsq_levels\\)"),
        ({"quantizer": "fsq", "fsq_levels": [8, 5, 1, 5]}, "fsq level"),
        ({"quantizer": "vq", "codebook_size": 1}, "codebook_size"),
        ({"num_tokens": 0}, "num_tokens"),
    ],
)
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


def test_unknown_size() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer size"):
        tokenizer_config("huge", image_size=8, channels=1)


# -------------------------------------------------------------------------- quantizers


@pytest.mark.parametrize("quantizer", ["kl", "fsq", "vq"])
def test_straight_through_gradients_reach_encoder(quantizer: str) -> None:
    torch.manual_seed(0)
    model = Tokenizer(_config(quantizer=quantizer))
    x = _images()
    recon, _ = model(x)
    # Reconstruction only: the gradient must pass through the quantizer, not the aux loss.
    F.mse_loss(recon, x).backward()
    for param in (model.patch_embed.weight, model.enc_proj.weight, model.latent_tokens):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_fsq_codes_cover_each_level() -> None:
    levels = [8, 5, 4, 3]
    fsq = FSQuantizer(levels)
    z = 3 * torch.randn(1, 4096, 4, generator=torch.Generator().manual_seed(0))
    out = fsq(z)
    digits = fsq.codes_to_digits(out.codes)  # (1, 4096, 4)
    for i, level in enumerate(levels):
        values = digits[..., i].unique()
        assert values.tolist() == list(range(level))
        # Latents sit on an evenly spaced grid spanning exactly [-1, 1].
        grid = out.latents[..., i].unique()
        torch.testing.assert_close(grid, torch.linspace(-1, 1, level))
    assert out.codes.min() >= 0 and out.codes.max() < math.prod(levels)
    assert out.loss.item() == 0.0


def test_fsq_code_latent_round_trip() -> None:
    fsq = FSQuantizer([8, 5, 4, 3])
    codes = torch.arange(fsq.vocab_size).view(1, -1)  # every code once
    latents = fsq.codes_to_latents(codes)
    assert latents.shape == (1, fsq.vocab_size, 4)
    assert torch.equal(fsq.latents_to_codes(latents), codes)
    out = fsq(torch.randn(2, 16, 4))
    torch.testing.assert_close(fsq.codes_to_latents(out.codes), out.latents)


def test_vq_losses_match_reference() -> None:
    vq = VectorQuantizer(codebook_size=3, token_dim=2, commitment=0.25)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [-3.0, 0.0]]))
    z = torch.tensor([[[2.0, 0.5], [-1.0, 0.2]]])  # nearest by cosine: codes 0 and 2
    out = vq(z)
    assert out.codes.tolist() == [[0, 2]]
    expected = F.mse_loss(F.normalize(z, dim=-1), torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]]))
    torch.testing.assert_close(out.stats["commitment_loss"], expected)
    torch.testing.assert_close(out.stats["codebook_loss"], expected)
    torch.testing.assert_close(out.loss, expected + 0.25 * expected)
    torch.testing.assert_close(vq.codes_to_latents(out.codes), out.latents)


def test_vq_usage_and_perplexity() -> None:
    vq = VectorQuantizer(codebook_size=4, token_dim=3)
    codebook = vq.normalized_codebook().detach()
    each_once = vq(codebook.unsqueeze(0))  # every code is its own nearest entry
    assert each_once.stats["usage"].item() == 1.0
    torch.testing.assert_close(each_once.stats["perplexity"], torch.tensor(4.0))
    collapsed = vq(codebook[:1].expand(6, 3).unsqueeze(0))
    assert collapsed.stats["usage"].item() == 0.25
    torch.testing.assert_close(collapsed.stats["perplexity"], torch.tensor(1.0))


def test_vq_entropy_loss_prefers_diverse_confident_usage() -> None:
    vq = VectorQuantizer(codebook_size=4, token_dim=3, entropy_weight=0.1)
    codebook = vq.normalized_codebook().detach()
    diverse = vq(codebook.unsqueeze(0))
    collapsed = vq(codebook[:1].expand(4, 3).unsqueeze(0))
    assert diverse.stats["entropy_loss"] < collapsed.stats["entropy_loss"]
    base = diverse.stats["codebook_loss"] * 1.25
    torch.testing.assert_close(diverse.loss, base + 0.1 * diverse.stats["entropy_loss"])


def test_kl_matches_closed_form() -> None:
    kl = KLQuantizer(token_dim=3, kl_weight=1e-3)
    z = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    z[0, 0, 3] = 100.0  # logvar beyond the clamp
    out = kl.eval()(z)
    mean, logvar = z[..., :3], z[..., 3:].clamp(-30, 20)
    reference = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(out.stats["kl"], reference)
    torch.testing.assert_close(out.loss, 1e-3 * reference)
    torch.testing.assert_close(out.logvar, logvar)
    assert torch.equal(out.latents, mean)  # eval: deterministic mean
    sampled = kl(z, sample=True, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sampled.latents, mean + (0.5 * logvar).exp() * eps)


# ------------------------------------------------------------------------------- model


@pytest.mark.parametrize("layout,quantizer", LAYOUTS_AND_QUANTIZERS)
def test_encode_decode_shapes(layout: str, quantizer: str) -> None:
    torch.manual_seed(0)
    model = Tokenizer(_config(layout=layout, quantizer=quantizer, patch_size=2)).eval()
    k = 4 if layout == "1d" else 16  # 2d: one token per 2x2 patch of the 8x8 image
    assert (model.num_tokens, model.token_dim) == (k, 4)
    assert model.is_discrete == (quantizer != "kl")
    x = _images()
    enc = model.encode(x)
    assert enc.latents.shape == (3, k, 4)
    assert enc.aux_loss.shape == ()
    if quantizer == "kl":
        assert enc.codes is None and model.vocab_size is None
        assert enc.mean.shape == enc.logvar.shape == (3, k, 4)
    else:
        assert enc.codes.shape == (3, k) and enc.codes.dtype == torch.long
        assert enc.mean is None and enc.logvar is None
        torch.testing.assert_close(model.codes_to_latents(enc.codes), enc.latents)
    assert model.decode(enc.latents).shape == x.shape
    recon, _ = model(x)
    assert recon.shape == x.shape


def test_eval_is_deterministic() -> None:
    torch.manual_seed(0)
    a = Tokenizer(_config()).eval()
    torch.manual_seed(0)
    b = Tokenizer(_config()).eval()
    x = _images()
    with torch.no_grad():
        assert torch.equal(a(x)[0], a(x)[0])
        assert torch.equal(a(x)[0], b(x)[0])


@pytest.mark.parametrize("layout", ["1d", "2d"])
def test_nested_dropout_prefixes(layout: str) -> None:
    torch.manual_seed(0)
    model = Tokenizer(_config(layout=layout)).eval()
    k = model.num_tokens
    latents = torch.randn(2, k, 4)
    with torch.no_grad():
        assert torch.equal(model.decode(latents, keep=k), model.decode(latents))
        for keep in range(1, k + 1):
            out = model.decode(latents, keep=keep)
            assert out.shape == (2, 1, 8, 8)
            changed = latents.clone()
            changed[:, keep:] = torch.randn_like(changed[:, keep:])
            assert torch.equal(model.decode(changed, keep=keep), out)
            if keep < k:  # the kept prefix still matters
                changed[:, :keep] += 1.0
                assert not torch.allclose(model.decode(changed, keep=keep), out)
        per_sample = torch.tensor([1, k])
        out = model.decode(latents, keep=per_sample)
        # Decoded alone, a sample is the same up to rounding: other batch shapes may take
        # other kernels (bit equality holds only for equal shapes, as in the checks above).
        assert_rounding_close(out[1], model.decode(latents[1:], keep=k)[0],
                              what="a sample decoded in a batch of 2 and alone")


def test_sample_keep() -> None:
    model = Tokenizer(_config())
    keep = model.sample_keep(1000, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (1000,) and keep.dtype == torch.long
    assert keep.unique().tolist() == [1, 2, 3, 4]
    again = model.sample_keep(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_perturb_codes_fraction_extremes(quantizer: str) -> None:
    torch.manual_seed(0)
    model = Tokenizer(_config(quantizer=quantizer, patch_size=2, layout="2d")).eval()
    codes = model.encode(_images(4)).codes  # (4, 16)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(model.perturb_codes(codes, 0.0, generator=gen), codes)
    perturbed = model.perturb_codes(codes, 1.0, generator=gen)
    assert (perturbed != codes).all()
    half = model.perturb_codes(codes, 0.5, generator=gen)
    assert 0 < (half != codes).float().mean() < 1


def test_perturbed_vq_codes_are_nearest_neighbours() -> None:
    torch.manual_seed(0)
    model = Tokenizer(_config(quantizer="vq", codebook_size=32))
    codes = torch.randint(0, 32, (8, 4))
    perturbed = model.perturb_codes(codes, 1.0, generator=torch.Generator().manual_seed(0))
    codebook = F.normalize(model.quantizer.codebook.weight.detach(), dim=-1)
    similarity = codebook @ codebook.t() - 10 * torch.eye(32)  # exclude the code itself
    neighbours = similarity.topk(8, dim=-1).indices  # (32, 8)
    for original, new in zip(codes.flatten().tolist(), perturbed.flatten().tolist(), strict=True):
        assert new in neighbours[original].tolist()


def test_perturbed_fsq_codes_move_one_level_per_dim() -> None:
    fsq = FSQuantizer([8, 5, 4, 3])
    codes = torch.arange(fsq.vocab_size).view(1, -1)
    perturbed = fsq.perturb_codes(codes, 1.0, generator=torch.Generator().manual_seed(0))
    step = (fsq.codes_to_digits(perturbed) - fsq.codes_to_digits(codes)).abs()
    assert (step == 1).all()


def test_perturb_latents() -> None:
    model = Tokenizer(_config(quantizer="kl"))
    latents = torch.randn(4, 4, 4)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(model.perturb_latents(latents, 0.0, sigma=1.0, generator=gen), latents)
    moved = model.perturb_latents(latents, 1.0, sigma=1.0, generator=gen)
    assert (moved != latents).all()
    half = model.perturb_latents(latents, 0.5, sigma=1.0, generator=gen)
    token_changed = (half != latents).any(-1)  # (B, K); whole tokens move or stay
    assert torch.equal(token_changed, (half != latents).all(-1))
    with pytest.raises(ValueError, match="perturb_latents"):
        model.perturb_codes(torch.zeros(4, 4, dtype=torch.long), 0.5)


def test_tiny_kl_tokenizer_overfits() -> None:
    torch.manual_seed(0)
    model = Tokenizer(_config(quantizer="kl"))
    x = _images(8)
    with torch.no_grad():
        before = F.mse_loss(model.eval()(x)[0], x)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(100):
        recon, enc = model(x)
        loss = F.mse_loss(recon, x) + enc.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = F.mse_loss(model.eval()(x)[0], x)
    assert after < 0.5 * before
