"""Class-conditional flow-matching transformer over K latent tokens (SiT/DiT style).

One file holds the config, the blocks, the model and the size registry. The model reads
noisy latents x (B, K, D) at flow time t (B,) in [0, 1] with class labels y (B,) and
predicts the velocity (B, K, D); the time convention and the losses and samplers live in
``latentforge/flow.py``.

Conditioning follows DiT: c = embed(t) + embed(y) drives adaLN-zero modulation (shift, scale
and gate of every attention and MLP branch), and the final projection starts at zero, so the
untrained model is the identity in every block and predicts a zero velocity. The class table
has one extra row, index ``num_classes``, the null label that classifier-free guidance uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.layers import Linear, attention

# SiT/DiT embed integer diffusion steps 0 .. 999; scaling t in [0, 1] by the same factor keeps
# the sinusoidal frequencies in the range those embeddings were designed for.
TIME_SCALE = 1000.0
TIME_FREQ_DIM = 256


@dataclass(kw_only=True)
class GeneratorModelConfig:
    """Architecture of a :class:`FlowTransformer`."""

    num_tokens: int
    """K, the number of latent tokens per image (from the tokenizer)."""
    token_dim: int
    """D, the dimension of each latent token (from the tokenizer)."""
    num_classes: int
    """Number of real classes; the model adds one null class for guidance."""
    width: int
    """Transformer width."""
    depth: int
    """Number of transformer blocks."""
    heads: int
    """Attention heads; must divide ``width``."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP as a multiple of ``width``."""
    gelu_approximate: str = "none"
    """The MLP's GELU: 'none' (erf) or 'tanh' (DiT's approximation, within 5e-4 of erf). erf
    because torch's CPU tanh-GELU kernel is ~6x slower (measured: 10% of a training step);
    folders written before this field existed hold 'tanh' models (their loader says so)."""

    def __post_init__(self) -> None:
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got "
                             f"{self.gelu_approximate!r}")
        for name in ("num_tokens", "token_dim", "num_classes", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")


# Only the transformer shape differs between sizes; K, D and the classes come from the data.
GENERATOR_SIZES: dict[str, dict] = {
    "tiny": {"width": 64, "depth": 2, "heads": 4},
    "small": {"width": 128, "depth": 4, "heads": 4},
    "base": {"width": 256, "depth": 8, "heads": 8},
    "large": {"width": 512, "depth": 12, "heads": 8},
}


def generator_config(size: str, **overrides) -> GeneratorModelConfig:
    """Build a config from a ``GENERATOR_SIZES`` key plus field overrides."""
    if size not in GENERATOR_SIZES:
        raise ValueError(f"unknown generator size {size!r}; choose from {list(GENERATOR_SIZES)}")
    return GeneratorModelConfig(**{**GENERATOR_SIZES[size], **overrides})


# ----------------------------------------------------------------------------- blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (B, T, W) with per-sample shift, scale: (B, W) -> (B, T, W)."""
    # shift + x * (1 + scale) in one pass over x (addcmul) rather than two.
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def timestep_features(t: torch.Tensor, dim: int = TIME_FREQ_DIM) -> torch.Tensor:
    """Sinusoidal features of t: (B,) in [0, 1] -> (B, dim), periods from 1 to 10000 steps."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )  # (dim/2,)
    # In float32 even under autocast: t * 1000 * freq loses the fine frequencies in bf16.
    angles = (t.float() * TIME_SCALE).unsqueeze(1) * freqs.unsqueeze(0)  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t: (B,) -> (B, W): sinusoidal features followed by a two-layer MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = Linear(TIME_FREQ_DIM, width)
        self.fc2 = Linear(width, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) -> (B, W)."""
        return self.fc2(F.silu(self.fc1(timestep_features(t))))


class Attention(nn.Module):
    """Multi-head self-attention over (B, T, W) using scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, W) -> (B, T, W)."""
        b, t, w = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        # unbind: its backward stacks the three gradients once, where three selects would
        # zero-fill and add three tensors of qkv's size.
        q, k, v = qkv.unbind(0)  # (B, heads, T, W/heads) each
        out = attention(q, k, v)  # (B, heads, T, W/heads)
        return self.proj(out.transpose(1, 2).reshape(b, t, w))


class AdaLNBlock(nn.Module):
    """DiT block: attention and MLP branches, each modulated and gated by the condition.

    The modulation layer starts at zero, so every gate is zero and the block is the identity
    until training moves it (adaLN-zero): deep stacks then start as a shallow network.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float,
                 gelu_approximate: str = "none") -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        # No affine parameters: the modulation supplies per-sample scale and shift.
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            Linear(width, hidden), nn.GELU(approximate=gelu_approximate),
            Linear(hidden, width)
        )
        self.modulation = Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, K, W), condition c: (B, W) -> (B, K, W)."""
        mod = self.modulation(F.silu(c))  # (B, 6W)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        # Gated residuals as addcmul: x + gate * branch in one pass.
        x = torch.addcmul(x, gate1.unsqueeze(1), self.attn(modulate(self.norm1(x), shift1, scale1)))
        return torch.addcmul(x, gate2.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    """Modulated LayerNorm and a projection from the width to the token dimension."""

    def __init__(self, width: int, token_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = Linear(width, 2 * width)
        self.linear = Linear(width, token_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, K, W), c: (B, W) -> (B, K, D)."""
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ------------------------------------------------------------------------------ model


class FlowTransformer(nn.Module):
    """Predicts the flow-matching velocity of K latent tokens, conditioned on time and class."""

    def __init__(self, cfg: GeneratorModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.x_embed = Linear(cfg.token_dim, w)
        # Learned rather than sinusoidal: 1D tokenizer tokens have no spatial layout to encode.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, w))
        self.t_embed = TimestepEmbedder(w)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, w)  # last row: the null label
        self.blocks = nn.ModuleList(
            AdaLNBlock(w, cfg.heads, cfg.mlp_ratio, cfg.gelu_approximate)
            for _ in range(cfg.depth)
        )
        self.final = FinalLayer(w, cfg.token_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's init: xavier linears, small embeddings, zero modulation and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for layer in (self.t_embed.fc1, self.t_embed.fc2):
            nn.init.normal_(layer.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, AdaLNBlock | FinalLayer):
                nn.init.zeros_(module.modulation.weight)
                nn.init.zeros_(module.modulation.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    @property
    def null_class(self) -> int:
        """The label index meaning "no class" (unconditional), used for guidance."""
        return self.cfg.num_classes

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """t: (B,), y: (B,) long -> conditioning vector c: (B, W)."""
        return self.t_embed(t) + self.y_embed(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, K, D), t: (B,) in [0, 1] (or a scalar), y: (B,) long -> velocity (B, K, D).

        The training entry point: a DDP wrapper only syncs gradients of calls through
        ``__call__``, so training code calls ``model(x, t, y)`` once per step.
        """
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h = self.x_embed(x) + self.pos_embed  # (B, K, W)
        c = self.condition(t, y)  # (B, W)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h, c)  # (B, K, D)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float
    ) -> torch.Tensor:
        """Classifier-free guided velocity: v_u + cfg_scale * (v_c - v_u), shapes as ``forward``.

        Conditional and unconditional halves run as one batch of 2B. ``cfg_scale == 1`` is
        the plain conditional velocity and costs a single pass; 0 is unconditional.
        """
        if cfg_scale == 1.0:
            return self(x, t, y)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        null = torch.full_like(y, self.null_class)
        v = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, K, D)
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)
