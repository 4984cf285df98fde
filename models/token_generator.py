"""Class-conditional transformers over K discrete latent tokens: MaskGIT and autoregressive.

One file holds the config, the blocks, the model and the size registry. Both kinds read a
sequence of K integer codes (B, K) from a discrete tokenizer (fsq, vq or binary; the code of a
token indexes its vocabulary of V entries) and return logits (B, K, V); the objectives, the
samplers and the log-probabilities that RL needs live in ``latentforge/tokens.py``.

- ``kind='maskgit'`` (MaskGIT, TiTok's generator): bidirectional attention; a masked position
  holds the extra input code V ([MASK]) and its logits predict the code that belongs there.
- ``kind='ar'`` (LlamaGen, FlexTok-style): causal attention over [class, t_0, ..., t_{K-2}];
  the logits at position i predict t_i from the class and t_<i, so a 1D tokenizer's
  coarse-to-fine order is the generation order. :meth:`TokenTransformer.decode_step` runs one
  position at a time against a key/value cache.

The class enters as a prefix token (LlamaGen), not through adaLN: it is one more position both
kinds attend to. Its table has one extra row, index ``num_classes``, the null label that
classifier-free guidance uses (guidance mixes logits, ``tokens.guided_logits``, by mixing the
affine head's inputs: ``TokenTransformer.guided_head``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from latentforge.config import MAX_TOKEN_VOCAB
from latentforge.models.generator import GENERATOR_SIZES
from latentforge.models.layers import Dropout, Linear, attention

KINDS = ("maskgit", "ar")
# Above MAX_VOCAB (latentforge.config's, which refuses such a pairing up front) the output head
# and the embedding table dominate a small model and a code is seen too rarely to learn its
# logit: a 2^20-code binary tokenizer needs grouped bits.
MAX_VOCAB = MAX_TOKEN_VOCAB


@dataclass(kw_only=True)
class TokenGeneratorConfig:
    """Architecture of a :class:`TokenTransformer`."""

    kind: str
    """'maskgit' (bidirectional, predicts masked codes) or 'ar' (causal, next code)."""
    num_tokens: int
    """K, the number of codes per image (from the tokenizer)."""
    vocab_size: int
    """V, distinct codes per token (fsq: prod(levels), vq: codebook size, binary: 2^D)."""
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
    dropout: float = 0.0
    """Dropout on the attention and MLP branches' outputs (MaskGIT trains with 0.1)."""
    gelu_approximate: str = "none"
    """The MLP's GELU: 'none' (erf) or 'tanh' (within 5e-4 of erf; torch's CPU kernel for it is
    ~6x slower). Folders written before this field existed hold 'tanh' models."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got "
                             f"{self.gelu_approximate!r}")
        for name in ("num_tokens", "num_classes", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.vocab_size <= MAX_VOCAB:
            raise ValueError(f"vocab_size must be in [2, {MAX_VOCAB}], got {self.vocab_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


# The flow generator's registry itself, so that "small" means one transformer shape whatever
# the kind (generator.size is one key) and sampling speeds compare at matched size.
TOKEN_GENERATOR_SIZES: dict[str, dict] = GENERATOR_SIZES


def token_generator_config(size: str, **overrides) -> TokenGeneratorConfig:
    """Build a config from a ``TOKEN_GENERATOR_SIZES`` key plus field overrides."""
    if size not in TOKEN_GENERATOR_SIZES:
        raise ValueError(f"unknown generator size {size!r}; choose from "
                         f"{list(TOKEN_GENERATOR_SIZES)}")
    return TokenGeneratorConfig(**{**TOKEN_GENERATOR_SIZES[size], **overrides})


# ----------------------------------------------------------------------------- blocks

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys, values (B, heads, T, W/h)


def take_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) at positions (B, M) long -> (B, M, ...), as ``x.gather(1, ...)``, but one
    index_select of whole rows of the flattened (B*T, ...) view: CPU gather copies element by
    element (512 x 17 x 64 fp32, 12 positions, 1 thread, Zen 5: 39 vs 387 us)."""
    b, t = x.shape[:2]
    # Unlike gather, an index outside [0, T) reads another sample's row: TokenTransformer's
    # forward checks the positions once, before its calls here.
    rows = (torch.arange(b, device=x.device).unsqueeze(1) * t + positions).flatten()
    picked = x.reshape(b * t, *x.shape[2:]).index_select(0, rows)
    return picked.view(b, positions.shape[1], *x.shape[2:])


