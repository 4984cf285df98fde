"""Compact latent image tokenizers: TiTok-style 1D tokens or a 2D patch-grid baseline.

One file holds the config, the blocks, the four quantizers (KL, FSQ, VQ, binary), the model
and the size registry. Images are float tensors in [-1, 1] of shape (B, C, H, W); latents are
(B, K, D) with K tokens of dimension D.

- ``layout='1d'`` (TiTok): the encoder reads N patch embeddings plus K learned latent
  tokens and only the K latent outputs leave it; the decoder rebuilds the N patches from
  the K latents plus N mask tokens.
- ``layout='2d'``: every patch is its own latent token (K = N).

Nested dropout (FlexTok) replaces tokens at positions >= keep by a learned "dropped"
embedding before decoding, so any prefix decodes; with ``register_causal`` the 1D encoder's
latent (register) tokens also attend causally to each other, as FlexTok's encoder does, so
token i is computed without tokens > i. Latent perturbation (RobustTok) moves a fraction of
the tokens of a proportion of the images to nearby codes (or adds noise in units of each
dimension's spread for KL latents); it is the training augmentation and the basis of the pFD
metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.layers import Linear, attention

LAYOUTS = ("1d", "2d")
QUANTIZERS = ("kl", "fsq", "vq", "binary")
# A binary code is a D-bit pattern and the cache stores codes as int32; 30 bits also leave room
# for one extra id (a mask or padding token) above the vocabulary.
MAX_BINARY_BITS = 30


@dataclass(kw_only=True)
class TokenizerModelConfig:
    """Architecture and quantizer of a :class:`Tokenizer`."""

    image_size: int
    """Height and width of the (square) input images in pixels."""
    channels: int
    """Image channels (1 for grayscale, 3 for RGB)."""
    width: int
    """Transformer width of encoder and decoder."""
    depth: int
    """Number of transformer blocks in the encoder; the decoder uses the same."""
    heads: int
    """Attention heads; must divide ``width``."""
    layout: str = "1d"
    """'1d' (K learned latent tokens, TiTok) or '2d' (one latent token per patch)."""
    patch_size: int = 4
    """Side of the square patches; must divide ``image_size``."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP as a multiple of ``width``."""
    num_tokens: int = 16
    """K, the number of latent tokens for '1d'; ignored for '2d' (K = number of patches)."""
    token_dim: int = 4
    """D, the dimension of each latent token (binary: bits per token, at most 30)."""
    quantizer: str = "kl"
    """'kl' (continuous, diagonal Gaussian), 'fsq' (finite scalar), 'vq' (codebook) or 'binary'
    (one sign bit per dimension, LFQ)."""
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    """FSQ levels per latent dimension; ``len(fsq_levels)`` must equal ``token_dim``."""
    codebook_size: int = 1024
    """VQ codebook entries."""
    commitment: float = 0.25
    """VQ commitment weight (beta)."""
    entropy_weight: float = 0.0
    """Entropy-loss weight of vq and binary; 0 turns the term off."""
    kl_weight: float = 1e-4
    """Weight of the KL term to N(0, 1) for the 'kl' quantizer."""
    register_causal: bool = False
    """FlexTok: in the '1d' encoder, latent token i attends to every patch and to latent
    tokens <= i, and patches attend only to patches; False: full attention."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.register_causal and self.layout != "1d":
            raise ValueError(f"register_causal = True needs layout '1d' (the causal mask orders "
                             f"the K latent tokens), got layout {self.layout!r}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        for name in (
            "image_size",
            "channels",
            "patch_size",
            "width",
            "depth",
            "heads",
            "num_tokens",
            "token_dim",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.quantizer == "fsq":
            if len(self.fsq_levels) != self.token_dim:
                raise ValueError(
                    f"fsq needs token_dim == len(fsq_levels): token_dim {self.token_dim}, "
                    f"fsq_levels {self.fsq_levels} (length {len(self.fsq_levels)})"
                )
            if any(level < 2 for level in self.fsq_levels):
                raise ValueError(f"every fsq level must be >= 2, got {self.fsq_levels}")
        if self.quantizer == "binary" and self.token_dim > MAX_BINARY_BITS:
            raise ValueError(
                f"binary needs token_dim <= {MAX_BINARY_BITS} (a code is a token_dim-bit pattern "
                f"and codes are stored as int32), got token_dim {self.token_dim}"
            )
        if self.quantizer == "vq" and self.codebook_size < 2:
            raise ValueError(f"vq codebook_size must be >= 2, got {self.codebook_size}")
        for name in ("commitment", "entropy_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def num_patches(self) -> int:
        """N, the number of patches per image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def latent_tokens(self) -> int:
        """K as the model uses it: ``num_tokens`` for '1d', the patch count for '2d'."""
        return self.num_tokens if self.layout == "1d" else self.num_patches


