from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_rounding_close
from torch.distributions import Normal, kl_divergence

from latentforge.config import TokenizerConfig
from latentforge.models.tokenizer import (
    TOKENIZER_SIZES,
    Attention,
    BinaryQuantizer,
    FSQuantizer,
    KLQuantizer,
    Tokenizer,
    TokenizerEncoding,
    TokenizerModelConfig,
    VectorQuantizer,
    latent_spread,
    register_causal_mask,
    select_images,
    tokenizer_config,
)
from latentforge.tasks.tokenizer import perturbation_rate, tokenizer_loss

QUANTIZERS = ("kl", "fsq", "vq", "binary")
LAYOUTS_AND_QUANTIZERS = [(lay, q) for lay in ("1d", "2d") for q in QUANTIZERS]


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
        ({"quantizer": "binary", "token_dim": 31}, "binary needs token_dim <= 30.*got token_dim 31"),
        ({"num_tokens": 0}, "num_tokens"),
        ({"layout": "2d", "register_causal": True}, "register_causal = True needs layout '1d'"),
    ],
)
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


def test_unknown_size() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer size"):
        tokenizer_config("huge", image_size=8, channels=1)


# -------------------------------------------------------------------------- quantizers


@pytest.mark.parametrize("quantizer", QUANTIZERS)
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


def test_binary_quantizer_signs_codes_and_straight_through() -> None:
    binary = BinaryQuantizer(token_dim=3)
    z = torch.tensor([[[0.3, -2.0, 1.5], [-0.1, -0.4, -3.0]]], requires_grad=True)
    out = binary(z)
    assert out.latents.tolist() == [[[1.0, -1.0, 1.0], [-1.0, -1.0, -1.0]]]
    assert out.codes.tolist() == [[0b101, 0b000]]  # bit i = dimension i is positive
    assert out.loss.item() == 0.0
    # Straight through: d latents / d z is the identity, whatever the signs.
    grad = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(0))
    out.latents.backward(grad)
    assert torch.equal(z.grad, grad)