class Attention(nn.Module):
    """Multi-head self-attention over (B, T, W), optionally causal, optionally cached."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool,
                past: tuple[torch.Tensor, torch.Tensor] | None = None,
                queries: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: (B, T, W) -> ((B, T, W), this call's keys and values appended to `past`).

        With `past` the T new positions follow the cached ones; causal attention then lets
        new position i see every cached position and the new ones up to i. `queries` (B, M)
        (bidirectional only): the output (B, M, W) of those positions alone, which still
        attend to all T.
        """
        b, t, w = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if queries is not None:
            if causal:
                raise ValueError("queries are for bidirectional attention (maskgit)")
            t = queries.shape[1]
            q = take_positions(qkv[..., :w], queries).view(b, t, self.heads, -1).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        mask = None
        if causal and t > 1:
            offset = k.shape[2] - t  # cached positions before the new ones
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(offset)
        out = attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, t, w)), (k, v)


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float,
                 gelu_approximate: str = "none") -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(Linear(width, hidden), nn.GELU(approximate=gelu_approximate),
                                 Linear(hidden, width), Dropout(dropout))
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, causal: bool,
                past: tuple[torch.Tensor, torch.Tensor] | None = None,
                queries: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: (B, T, W) -> ((B, T, W), keys and values); with `queries` (B, M) the output
        (B, M, W) of those positions only (see Attention)."""
        h, kv = self.attn(self.norm1(x), causal, past, queries)
        if queries is not None:
            x = take_positions(x, queries)
        x = x + self.drop(h)
        return x + self.mlp(self.norm2(x)), kv


# ------------------------------------------------------------------------------ model


class TokenTransformer(nn.Module):
    """Logits over the vocabulary for each of K code positions, conditioned on a class."""

    def __init__(self, cfg: TokenGeneratorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        # maskgit: one extra input row, the [MASK] code (index V); ar never reads it.
        self.tok_embed = nn.Embedding(cfg.vocab_size + 1, w)
        self.cls_embed = nn.Embedding(cfg.num_classes + 1, w)  # last row: the null label
        # Position 0 is the class token; 1 .. K the codes (maskgit) or codes shifted right (ar).
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens + 1, w))
        self.blocks = nn.ModuleList(
            Block(w, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.gelu_approximate)
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w)
        self.head = Linear(w, cfg.vocab_size)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2 style init: N(0, 0.02) linears and embeddings, zero biases."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def null_class(self) -> int:
        """The label index meaning "no class" (unconditional), used for guidance."""
        return self.cfg.num_classes

    @property
    def mask_code(self) -> int:
        """The input code of a masked position (maskgit)."""
        return self.cfg.vocab_size

    @property
    def causal(self) -> bool:
        return self.cfg.kind == "ar"

    def forward(self, codes: torch.Tensor, y: torch.Tensor,
                positions: torch.Tensor | None = None,
                guidance: float | None = None, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        """codes: (B, K) long, y: (B,) long -> logits (B, K, V), or (B, M, V) at `positions`.

        maskgit: codes may hold ``mask_code``; logits at i predict the code at i.
        ar: logits at i predict codes[:, i] from y and codes[:, :i] (the last code is not read).
        `positions` (B, M) long: only those code positions go through the output head (a
        sampler needs the still-masked ones; the head is a third of a tiny model's FLOPs).
        `rows` (N,) long (training: each row masks its own number of codes): indices b K + k
        into the batch's B K code positions; logits (N, V) of those positions only, as
        ``logits.flatten(0, 1)[rows]`` of the full output, without the head's work on the
        others. Indices, not a bool mask: selecting by a mask has a data-dependent size, which
        torch.compile cannot trace (a graph break made compiled maskgit training slower than
        eager), while the indices come from the caller and may repeat (padding).
        `guidance` s: the batch is B/2 conditional rows then their B/2 unconditional twins, and
        the result (B/2, K or M, V) is the classifier-free guided uncond + s (cond - uncond)
        (see ``guided_head``).
        The training entry point: DDP syncs gradients only for calls through ``__call__``.
        """
        cls = self.cls_embed(y).unsqueeze(1)  # (B, 1, W)
        if self.causal:
            h = torch.cat([cls, self.tok_embed(codes[:, :-1])], dim=1)  # (B, K, W)
        else:
            h = torch.cat([cls, self.tok_embed(codes)], dim=1)  # (B, K + 1, W)
        h = h + self.pos_embed[:, : h.shape[1]]
        if rows is not None and (positions is not None or guidance is not None):
            raise ValueError("rows selects code positions of an unguided batch: not with "
                             "positions or guidance")
        if positions is not None and positions.numel() and not (
                int(positions.min()) >= 0 and int(positions.max()) < codes.shape[1]):
            raise IndexError(f"positions must lie in [0, {codes.shape[1]}) (the codes), got "
                             f"{int(positions.min())} .. {int(positions.max())}")
        if positions is not None and not self.causal:
            # The last block computes only the asked positions (their attention still reads
            # all of them): the other outputs would be thrown away. Code i sits at input i + 1.
            for block in self.blocks[:-1]:
                h, _ = block(h, False)
            h, _ = self.blocks[-1](h, False, queries=positions + 1)  # (B, M, W)
            return self.guided_head(h, guidance)  # (B or B/2, M, V)
        for block in self.blocks:
            h, _ = block(h, self.causal)
        # ar: outputs 0 .. K-1 (class and K-1 codes) predict codes 0 .. K-1;
        # maskgit: outputs 1 .. K belong to the code positions.
        if rows is not None:
            # code b K + k is output row b (K + 1) + k + 1 (maskgit: the class token first)
            index = rows if self.causal else rows + rows // codes.shape[1] + 1
            return self.guided_head(h.flatten(0, 1).index_select(0, index), None)  # (N, V)
        h = h if self.causal else h[:, 1:]  # (B, K, W)
        if positions is not None:
            h = take_positions(h, positions)  # (B, M, W)
        return self.guided_head(h, guidance)  # (B or B/2, K or M, V)

    def guided_head(self, h: torch.Tensor, guidance: float | None) -> torch.Tensor:
        """Logits of hidden states h (B, ..., W); with `guidance` s, of the guided mix of the
        first half (conditional) and the second (unconditional): (B/2, ..., V).

        The head is affine and the guidance weights (1 - s, s) sum to 1, so mixing its inputs
        gives the mix of its outputs, uncond + s (cond - uncond), up to rounding, for half of
        the head's work (the head is a third of a tiny model's FLOPs when sampling)."""
        h = self.norm(h)
        if guidance is not None:
            if h.shape[0] % 2:
                raise ValueError(f"guidance needs conditional rows and their unconditional twins "
                                 f"(an even batch), got a batch of {h.shape[0]}")
            cond, uncond = h.float().chunk(2)
            h = torch.lerp(uncond, cond, guidance).to(h.dtype)
        return self.head(h)

    def decode_step(self, prev: torch.Tensor | None, y: torch.Tensor, position: int,
                    cache: KVCache | None, guidance: float | None = None
                    ) -> tuple[torch.Tensor, KVCache]:
        """One ar step against the cache: logits (B, V) for code `position`, and the cache.

        Position 0 reads the class token (`prev` None, `cache` None); position i > 0 reads
        code i-1 (`prev`: (B,) long) after the cache of the positions before it. `guidance`:
        the rows are conditional then unconditional twins, and the logits (B/2, V) guided, as
        in ``forward``.
        """
        if not self.causal:
            raise ValueError("decode_step is for kind 'ar'; maskgit decodes whole sequences")
        if position == 0:
            h = self.cls_embed(y).unsqueeze(1)  # (B, 1, W)
        else:
            assert prev is not None
            h = self.tok_embed(prev).unsqueeze(1)
        h = h + self.pos_embed[:, position: position + 1]
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, True, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.guided_head(h, guidance)[:, 0], new_cache