# Only the transformer shape differs between sizes; everything else comes from overrides.
TOKENIZER_SIZES: dict[str, dict] = {
    "tiny": {"width": 64, "depth": 2, "heads": 4},
    "small": {"width": 128, "depth": 4, "heads": 4},
    "base": {"width": 256, "depth": 6, "heads": 8},
    "large": {"width": 512, "depth": 8, "heads": 8},
}


def tokenizer_config(size: str, **overrides) -> TokenizerModelConfig:
    """Build a config from a ``TOKENIZER_SIZES`` key plus field overrides."""
    if size not in TOKENIZER_SIZES:
        raise ValueError(f"unknown tokenizer size {size!r}; choose from {list(TOKENIZER_SIZES)}")
    return TokenizerModelConfig(**{**TOKENIZER_SIZES[size], **overrides})


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head self-attention over (B, T, W) using scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, W) -> (B, T, W); ``mask`` (T, T) bool, True where query i may attend to
        key j (None: full attention)."""
        b, t, w = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        # unbind, not qkv[0], qkv[1], qkv[2]: the backward of three selects zero-fills and adds
        # three (3, B, heads, T, W/heads) tensors, unbind's stacks once (5-15% of a tiny step).
        q, k, v = qkv.unbind(0)  # (B, heads, T, W/heads) each
        # A bool mask broadcasts over batch and heads.
        out = attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(Linear(width, hidden), nn.GELU(), Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, W) -> (B, T, W); ``mask`` as in :class:`Attention`."""
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks with a final LayerNorm."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, W) -> (B, T, W); ``mask`` as in :class:`Attention`."""
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