def test_binary_code_latent_round_trip() -> None:
    binary = BinaryQuantizer(token_dim=6)
    codes = torch.arange(binary.vocab_size).view(1, -1)  # every code once
    latents = binary.codes_to_latents(codes)
    assert latents.shape == (1, 64, 6) and set(latents.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(binary.latents_to_codes(latents), codes)
    assert len({tuple(row) for row in latents[0].tolist()}) == 64  # distinct codes, distinct latents
    out = binary(torch.randn(2, 16, 6, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(binary.codes_to_latents(out.codes), out.latents)
    assert torch.equal(binary.latents_to_codes(out.latents), out.codes)
    # The widest binary code still fits the cache's int32.
    wide = BinaryQuantizer(token_dim=30)
    top = torch.tensor([[2**30 - 1, 0, 2**29]])
    assert torch.equal(wide.latents_to_codes(wide.codes_to_latents(top)), top)
    assert top.max() <= torch.iinfo(torch.int32).max


def test_binary_usage_stats() -> None:
    binary = BinaryQuantizer(token_dim=3)
    z = torch.tensor([[[2.0, -1.0, 0.5], [-1.0, 1.0, -1.0]]])
    out = binary(z)
    assert out.loss.item() == 0.0 and "entropy_loss" not in out.stats  # entropy_weight 0: off
    # Every bit takes both values once in the two tokens: 1 bit of entropy each.
    torch.testing.assert_close(out.stats["bit_entropy"], torch.tensor(1.0))
    torch.testing.assert_close(out.stats["usage"], torch.tensor(2 / 8))
    torch.testing.assert_close(out.stats["perplexity"], torch.tensor(2.0))
    stuck = binary(torch.ones(1, 5, 3))
    assert stuck.stats["bit_entropy"].item() == 0.0 and stuck.stats["perplexity"].item() == 1.0


def test_binary_entropy_loss_prefers_spread_confident_codes() -> None:
    binary = BinaryQuantizer(token_dim=4, entropy_weight=0.1)
    spread = BinaryQuantizer(4).codes_to_latents(torch.arange(16).view(1, 16))  # every code once
    collapsed = spread[:, :1].expand(1, 16, 4)  # one code for all tokens
    low, high = binary(2 * spread), binary(2 * collapsed)
    assert low.stats["entropy_loss"] < high.stats["entropy_loss"]
    torch.testing.assert_close(low.loss, 0.1 * low.stats["entropy_loss"])
    # Reference: the factorised entropies from the soft bit probabilities sigmoid(4 z / T).
    p = torch.sigmoid(4 * 2 * spread.flatten(0, 1))  # (16, 4)
    per_token = -(p * p.log() + (1 - p) * (1 - p).log()).sum(-1).mean()
    q = p.mean(0)
    batch = -(q * q.log() + (1 - q) * (1 - q).log()).sum()
    torch.testing.assert_close(low.stats["entropy_loss"], per_token - batch)
    # Spread codes reach the lowest possible value: confident bits, each bit on half the time.
    assert low.stats["entropy_loss"] < -4 * math.log(2) + 0.02
    # Unsure inputs near 0 score worse than confident ones with the same signs.
    assert binary(0.05 * spread).stats["entropy_loss"] > low.stats["entropy_loss"]


def test_binary_entropy_loss_is_finite_for_saturated_bits() -> None:
    binary = BinaryQuantizer(token_dim=2, entropy_weight=1.0)
    z = torch.tensor([[[1e4, -1e4], [1e4, -1e4]]], requires_grad=True)
    out = binary(z)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all()


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
        if quantizer == "binary":
            assert model.vocab_size == 2**4
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


@pytest.mark.parametrize("quantizer", ["fsq", "vq", "binary"])
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


def test_perturbed_binary_codes_flip_one_bit_of_selected_tokens() -> None:
    binary = BinaryQuantizer(token_dim=10)
    codes = torch.randint(0, binary.vocab_size, (64, 16), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    perturbed = binary.perturb_codes(codes, 0.3, generator=gen)
    # The tokens the same generator selects (perturb_codes draws the mask first).
    selected = torch.rand(codes.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    flipped = (binary.codes_to_bits(perturbed) != binary.codes_to_bits(codes)).sum(-1)  # (B, K)
    assert (flipped[selected] == 1).all() and (flipped[~selected] == 0).all()
    assert 0 < selected.float().mean() < 1
    # Every bit position gets flipped somewhere.
    positions = (perturbed ^ codes)[selected]
    assert set(torch.log2(positions.float()).round().long().tolist()) == set(range(10))


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
    with pytest.raises(ValueError, match="discrete quantizer"):
        model.codes_to_latents(torch.zeros(4, 4, dtype=torch.long))


def _overfit(model: Tokenizer, x: torch.Tensor, steps: int = 100) -> tuple[float, float]:
    """Reconstruction MSE of `x` before and after `steps` Adam steps on `x` alone."""
    with torch.no_grad():
        before = F.mse_loss(model.eval()(x)[0], x).item()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        recon, enc = model(x)
        loss = F.mse_loss(recon, x) + enc.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = F.mse_loss(model.eval()(x)[0], x).item()
    return before, after


def test_tiny_kl_tokenizer_overfits() -> None:
    torch.manual_seed(0)
    model = Tokenizer(_config(quantizer="kl"))
    x = _images(8)
    before, after = _overfit(model, x)
    assert after < 0.5 * before


def test_tiny_binary_tokenizer_codes_come_to_depend_on_the_image() -> None:
    """The 1D tokens start almost image-independent; the signs must move away from there (a
    commitment term pulling the inputs to +-1 kept 1-4 codes per position for 8 images here,
    at 0.5x the starting loss)."""
    torch.manual_seed(0)
    model = Tokenizer(_config(quantizer="binary", token_dim=8))
    x = _images(8)
    before, after = _overfit(model, x)
    with torch.no_grad():
        codes = model.encode(x).codes  # (8, 4)
    assert after < 0.2 * before
    assert all(len(codes[:, k].unique()) >= 6 for k in range(codes.shape[1]))


# ------------------------------------------------------- RobustTok and FlexTok options


@pytest.mark.parametrize(
    "batch,proportion,count",
    [(8, 0.25, 2), (20, 0.33, 7), (10, 0.1, 1), (64, 0.1, 6), (4, 0.1, 1), (16, 0.0, 0),
     (16, 1.0, 16)],
)
def test_select_images_takes_round_beta_b_images(batch: int, proportion: float,
                                                 count: int) -> None:
    seen = set()
    for seed in range(5):
        chosen = select_images(batch, proportion, torch.device("cpu"),
                               torch.Generator().manual_seed(seed))
        assert chosen.shape == (batch,) and chosen.dtype == torch.bool
        assert int(chosen.sum()) == count
        seen.add(tuple(chosen.tolist()))
    if 0 < count < batch:  # random images, not always the same ones
        assert len(seen) > 1


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_perturbation_touches_only_the_chosen_proportion_of_images(quantizer: str) -> None:
    torch.manual_seed(0)
    model = Tokenizer(_config(quantizer=quantizer)).eval()
    with torch.no_grad():
        enc = model.encode(_images(8))
        latents = model.perturbed_latents(enc, 1.0, 0.5, images=0.25,
                                          generator=torch.Generator().manual_seed(0))
    changed = (latents != enc.latents).flatten(1).any(-1)  # (B,)
    assert int(changed.sum()) == 2
    # The forward pass decodes the same perturbed latents: 2 of the 8 reconstructions move.
    with torch.no_grad():
        clean = model(_images(8))[0]
        recon = model(_images(8), perturb=1.0, perturb_images=0.25,
                      generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal((recon != clean).flatten(1).any(-1), changed)


@pytest.mark.parametrize("anneal", ["linear", "cosine"])
def test_perturbation_rate_anneals_from_start_to_final(anneal: str) -> None:
    steps = 101  # the harness counts updates 1 .. steps
    assert perturbation_rate(1, steps, 0.8, 0.2, anneal) == pytest.approx(0.8)
    assert perturbation_rate(51, steps, 0.8, 0.2, anneal) == pytest.approx(0.5)
    assert perturbation_rate(steps, steps, 0.8, 0.2, anneal) == pytest.approx(0.2)
    quarter = perturbation_rate(26, steps, 0.8, 0.2, anneal)
    expected = 0.25 if anneal == "linear" else 0.5 * (1 - math.cos(math.pi / 4))
    assert quarter == pytest.approx(0.8 - 0.6 * expected)
    rates = [perturbation_rate(s, steps, 0.8, 0.2, anneal) for s in range(1, steps + 1)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))  # monotone down


def test_perturbation_rate_none_is_constant() -> None:
    assert {perturbation_rate(s, 50, 0.3, 0.0, "none") for s in (1, 25, 50)} == {0.3}
    assert perturbation_rate(1, 1, 0.3, 0.0, "linear") == 0.3  # a one-step run
    with pytest.raises(ValueError, match="perturbation_anneal"):
        perturbation_rate(1, 10, 0.3, 0.0, "exp")


def test_tokenizer_loss_uses_the_annealed_rate_and_prefix_lengths() -> None:
    torch.manual_seed(0)
    model = Tokenizer(_config())
    cfg = TokenizerConfig(steps=11, latent_perturbation=0.6, perturbation_final=0.1,
                          perturbation_anneal="linear", nested_dropout=True,
                          nested_dropout_lengths="pow2")
    batch = {"images": _images(4)}
    _, stats = tokenizer_loss(model, batch, 6, cfg=cfg)
    assert stats["perturbation_rate"] == pytest.approx(0.35)
    _, stats = tokenizer_loss(model, batch, 11, cfg=cfg)
    assert stats["perturbation_rate"] == pytest.approx(0.1)


def test_kl_perturbation_is_scaled_by_each_dimension_spread() -> None:
    gen = torch.Generator().manual_seed(0)
    spread = torch.tensor([1.0, 10.0, 0.5])
    latents = torch.randn(256, 8, 3, generator=gen) * spread + torch.tensor([3.0, -2.0, 0.0])
    torch.testing.assert_close(latent_spread(latents), spread, rtol=0.05, atol=0)
    model = Tokenizer(_config(quantizer="kl", token_dim=3))
    enc = TokenizerEncoding(latents=latents, aux_loss=torch.zeros(()), stats={})
    noise = model.perturbed_latents(enc, 1.0, 0.5, generator=gen) - latents
    std = noise.flatten(0, 1).std(0)  # (D,)
    # sigma is in units of each dimension's spread: 10x the spread, 10x the noise.
    torch.testing.assert_close(std, 0.5 * spread, rtol=0.05, atol=0)
    assert 9.0 < float(std[1] / std[0]) < 11.0
    # Without a scale, perturb_latents keeps absolute units.
    plain = model.perturb_latents(latents, 1.0, 0.5, generator=gen) - latents
    torch.testing.assert_close(plain.flatten(0, 1).std(0), torch.full((3,), 0.5), rtol=0.05,
                               atol=0)


def test_bf16_autocast_loss_and_gradients_follow_fp32() -> None:
    """bf16 autocast rounds matmul inputs to 8 significant bits and keeps the loss in fp32:
    the loss stays within 2 bf16 epsilons (2^-7, relative) of fp32's (measured: 0.05) and the
    gradient points the same way."""
    torch.manual_seed(0)
    model = Tokenizer(_config())
    # Without nested dropout the dropped-token embedding takes no part.
    params = [p for name, p in model.named_parameters() if name != "dropped_token"]
    x = _images(16)
    losses, grads = {}, {}
    for bf16 in (False, True):
        torch.manual_seed(1)  # the same KL sample
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = tokenizer_loss(model, {"images": x}, 1, cfg=TokenizerConfig())
        losses[bf16] = loss.float()
        grads[bf16] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    assert abs(losses[True] - losses[False]) <= 2 * 2**-8 * abs(losses[False])
    assert F.cosine_similarity(grads[True], grads[False], dim=0) > 0.99


@pytest.mark.parametrize("masked", [False, True])
def test_attention_and_its_gradients_match_the_written_out_reference(masked: bool) -> None:
    """The fused qkv projection split by unbind into SDPA (with FlexTok's bool mask) against
    softmax(q k^T / sqrt(d)) v written out: same values, same gradients."""
    torch.manual_seed(0)
    attn = Attention(16, 4)
    x = torch.randn(3, 7, 16)
    mask = register_causal_mask(4, 3, x.device) if masked else None
    out = attn(x, mask)
    grads = torch.autograd.grad(out.pow(2).sum(), list(attn.parameters()))

    q, k, v = (z.view(3, 7, 4, 4).transpose(1, 2) for z in attn.qkv(x).chunk(3, -1))
    scores = q @ k.transpose(-2, -1) / 2.0  # (B, heads, T, T); sqrt(head dim 4)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 7, 16))
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), list(attn.parameters()))
    assert_rounding_close(out, ref, what="attention")
    for g, r in zip(grads, ref_grads, strict=True):
        assert_rounding_close(g, r, what="attention gradient")


def test_register_causal_mask_layout() -> None:
    mask = register_causal_mask(2, 3, torch.device("cpu"))
    expected = torch.tensor([
        [1, 1, 0, 0, 0],  # patches see patches only
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # latent token i sees every patch and latent tokens <= i
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("causal", [True, False])
def test_register_causal_encoder_hides_later_tokens(causal: bool) -> None:
    torch.manual_seed(0)
    model = Tokenizer(_config(quantizer="kl", num_tokens=6, register_causal=causal)).eval()
    with torch.no_grad():  # the init's 0.02-std weights make token interactions ~1e-6
        for weight in model.encoder.parameters():
            if weight.dim() > 1:
                weight.normal_(std=0.3)
    x = _images(2)
    j = 3
    with torch.no_grad():
        before = model.encode(x).latents  # (B, K, D) posterior means in eval mode
        # Latent token j's input; not a constant shift, which LayerNorm would remove.
        model.latent_tokens[:, j] += torch.randn(model.cfg.width, generator=torch.Generator()
                                                 .manual_seed(1))
        after = model.encode(x).latents
    change = (after - before).abs().amax(dim=(0, 2))  # (K,)
    assert change[j] > 1e-2
    if causal:  # masked keys get exactly zero weight
        assert (change[:j] <= 1e-6).all(), change
    else:
        assert (change[:j] > 1e-3).all(), change


@pytest.mark.parametrize("k,lengths", [(4, {1, 2, 4}), (6, {1, 2, 4, 6}), (1, {1})])
def test_sample_keep_pow2_takes_powers_of_two_and_k(k: int, lengths: set[int]) -> None:
    model = Tokenizer(_config(num_tokens=k))
    keep = model.sample_keep(2000, generator=torch.Generator().manual_seed(0), lengths="pow2")
    assert keep.dtype == torch.long
    assert set(keep.tolist()) == lengths
    counts = torch.bincount(keep)[sorted(lengths)].float()
    assert counts.min() / counts.max() > 0.8  # each length as likely
    with pytest.raises(ValueError, match="lengths must be 'uniform' or 'pow2'"):
        model.sample_keep(4, lengths="pow3")