def register_causal_mask(num_patches: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """(N + K, N + K) bool attention mask over [patches, latent tokens], True = may attend.

    FlexTok's encoder mask: patches attend to patches only (so the patch features do not depend
    on the registers), latent token i to every patch and to latent tokens <= i.
    """
    t = num_patches + num_tokens
    mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()  # causal over everything
    mask[:, :num_patches] = True  # every position sees every patch
    return mask


# ------------------------------------------------------------------------- quantizers


@dataclass
class QuantizerOutput:
    """What every quantizer returns; ``loss`` is already weighted."""

    latents: torch.Tensor  # (B, K, D)
    loss: torch.Tensor  # scalar
    stats: dict[str, torch.Tensor]
    codes: torch.Tensor | None = None  # (B, K) long, discrete quantizers only
    mean: torch.Tensor | None = None  # (B, K, D), kl only
    logvar: torch.Tensor | None = None  # (B, K, D), kl only


def _select_tokens(
    shape: torch.Size, fraction: float, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Bernoulli(fraction) mask over the (B, K) token grid."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    # rand is in [0, 1), so fraction 0 selects nothing and fraction 1 selects everything.
    return torch.rand(shape, generator=generator, device=device) < fraction


def select_images(
    batch: int, proportion: float, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B,) bool: exactly round(proportion * B) random images, at least one when proportion > 0.

    A fixed count rather than a Bernoulli draw per image, as RobustTok's code takes the first
    int(beta * B) images of each (shuffled) batch; the floor of one keeps a small proportion
    of a small per-worker batch from silently perturbing nothing.
    """
    if not 0.0 <= proportion <= 1.0:
        raise ValueError(f"proportion must be in [0, 1], got {proportion}")
    count = min(batch, math.floor(proportion * batch + 0.5))
    if proportion > 0:
        count = max(count, 1)
    chosen = torch.randperm(batch, generator=generator, device=device)[:count]
    mask = torch.zeros(batch, dtype=torch.bool, device=device)
    mask[chosen] = True
    return mask


def latent_spread(latents: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (D,) detached std of each latent dimension over all tokens (float32)."""
    return latents.detach().flatten(0, -2).float().std(0, correction=0)


def perturb_latents(
    latents: torch.Tensor,
    fraction: float,
    sigma: float,
    generator: torch.Generator | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add N(0, (sigma * scale)^2) noise to a random ``fraction`` of the (B, K, D) tokens.

    ``scale`` (D,), usually :func:`latent_spread`: sigma is then in units of each dimension's
    spread, so the same sigma perturbs a tokenizer with wide latents as much as one with narrow
    latents; None: sigma in absolute units.
    """
    mask = _select_tokens(latents.shape[:2], fraction, latents.device, generator)  # (B, K)
    noise = torch.randn(
        latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
    )
    if scale is not None:
        noise = noise * scale.to(device=latents.device, dtype=latents.dtype)
    return latents + sigma * noise * mask.unsqueeze(-1)


@torch.no_grad()
def _code_usage(codes: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """Fraction of the vocabulary used in the batch and the perplexity of code usage."""
    # Counts only the codes that occur, so the cost does not grow with the vocabulary
    # (binary has up to 2^30 codes; a bincount would hold one counter per code).
    counts = torch.unique(codes.flatten(), return_counts=True)[1].float()
    probs = counts / counts.sum()
    entropy = -(probs * torch.log(probs)).sum()
    return {
        "usage": codes.new_tensor(len(counts) / vocab_size, dtype=torch.float32),
        "perplexity": entropy.exp(),
    }


class KLQuantizer(nn.Module):
    """Diagonal Gaussian posterior: input (B, K, 2D) = (mean, logvar), output (B, K, D)."""

    def __init__(self, token_dim: int, kl_weight: float) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.in_dim = 2 * token_dim
        self.kl_weight = kl_weight

    def forward(
        self,
        z: torch.Tensor,
        sample: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> QuantizerOutput:
        """z: (B, K, 2D). Samples when ``sample`` (default: in training mode), else the mean."""
        mean, logvar = z.chunk(2, dim=-1)  # (B, K, D) each
        # Bounds keep exp(logvar) finite early in training, as in the LDM autoencoder.
        logvar = logvar.clamp(-30.0, 20.0)
        if sample is None:
            sample = self.training
        latents = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=z.device, dtype=z.dtype)
            latents = mean + torch.exp(0.5 * logvar) * eps
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return QuantizerOutput(
            latents=latents,
            loss=self.kl_weight * kl,
            stats={"kl": kl.detach(), "posterior_std": torch.exp(0.5 * logvar).mean().detach()},
            mean=mean,
            logvar=logvar,
        )


class FSQuantizer(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023) with a straight-through estimator.

    Dimension i is bounded with a shifted tanh so that rounding yields exactly ``levels[i]``
    integers; even level counts get the paper's half-step offset (values -L/2 .. L/2 - 1).
    The integer codes 0 .. L-1 are mapped to an evenly spaced grid on exactly [-1, 1] for
    every L (the paper divides by L // 2, which leaves even levels on [-1, 1 - 2/L]).
    """

    levels: torch.Tensor
    basis: torch.Tensor

    def __init__(self, levels: list[int], eps: float = 1e-3) -> None:
        super().__init__()
        self.token_dim = len(levels)
        self.in_dim = len(levels)
        self.eps = eps
        self.vocab_size = math.prod(levels)
        levels_t = torch.tensor(levels, dtype=torch.long)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), levels_t[:-1]]), 0)
        # Buffers follow .to(device) without being trainable; not saved, since config defines them.
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash z: (..., D) so that round() gives levels[i] values -L//2 .. (L-1)//2."""
        levels = self.levels.to(z.dtype)
        half = (levels - 1) * (1 + self.eps) / 2
        offset = (self.levels % 2 == 0).to(z.dtype) * 0.5
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _digits_to_latents(self, digits: torch.Tensor) -> torch.Tensor:
        """Integer (or straight-through) digits 0 .. L-1: (..., D) -> latents in [-1, 1]."""
        return digits * (2.0 / (self.levels - 1).to(digits.dtype)) - 1.0

    def forward(self, z: torch.Tensor, **_: object) -> QuantizerOutput:
        """z: (B, K, D) -> latents (B, K, D) on the FSQ grid, codes (B, K)."""
        # Rounding in bf16 would misplace codes near level boundaries.
        z = z.float()
        bounded = self._bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()  # straight-through
        digits = rounded + (self.levels // 2).to(z.dtype)  # (B, K, D) values 0 .. L-1
        latents = self._digits_to_latents(digits)
        codes = self.digits_to_codes(digits.detach().round().long())
        return QuantizerOutput(
            latents=latents,
            loss=z.new_zeros(()),
            stats=_code_usage(codes, self.vocab_size),
            codes=codes,
        )

    def digits_to_codes(self, digits: torch.Tensor) -> torch.Tensor:
        """Per-dimension integer codes (..., D) -> flat mixed-radix index (...)."""
        return (digits * self.basis).sum(-1)

    def codes_to_digits(self, codes: torch.Tensor) -> torch.Tensor:
        """Flat index (...) -> per-dimension integer codes (..., D) in 0 .. L-1."""
        return (codes.unsqueeze(-1) // self.basis) % self.levels

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Flat codes (B, K) -> latents (B, K, D) in [-1, 1]."""
        return self._digits_to_latents(self.codes_to_digits(codes).float())

    def latents_to_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents on the FSQ grid (B, K, D) -> flat codes (B, K)."""
        digits = ((latents + 1.0) * (self.levels - 1) / 2.0).round().long()
        return self.digits_to_codes(digits)

    def perturb_codes(
        self, codes: torch.Tensor, fraction: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Move every dimension of a random ``fraction`` of tokens one level up or down.

        At the edge of a dimension the step is reflected rather than clamped, so a selected
        token always changes (a clamped step would silently leave some tokens untouched).
        """
        mask = _select_tokens(codes.shape, fraction, codes.device, generator)  # (B, K)
        digits = self.codes_to_digits(codes)  # (B, K, D)
        signs = torch.randint(0, 2, digits.shape, generator=generator, device=codes.device)
        step = 2 * signs - 1
        moved = digits + step
        moved = torch.where((moved < 0) | (moved >= self.levels), digits - step, moved)
        return torch.where(mask, self.digits_to_codes(moved), codes)


class VectorQuantizer(nn.Module):
    """Cosine-similarity VQ (TiTok/ViT-VQGAN style): L2-normalised inputs and codebook."""

    def __init__(
        self,
        codebook_size: int,
        token_dim: int,
        commitment: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
    ) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.in_dim = token_dim
        self.vocab_size = codebook_size
        self.commitment = commitment
        self.entropy_weight = entropy_weight
        # Cosine similarities lie in [-1, 1]; a low temperature makes the soft assignment
        # used by the entropy loss sharp enough to resemble the hard argmax.
        self.entropy_temperature = entropy_temperature
        self.codebook = nn.Embedding(codebook_size, token_dim)
        nn.init.normal_(self.codebook.weight)

    def normalized_codebook(self) -> torch.Tensor:
        """(codebook_size, D) unit-norm codes."""
        return F.normalize(self.codebook.weight, dim=-1)

    def forward(self, z: torch.Tensor, **_: object) -> QuantizerOutput:
        """z: (B, K, D) -> unit-norm latents (B, K, D), codes (B, K)."""
        z = F.normalize(z, dim=-1)
        codebook = self.normalized_codebook()  # (V, D)
        similarity = z @ codebook.t()  # (B, K, V)
        codes = similarity.argmax(-1)  # (B, K)
        quantized = codebook[codes]  # (B, K, D)
        codebook_loss = F.mse_loss(quantized, z.detach())
        commitment_loss = F.mse_loss(z, quantized.detach())
        loss = codebook_loss + self.commitment * commitment_loss
        stats = {
            "codebook_loss": codebook_loss.detach(),
            "commitment_loss": commitment_loss.detach(),
            **_code_usage(codes, self.vocab_size),
        }
        if self.entropy_weight > 0:
            entropy_loss = self._entropy_loss(similarity)
            loss = loss + self.entropy_weight * entropy_loss
            stats["entropy_loss"] = entropy_loss.detach()
        return QuantizerOutput(
            latents=z + (quantized - z).detach(), loss=loss, stats=stats, codes=codes
        )

    def _entropy_loss(self, similarity: torch.Tensor) -> torch.Tensor:
        """Low per-token entropy (confident) minus high batch entropy (diverse usage)."""
        logits = similarity.flatten(0, -2).float() / self.entropy_temperature  # (B*K, V)
        probs = logits.softmax(-1)
        log_probs = logits.log_softmax(-1)
        per_token = -(probs * log_probs).sum(-1).mean()
        mean_probs = probs.mean(0)
        batch = -(mean_probs * torch.log(mean_probs.clamp_min(1e-12))).sum()
        return per_token - batch

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, K) -> unit-norm latents (B, K, D)."""
        return self.normalized_codebook()[codes]

    @torch.no_grad()
    def nearest_codes(self, k: int = 8) -> torch.Tensor:
        """(V, k) indices of each code's k most similar other codes, most similar first."""
        codebook = self.normalized_codebook()
        similarity = codebook @ codebook.t()  # (V, V)
        similarity.fill_diagonal_(-float("inf"))
        return similarity.topk(min(k, self.vocab_size - 1), dim=-1).indices

    @torch.no_grad()
    def perturb_codes(
        self,
        codes: torch.Tensor,
        fraction: float,
        generator: torch.Generator | None = None,
        k: int = 8,
    ) -> torch.Tensor:
        """Replace a random ``fraction`` of (B, K) codes by one of their k nearest codes."""
        mask = _select_tokens(codes.shape, fraction, codes.device, generator)
        neighbours = self.nearest_codes(k)  # (V, k)
        pick = torch.randint(
            0, neighbours.shape[1], codes.shape, generator=generator, device=codes.device
        )
        replaced = neighbours[codes, pick]  # (B, K)
        return torch.where(mask, replaced, codes)


class BinaryQuantizer(nn.Module):
    """Lookup-free binary quantization (LFQ, MAGVIT-v2) with a straight-through estimator.

    Each of the D dimensions is one bit, its sign: latents are -1 or +1, the code of a token
    is its bit pattern (bit i set when dimension i is positive) and the vocabulary has 2^D
    codes, none of them stored. LFQ's +-1 rather than BSQ's projection onto the unit sphere
    and +-1/sqrt(D): the latents keep the unit per-dimension scale of the fsq grid and of the
    generator's N(0, 1) noise whatever D, and the decoder's input projection is initialised
    for unit-scale inputs. BSQ's bounded quantization error matters for its large D (up to
    256 bits); here D <= 30, and BSQ reconstructed worse (below).

    No commitment term: pulling the inputs towards +-1 freezes the signs where the encoder
    starts. 1D latent tokens start almost image-independent (per position, inputs differ
    between images by ~0.05 around offsets of ~0.8), so few signs differ between images, and
    with commitment 0.25 every position kept one code for every image. The sign needs no
    bounded inputs.

    Loss (already weighted): ``entropy_weight * (per-token entropy - batch entropy)``,
    against collapse onto few codes. The exact entropies over 2^D codes are factorised over
    the bits, as LFQ and BSQ approximate them: the soft probability that bit i is set is
    p_i = sigmoid(4 z_i / T), the softmax over the two values {-1, +1} of
    -(z_i - value)^2 / T; the per-token entropy sum_i H(p_i), averaged over tokens, goes down
    (confident bits) and the batch entropy sum_i H(mean p_i) over all tokens goes up (every
    bit set for half of the tokens). A batch entropy per token position instead collapsed.

    Measured on the default digits (16x16, K = 16, D = 10, 1500 steps; val PSNR), in the
    tokenizer stage (bench/binary_vs_fsq.py, seeds 0 and 1): fsq [8, 5, 5, 5] 21.1 / 21.4 dB;
    binary 18.0 / 20.5 dB; with entropy_weight 0.1, 23.2 / 21.0 dB; commitment 0.25: 12.4 dB
    (the mean image). In a plain loop of the same recipe without EMA (seed 0): no entropy
    term 20.7 dB, commitment 0.01 19.3 dB, BSQ scaling 19.3 dB.
    """

    shifts: torch.Tensor

    def __init__(
        self, token_dim: int, entropy_weight: float = 0.0, entropy_temperature: float = 1.0
    ) -> None:
        super().__init__()
        if not 1 <= token_dim <= MAX_BINARY_BITS:
            raise ValueError(f"token_dim must be in [1, {MAX_BINARY_BITS}], got {token_dim}")
        self.token_dim = token_dim
        self.in_dim = token_dim
        self.vocab_size = 2**token_dim
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.register_buffer("shifts", torch.arange(token_dim), persistent=False)

    def forward(self, z: torch.Tensor, **_: object) -> QuantizerOutput:
        """z: (B, K, D) -> latents (B, K, D) in {-1, +1}, codes (B, K)."""
        # Signs and entropies in float: bf16 would round small inputs and probabilities.
        z = z.float()
        bits = z > 0  # (B, K, D)
        hard = bits.to(z.dtype) * 2 - 1
        codes = self.bits_to_codes(bits)
        loss = z.new_zeros(())
        stats = {"bit_entropy": _bit_entropy(bits), **_code_usage(codes, self.vocab_size)}
        if self.entropy_weight > 0:
            entropy_loss = self.entropy_loss(z)
            loss = self.entropy_weight * entropy_loss
            stats["entropy_loss"] = entropy_loss.detach()
        return QuantizerOutput(
            latents=z + (hard - z).detach(), loss=loss, stats=stats, codes=codes
        )

    def entropy_loss(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., D) -> mean per-token entropy minus batch entropy, both summed over bits."""
        logits = 4.0 * z.flatten(0, -2).float() / self.entropy_temperature  # (N, D)
        probs = torch.sigmoid(logits)
        # H(sigmoid(l)) = p softplus(-l) + (1 - p) softplus(l): finite for saturated bits.
        per_token = (probs * F.softplus(-logits) + (1 - probs) * F.softplus(logits)).sum(-1)
        mean_probs = probs.mean(0).clamp(1e-6, 1 - 1e-6)  # (D,)
        batch = -(mean_probs * mean_probs.log() + (1 - mean_probs) * (1 - mean_probs).log())
        return per_token.mean() - batch.sum()

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits (..., D), bool or 0/1 -> codes (...) long, bit i = dimension i."""
        return (bits.long() << self.shifts).sum(-1)

    def codes_to_bits(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (...) -> bits (..., D) long in {0, 1}."""
        return (codes.long().unsqueeze(-1) >> self.shifts) & 1

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, K) -> latents (B, K, D) in {-1, +1}."""
        return self.codes_to_bits(codes).float() * 2 - 1

    def latents_to_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, K, D) -> codes (B, K) from their signs."""
        return self.bits_to_codes(latents > 0)

    def perturb_codes(
        self, codes: torch.Tensor, fraction: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Flip one random bit of a random ``fraction`` of (B, K) codes: the nearest codes."""
        mask = _select_tokens(codes.shape, fraction, codes.device, generator)  # (B, K)
        bit = torch.randint(
            0, self.token_dim, codes.shape, generator=generator, device=codes.device
        )
        return torch.where(mask, codes ^ (1 << bit), codes)


@torch.no_grad()
def _bit_entropy(bits: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of each bit's entropy in the batch, in bits: 1 when every bit is
    set for half of the tokens, 0 when every bit is stuck."""
    p = bits.flatten(0, -2).float().mean(0)  # (D,)
    nats = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))  # 0 log 0 = 0
    return (nats / math.log(2)).mean()


Quantizer = KLQuantizer | FSQuantizer | VectorQuantizer | BinaryQuantizer


def build_quantizer(cfg: TokenizerModelConfig) -> Quantizer:
    """The quantizer named by ``cfg.quantizer``."""
    if cfg.quantizer == "kl":
        return KLQuantizer(cfg.token_dim, cfg.kl_weight)
    if cfg.quantizer == "fsq":
        return FSQuantizer(cfg.fsq_levels)
    if cfg.quantizer == "binary":
        return BinaryQuantizer(cfg.token_dim, cfg.entropy_weight)
    return VectorQuantizer(cfg.codebook_size, cfg.token_dim, cfg.commitment, cfg.entropy_weight)


# ------------------------------------------------------------------------------ model


@dataclass
class TokenizerEncoding:
    """Result of :meth:`Tokenizer.encode`."""

    latents: torch.Tensor
    """(B, K, D) quantized (fsq/vq/binary) or sampled / mean (kl) latents; what the decoder
    reads."""
    aux_loss: torch.Tensor
    """Scalar, the weighted quantizer loss to add to the reconstruction loss."""
    stats: dict[str, torch.Tensor]
    """Detached scalar statistics (usage, perplexity, kl, ...); call float() to log."""
    codes: torch.Tensor | None = None
    """(B, K) long codes for fsq/vq/binary, None for kl."""
    mean: torch.Tensor | None = None
    """(B, K, D) posterior mean for kl, else None."""
    logvar: torch.Tensor | None = None
    """(B, K, D) clamped posterior log-variance for kl, else None."""


class Tokenizer(nn.Module):
    """ViT autoencoder with a quantized bottleneck of K tokens of dimension D."""

    def __init__(self, cfg: TokenizerModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w, n, k = cfg.width, cfg.num_patches, cfg.latent_tokens
        self.grid = cfg.image_size // cfg.patch_size

        self.patch_embed = nn.Conv2d(cfg.channels, w, cfg.patch_size, stride=cfg.patch_size)
        self.enc_pos = nn.Parameter(torch.zeros(1, n, w))
        if cfg.layout == "1d":
            # Learned per position, so the tokens double as their own positional embedding.
            self.latent_tokens = nn.Parameter(torch.zeros(1, k, w))
        self.encoder = Transformer(w, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.quantizer: Quantizer = build_quantizer(cfg)
        self.enc_proj = Linear(w, self.quantizer.in_dim)

        self.dec_proj = Linear(cfg.token_dim, w)
        self.dec_latent_pos = nn.Parameter(torch.zeros(1, k, w))
        self.dropped_token = nn.Parameter(torch.zeros(1, 1, w))
        if cfg.layout == "1d":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, w))
            self.dec_patch_pos = nn.Parameter(torch.zeros(1, n, w))
        self.decoder = Transformer(w, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.to_pixels = Linear(w, cfg.patch_size**2 * cfg.channels)
        self.apply(self._init_weights)
        for table in (self.enc_pos, self.dec_latent_pos, self.dropped_token):
            nn.init.normal_(table, std=0.02)
        if cfg.layout == "1d":
            for table in (self.latent_tokens, self.mask_token, self.dec_patch_pos):
                nn.init.normal_(table, std=0.02)
        # The bottleneck projections start at unit scale: latents then match the N(0, 1)
        # prior and spread over the FSQ levels, and the noise of KL sampling does not drown
        # them (with std 0.02 the first hundreds of steps only learn to shrink logvar).
        nn.init.normal_(self.enc_proj.weight, std=cfg.width**-0.5)
        nn.init.normal_(self.dec_proj.weight, std=cfg.token_dim**-0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """ViT-style init: truncated-normal linear weights, zero biases."""
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def num_tokens(self) -> int:
        """K, the number of latent tokens per image."""
        return self.cfg.latent_tokens

    @property
    def token_dim(self) -> int:
        """D, the dimension of each latent token."""
        return self.cfg.token_dim

    @property
    def is_discrete(self) -> bool:
        """True for fsq, vq and binary, whose latents are indexed by integer codes."""
        return self.cfg.quantizer != "kl"

    @property
    def vocab_size(self) -> int | None:
        """Codes per token (fsq: prod(levels), vq: codebook, binary: 2^D); None for kl."""
        return getattr(self.quantizer, "vocab_size", None)

    def encode(
        self,
        x: torch.Tensor,
        sample: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> TokenizerEncoding:
        """x: (B, C, H, W) in [-1, 1] -> :class:`TokenizerEncoding` with latents (B, K, D).

        ``sample`` only matters for kl: draw from the posterior (default in training mode)
        or return its mean (default in eval mode).
        """
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.enc_pos  # (B, N, W)
        if self.cfg.layout == "1d":
            latent = self.latent_tokens.expand(x.shape[0], -1, -1)  # (B, K, W)
            mask = (register_causal_mask(self.cfg.num_patches, self.num_tokens, x.device)
                    if self.cfg.register_causal else None)
            h = self.encoder(torch.cat([h, latent], dim=1), mask)  # (B, N + K, W)
            h = h[:, -self.num_tokens :]  # (B, K, W)
        else:
            h = self.encoder(h)  # (B, N, W), N = K
        q = self.quantizer(self.enc_proj(h), sample=sample, generator=generator)
        return TokenizerEncoding(
            latents=q.latents,
            aux_loss=q.loss,
            stats=q.stats,
            codes=q.codes,
            mean=q.mean,
            logvar=q.logvar,
        )

    def decode(self, latents: torch.Tensor, keep: torch.Tensor | int | None = None) -> torch.Tensor:
        """latents: (B, K, D) -> images (B, C, H, W), unbounded (train towards [-1, 1]).

        ``keep`` (B,) or int: tokens at positions >= keep are replaced by the learned dropped
        token, so their values cannot affect the output (nested dropout).
        """
        b, k, _ = latents.shape
        h = self.dec_proj(latents)  # (B, K, W)
        if keep is not None:
            keep_t = torch.as_tensor(keep, device=latents.device).reshape(-1, 1)  # (B or 1, 1)
            dropped = torch.arange(k, device=latents.device).unsqueeze(0) >= keep_t  # (B, K)
            h = torch.where(dropped.unsqueeze(-1), self.dropped_token.to(h.dtype), h)
        h = h + self.dec_latent_pos
        if self.cfg.layout == "1d":
            n = self.cfg.num_patches
            mask = self.mask_token.expand(b, n, -1) + self.dec_patch_pos  # (B, N, W)
            h = self.decoder(torch.cat([mask, h], dim=1))[:, :n]  # (B, N, W)
        else:
            h = self.decoder(h)  # (B, N, W)
        return self.unpatchify(self.to_pixels(h))

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W), patches in row-major order."""
        b, g, p, c = patches.shape[0], self.grid, self.cfg.patch_size, self.cfg.channels
        x = patches.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return x.reshape(b, c, g * p, g * p)

    def forward(
        self,
        x: torch.Tensor,
        keep: torch.Tensor | int | None = None,
        perturb: float = 0.0,
        perturb_sigma: float = 0.5,
        perturb_images: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, TokenizerEncoding]:
        """x: (B, C, H, W) -> (reconstruction (B, C, H, W), encoding).

        ``perturb`` > 0 (RobustTok) decodes from latents where that fraction of the tokens of
        ``perturb_images`` of the images was moved to nearby codes (fsq/vq/binary) or noised
        with ``perturb_sigma`` times each dimension's spread over the batch (kl), so the decoder
        learns to read slightly-off latents like those a generator produces. Unperturbed
        tokens keep their straight-through gradients.
        """
        enc = self.encode(x)
        latents = enc.latents
        if perturb > 0 and perturb_images > 0:
            latents = self.perturbed_latents(enc, perturb, perturb_sigma, perturb_images,
                                             generator=generator)
        return self.decode(latents, keep=keep), enc

    def perturbed_latents(
        self,
        enc: TokenizerEncoding,
        fraction: float,
        sigma: float,
        images: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, K, D) latents of ``enc`` with a ``fraction`` of the tokens of ``images`` (a
        proportion, RobustTok's beta) of the B images perturbed; the other images stay clean.

        kl: sigma is in units of each dimension's std over the batch's latents, detached (a
        noise scale the encoder could shrink would teach it to shrink its latents).
        """
        latents = enc.latents
        chosen = select_images(latents.shape[0], images, latents.device, generator)  # (B,)
        if enc.codes is not None:
            new_codes = self.perturb_codes(enc.codes, fraction, generator=generator)
            moved = ((new_codes != enc.codes) & chosen.unsqueeze(-1)).unsqueeze(-1)  # (B, K, 1)
            return torch.where(moved, self.codes_to_latents(new_codes).to(latents.dtype), latents)
        noised = self.perturb_latents(latents, fraction, sigma, generator=generator,
                                      scale=latent_spread(latents))
        return torch.where(chosen.view(-1, 1, 1), noised, latents)

    def sample_keep(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        lengths: str = "uniform",
    ) -> torch.Tensor:
        """(batch,) prefix lengths for nested dropout, long.

        ``lengths`` 'uniform': drawn uniformly from 1 .. K; 'pow2': uniformly from the powers
        of two <= K, and K itself (FlexTok trains on 1, 2, 4, ..., 256 of its 256 registers).
        """
        k = self.num_tokens
        if lengths == "uniform":
            return torch.randint(1, k + 1, (batch,), generator=generator, device=device)
        if lengths != "pow2":
            raise ValueError(f"lengths must be 'uniform' or 'pow2', got {lengths!r}")
        choices = sorted({2**i for i in range(k.bit_length()) if 2**i <= k} | {k})
        table = torch.tensor(choices, dtype=torch.long, device=device)
        return table[torch.randint(0, len(choices), (batch,), generator=generator, device=device)]

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Discrete codes (B, K) -> latents (B, K, D) as the decoder reads them."""
        if isinstance(self.quantizer, KLQuantizer):
            raise ValueError("codes_to_latents needs a discrete quantizer (fsq, vq or binary), "
                             "not kl")
        return self.quantizer.codes_to_latents(codes)

    def perturb_codes(
        self, codes: torch.Tensor, fraction: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Replace a random ``fraction`` of (B, K) codes by nearby codes (RobustTok).

        vq: one of the 8 nearest codebook entries; fsq: every dimension moved one level;
        binary: one bit flipped.
        """
        if isinstance(self.quantizer, KLQuantizer):
            raise ValueError("perturb_codes needs fsq, vq or binary; use perturb_latents for kl")
        return self.quantizer.perturb_codes(codes, fraction, generator=generator)

    def perturb_latents(
        self,
        latents: torch.Tensor,
        fraction: float,
        sigma: float,
        generator: torch.Generator | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add N(0, (sigma * scale)^2) noise to a random ``fraction`` of the (B, K, D) tokens
        (RobustTok); ``scale`` (D,) as in :func:`perturb_latents`, None: absolute sigma."""
        return perturb_latents(latents, fraction, sigma, generator=generator, scale=scale)
