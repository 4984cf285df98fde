"""Objectives, samplers and log-probabilities of generators over discrete codes.

The models are ``models/token_generator.py``'s ``TokenTransformer`` (kinds maskgit and ar);
codes are (B, K) long in [0, V). What this module fixes:

- **MaskGIT training** (Chang et al. 2022): per sample r ~ U(0, 1) and ceil(cos(pi r / 2) K)
  random positions are masked (at least one); cross-entropy on the masked positions only.
- **MaskGIT sampling**: start fully masked; at step s of S predict every masked code, draw it
  from softmax(guided logits / temperature) and keep the most confident draws so that
  floor(cos(pi/2 (s+1)/S) K) positions stay masked (at least one position is decided per
  step). Confidence is the draw's log-probability plus Gumbel noise scaled by
  ``choice_temperature * (1 - (s+1)/S)`` (annealed to 0, as MaskGIT does); decided codes never
  change again.
- **AR sampling** (LlamaGen): one position at a time against the key/value cache, from
  softmax(guided logits / temperature), optionally restricted to the top-k codes and the
  top-p probability mass.
- **Guidance** mixes logits: uncond + s (cond - uncond) (``guided_logits``); s = 1 is the plain
  conditional model in one pass. The mix is taken on the output head's inputs (the head is
  affine, so it equals the mix of logits up to rounding): the head runs on N rows, not 2N.
- **Randomness per sample**: every draw of sample i comes from its own generator seeded by
  (seed, i) (``SampleNoise``; the flow sampler's ``flow.sample_noise`` does the same), so a
  sample does not depend on its batch, the number of workers or the device.
- **Log-probabilities for RL** (GRPO over tokens): a rollout records each code's
  log-probability under the state it was decided in (maskgit: the partly unmasked sequence of
  its step; ar: the prefix), under the policy distribution softmax(guided logits /
  temperature) without top-k/top-p (a truncated distribution would make ratios of codes
  outside the support undefined). ``token_log_probs`` recomputes them with gradients from the
  recorded states, and returns each code's full distribution for the KL to a reference model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from latentforge.flow import _sample_seed
from latentforge.models.layers import matmuls_compile_per_shape
from latentforge.models.token_generator import TokenTransformer

# Uniform draws are kept inside (0, 1) so that the Gumbel transform -log(-log u) stays finite.
UNIFORM_EPS = 1e-10
# Where oneDNN runs the matmuls (models/layers.py: matmuls_compile_per_shape), maskgit
# training pads the masked rows to a multiple of this before the output head: the masked
# count changes every step, and oneDNN compiles a kernel per new matmul shape (~11 ms at bf16
# on AMX). A multiple of 64 leaves 16 shapes at the default batch of 64 x 16 codes (64 to
# 1024 masked).
HEAD_ROW_MULTIPLE = 64


def mask_ratio(r: torch.Tensor | float) -> torch.Tensor:
    """MaskGIT's cosine schedule gamma(r) = cos(pi r / 2): the fraction still masked at r."""
    return torch.cos(math.pi / 2 * torch.as_tensor(r, dtype=torch.float64))


def masked_after(step: int, steps: int, num_tokens: int) -> int:
    """Positions still masked after decode step `step` (0-based) of `steps`."""
    return int(math.floor(float(mask_ratio((step + 1) / steps)) * num_tokens + 1e-9))


def drop_labels(labels: torch.Tensor, class_dropout: float, null_class: int) -> torch.Tensor:
    """Replace each label by `null_class` with probability `class_dropout` (trains CFG)."""
    if not 0.0 <= class_dropout <= 1.0:
        raise ValueError(f"class_dropout must be in [0, 1], got {class_dropout}")
    drop = torch.rand(labels.shape, device=labels.device) < class_dropout
    return torch.where(drop, torch.full_like(labels, null_class), labels)


# --------------------------------------------------------------------------------------------
# Training objectives
# --------------------------------------------------------------------------------------------


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Label-smoothed cross-entropy whose backward is one pass over the logits: the gradient
    is (softmax - (1 - eps) onehot(target) - eps / V) / N (softmax recomputed from the saved
    logits: one fused kernel, faster on CPU than exp of the log-probabilities). Rows of the
    logits past the N targets are padding: no loss, zero gradient."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor,
                label_smoothing: float) -> torch.Tensor:
        logp = F.log_softmax(logits[: targets.shape[0]], dim=-1)
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = nll.mean() if label_smoothing == 0.0 else (
            (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)).mean()
        ctx.save_for_backward(logits, targets)
        ctx.label_smoothing = label_smoothing
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, targets = ctx.saved_tensors
        n, v = targets.shape[0], logits.shape[1]
        eps, scale = ctx.label_smoothing, grad_loss / n
        grad = logits.softmax(-1)  # padding rows too: one kernel, then zeroed
        grad[:n].sub_(eps / v).mul_(scale)
        grad[n:].zero_()
        hit = (-(1.0 - eps) * scale).to(grad.dtype).expand(n, 1)
        grad[:n].scatter_add_(-1, targets.unsqueeze(-1), hit)
        return grad, None, None


def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                           label_smoothing: float, padded: bool = False) -> torch.Tensor:
    """F.cross_entropy(logits, targets, label_smoothing=eps) for logits (N, V), targets (N,):
    the mean of (1 - eps) * -log p(target) + eps * mean over classes of -log p. `padded`:
    the logits may carry padding rows after the first N (``maskgit_loss`` pads them), which
    take no part in the loss and get a zero gradient; without it the row counts must match.

    Written out because torch's CPU label smoothing costs ~5x its plain cross-entropy (fwd+bwd
    over 680 x 1000 fp32 logits alone, 1 thread, Zen 5: 4.7 ms, against 0.6 ms without
    smoothing); with its one-pass backward this one takes 0.9 ms there (the same written as
    autograd ops: 1.4 ms). Inside a tiny maskgit step the gain measured smaller (a few per
    cent, within the step's noise).
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    rows_ok = (targets.shape[0] <= logits.shape[0] if padded
               else targets.shape[0] == logits.shape[0])
    if logits.dim() != 2 or targets.dim() != 1 or not rows_ok:
        raise ValueError(f"logits (N, V) and targets (N,) expected"
                         f"{' (logits may carry padding rows after the N)' if padded else ''}, "
                         f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
    return _SmoothedCrossEntropy.apply(logits, targets, float(label_smoothing))


def top1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows of logits (N, V) whose target holds the largest logit (a tie counts
    as a hit). A max and a gather: CPU argmax over 1000 classes is ~10x slower than max."""
    with torch.no_grad():
        hit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) >= logits.amax(-1)
        return hit.float().mean()


def random_mask(codes: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: ceil(gamma(r) K) random positions per row, r ~ U(0, 1), at least one."""
    b, k = codes.shape
    r = torch.rand(b, device=codes.device)
    n_mask = torch.ceil(mask_ratio(r).to(codes.device) * k).long().clamp(1, k)  # (B,)
    ranks = torch.rand(b, k, device=codes.device).argsort(1).argsort(1)  # random rank per slot
    return ranks < n_mask.unsqueeze(1)


def maskgit_loss(model: torch.nn.Module, codes: torch.Tensor, labels: torch.Tensor, *,
                 class_dropout: float, label_smoothing: float, null_class: int,
                 mask_code: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy on the masked positions of codes (B, K); randomness from the global RNG
    (the training harness seeds it per step, so a resumed run draws the same masks)."""
    masked = random_mask(codes)  # (B, K)
    inputs = torch.where(masked, torch.full_like(codes, mask_code), codes)
    # Logits of the masked positions only (N, V): the head skips the others. Where oneDNN
    # runs the head, N is padded to a multiple of HEAD_ROW_MULTIPLE (repeats of position 0,
    # which the loss ignores): a few shapes per run.
    rows = masked.flatten().nonzero().squeeze(1)  # (N,) indices b K + k
    targets = codes.flatten()[rows]
    if matmuls_compile_per_shape(codes.device):
        rows = F.pad(rows, (0, -rows.shape[0] % HEAD_ROW_MULTIPLE))
    logits = model(inputs, drop_labels(labels, class_dropout, null_class), rows=rows).float()
    loss = smoothed_cross_entropy(logits, targets, label_smoothing, padded=True)
    accuracy = top1_accuracy(logits[: targets.shape[0]], targets)
    return loss, {"masked_fraction": masked.float().mean(), "masked_accuracy": accuracy}


def ar_loss(model: torch.nn.Module, codes: torch.Tensor, labels: torch.Tensor, *,
            class_dropout: float, label_smoothing: float, null_class: int
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-code cross-entropy over all K positions of codes (B, K)."""
    logits = model(codes, drop_labels(labels, class_dropout, null_class)).float()  # (B, K, V)
    loss = smoothed_cross_entropy(logits.flatten(0, 1), codes.flatten(), label_smoothing)
    accuracy = top1_accuracy(logits.flatten(0, 1), codes.flatten())
    return loss, {"next_code_accuracy": accuracy}


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


class SampleNoise:
    """Per-sample uniform draws: row i comes from a CPU generator seeded by (seed, index i)."""

    def __init__(self, indices: Sequence[int] | torch.Tensor, seed: int,
                 device: torch.device | str = "cpu") -> None:
        index_list = [int(i) for i in torch.as_tensor(indices).flatten().tolist()]
        self.generators = [torch.Generator().manual_seed(_sample_seed(seed, i))
                           for i in index_list]
        self.device = device

    def uniform(self, *shape: int) -> torch.Tensor:
        """(N, *shape) uniform draws in (0, 1), on the device."""
        rows = [torch.rand(shape, generator=g) for g in self.generators]
        out = torch.stack(rows) if rows else torch.empty((0, *shape))
        return out.clamp(UNIFORM_EPS, 1 - UNIFORM_EPS).to(self.device)


@functools.lru_cache(maxsize=64)
def cdf_block_size(v: int) -> int:
    """Codes per block of `categorical`'s two-level CDF over V codes: the divisor of V nearest
    sqrt(V) within a factor of 2 of it, else ceil(sqrt(V)) with the last block padded. Padding
    copies the whole (..., V) tensor (at V = 1000 and a block of 31, a quarter of the draw's
    time); fsq and binary vocabularies have such divisors (1000 = 25 x 40, 2^n), a vq
    `codebook_size` may not (a prime pads). Divisors are compared in integers: d and V / d are
    equally far from sqrt(V), and the larger of the two says how far, so the key is that one,
    then d (the smaller of a pair wins; float logs would make the tie one ulp's choice)."""
    root = math.sqrt(v)
    divisors = [d for d in range(max(1, math.ceil(root / 2)), math.floor(2 * root) + 1)
                if v % d == 0]
    if divisors:
        return min(divisors, key=lambda d: (max(d, v // d), d))
    return max(1, math.ceil(root))


def categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draws from the distributions probs (..., V) by inverting their CDFs at u (...,) in
    (0, 1): one uniform per draw rather than V Gumbels (at V = 1000 the Gumbel-max draws
    cost more than the model). Codes of probability 0 are never drawn.

    The CDF is inverted in two levels, over blocks of ~sqrt(V) codes and then within the
    block the draw falls in: CPU cumsum is a sequential scan, and two short ones cost a third
    of one over V (256 x 10 x 1000 probabilities, 1 thread: 0.6 vs 2.0 ms, 4% of maskgit's
    sampling). The same draws as one CDF up to the rounding of the partial sums.
    """
    v = probs.shape[-1]
    size = cdf_block_size(v)
    count = -(-v // size)
    padded = F.pad(probs, (0, count * size - v)) if count * size != v else probs
    blocks = padded.unflatten(-1, (count, size))  # (..., count, size)
    sums = blocks.sum(-1)
    block_cdf = sums.cumsum(-1)  # (..., count)
    total = block_cdf[..., -1:]
    # u < 1, but u * total may round to total: clamp, so the last block with mass is found.
    target = torch.minimum(u.unsqueeze(-1) * total, total)  # (..., 1)
    block = torch.searchsorted(block_cdf, target).clamp_max(count - 1)  # (..., 1)
    inner = blocks.gather(-2, block.unsqueeze(-1).expand(*block.shape, size)).squeeze(-2)
    inner_cdf = inner.cumsum(-1)  # (..., size)
    # The mass left inside the block, kept in (0, its total]: a code of probability 0 at the
    # block's start (cdf 0) or past its last mass (cdf = total) is never reached.
    rest = target - (block_cdf.gather(-1, block) - sums.gather(-1, block))
    tiny = torch.finfo(probs.dtype).tiny
    rest = torch.minimum(rest.clamp_min(tiny), inner_cdf[..., -1:])
    within = torch.searchsorted(inner_cdf, rest).clamp_max(size - 1)
    return (block * size + within).squeeze(-1).clamp_max(v - 1)


def guided_logits(model: TokenTransformer, codes: torch.Tensor, y: torch.Tensor,
                  cfg_scale: float, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guided logits (B, K, V) (or (B, M, V) at `positions` (B, M)):
    uncond + cfg_scale (cond - uncond); scale 1 is one conditional pass. Conditional and
    unconditional halves run as one batch of 2B."""
    if cfg_scale == 1.0:
        return model(codes, y, positions)
    null = torch.full_like(y, model.null_class)
    both = None if positions is None else torch.cat([positions, positions])
    # The mix happens before the (affine) output head: the same logits, half the head's work.
    return model(torch.cat([codes, codes]), torch.cat([y, null]), both, guidance=cfg_scale)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (..., V) with codes outside the top-k and outside the smallest set holding top_p
    of the probability set to -inf (0 and 1.0 switch a filter off; the best code always stays)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a code when the mass before it already reaches top_p (so the first stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@dataclass
class TokenRollout:
    """Sampled codes and, for RL, the states they were decided in; S = decode steps."""

    labels: torch.Tensor
    """(N,) requested classes."""
    codes: torch.Tensor
    """(N, K) final codes."""
    log_prob: torch.Tensor
    """(N, K) each code's log-probability under the state it was decided in."""
    states: torch.Tensor | None = None
    """maskgit: (N, S, K) input codes at the start of each step (mask_code where masked)."""
    decided: torch.Tensor | None = None
    """maskgit: (N, S, K) bool, the positions each step decided (each position exactly once)."""

    def select(self, rows: torch.Tensor) -> TokenRollout:
        """The rollouts `rows` (a minibatch)."""
        return TokenRollout(self.labels[rows], self.codes[rows], self.log_prob[rows],
                            None if self.states is None else self.states[rows],
                            None if self.decided is None else self.decided[rows])


@torch.no_grad()
def maskgit_sample(model: TokenTransformer, labels: torch.Tensor, noise: SampleNoise, *,
                   steps: int, cfg_scale: float, temperature: float = 1.0,
                   choice_temperature: float = 4.5) -> TokenRollout:
    """MaskGIT's confidence-based parallel decoding of labels (N,) in `steps` steps."""
    k = model.cfg.num_tokens
    if not 1 <= steps <= k:
        raise ValueError(f"maskgit sampling needs 1 <= steps <= K = {k}, got {steps}")
    n = len(labels)
    codes = torch.full((n, k), model.mask_code, dtype=torch.long, device=labels.device)
    masked = torch.ones(n, k, dtype=torch.bool, device=labels.device)
    log_prob = torch.zeros(n, k, device=labels.device)
    states, decided = [], []
    # Every step's draws at once, one call per row rather than 2 x steps (each row's
    # generator yields them in the same order: step s's code draws, then its Gumbels).
    draws_u = noise.uniform(steps, 2, k)  # (N, steps, 2, K)
    gumbels = -torch.log(-torch.log(draws_u[:, :, 1]))  # (N, steps, K)
    for s in range(steps):
        # Only the M still-masked positions (the same count in every row) are predicted.
        positions = masked.nonzero()[:, 1].view(n, -1)  # (N, M)
        logits = guided_logits(model, codes, labels, cfg_scale, positions).float()  # (N, M, V)
        probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
        u = draws_u[:, s, 0].gather(1, positions)  # each position's own draw, (N, M)
        picked = categorical(probs, u)  # (N, M)
        picked_logp = probs.gather(-1, picked.unsqueeze(-1)).squeeze(-1).log()
        draws = codes.scatter(1, positions, picked)  # (N, K); decided positions keep theirs
        draw_logp = torch.zeros(n, k, device=labels.device).scatter(1, positions, picked_logp)
        still = positions.shape[1]
        keep_masked = min(masked_after(s, steps, k), still - 1) if s < steps - 1 else 0
        anneal = choice_temperature * (1.0 - (s + 1) / steps)
        confidence = draw_logp + anneal * gumbels[:, s]
        confidence = torch.where(masked, confidence, torch.inf)  # decided codes stay
        remask = confidence.argsort(1).argsort(1) < keep_masked  # the least confident
        newly = masked & ~remask
        states.append(codes.clone())
        decided.append(newly)
        codes = torch.where(newly, draws, codes)
        log_prob = torch.where(newly, draw_logp, log_prob)
        masked = remask
    return TokenRollout(labels, codes, log_prob, torch.stack(states, 1), torch.stack(decided, 1))


@torch.no_grad()
def ar_sample(model: TokenTransformer, labels: torch.Tensor, noise: SampleNoise, *,
              cfg_scale: float, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0) -> TokenRollout:
    """Autoregressive sampling of labels (N,) with the key/value cache; K model steps."""
    k = model.cfg.num_tokens
    guided = cfg_scale != 1.0
    y = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    codes, log_prob = [], []
    cache, prev = None, None
    for i in range(k):
        logits, cache = model.decode_step(prev, y, i, cache,
                                          guidance=cfg_scale if guided else None)  # (N, V)
        logits = logits.float() / temperature
        filtered = torch.softmax(filter_logits(logits, top_k, top_p), -1)
        draw = categorical(filtered, noise.uniform(1)[:, 0])  # (N,)
        log_prob.append(torch.log_softmax(logits, -1).gather(-1, draw.unsqueeze(-1))[:, 0])
        codes.append(draw)
        prev = torch.cat([draw, draw]) if guided else draw
    return TokenRollout(labels, torch.stack(codes, 1), torch.stack(log_prob, 1))


def token_log_probs(model: TokenTransformer, ro: TokenRollout, *, cfg_scale: float,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute, with gradients, each code's log-probability (N, K) under the state it was
    decided in, and that state's full log-distribution (N, K, V) (for KLs between models)."""
    if ro.states is None:  # ar: one teacher-forced pass gives every prefix's distribution
        logp = torch.log_softmax(guided_logits(model, ro.codes, ro.labels, cfg_scale).float()
                                 / temperature, dim=-1)  # (N, K, V)
    else:  # maskgit: every step's state as one batch, then each position from its own step
        assert ro.decided is not None
        n, s, k = ro.states.shape
        logits = guided_logits(model, ro.states.reshape(n * s, k),
                               ro.labels.repeat_interleave(s), cfg_scale)
        logp_steps = torch.log_softmax(logits.float() / temperature, -1).view(n, s, k, -1)
        logp = (logp_steps * ro.decided.unsqueeze(-1)).sum(1)  # (N, K, V): one step each
    return logp.gather(-1, ro.codes.unsqueeze(-1)).squeeze(-1), logp


# --------------------------------------------------------------------------------------------
# GRPO over tokens
# --------------------------------------------------------------------------------------------

# Bound on |log new/old probability ratio| before exponentiating (as the flow objective's).
MAX_LOG_RATIO = 20.0


def token_grpo_loss(policy: TokenTransformer, reference: TokenTransformer, ro: TokenRollout,
                    advantages: torch.Tensor, valid: torch.Tensor, *, cfg_scale: float,
                    temperature: float, clip_range: float, kl_beta: float
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO on the sampled codes: each code is an action with its own PPO-clipped ratio of new
    to rollout probability under the state it was decided in (the sample's advantage for all
    its codes, averaged over codes), plus kl_beta times the exact KL(policy || reference) of
    the codes' distributions from the same states (mean over codes).

    advantages (N,) float, valid (N,) bool: the policy term averages over valid samples only,
    the KL term over all of them (the flow objective's convention, ``tasks/rl.py``).
    """
    new_lp, new_logp = token_log_probs(policy, ro, cfg_scale=cfg_scale, temperature=temperature)
    with torch.no_grad():
        _, ref_logp = token_log_probs(reference, ro, cfg_scale=cfg_scale,
                                      temperature=temperature)
    log_ratio = new_lp - ro.log_prob  # (N, K)
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    adv = advantages.unsqueeze(1)  # (N, 1)
    per_sample = torch.maximum(-adv * ratio, -adv * clipped).mean(1)  # (N,)
    weight = valid.float()
    n_valid = weight.sum().clamp_min(1.0)
    policy_loss = torch.where(valid, per_sample, 0.0).sum() / n_valid
    kl = (new_logp.exp() * (new_logp - ref_logp)).sum(-1).mean(1)  # (N,)
    loss = policy_loss + kl_beta * kl.mean()
    with torch.no_grad():
        code_weight = weight.unsqueeze(1).expand_as(ratio)
        n_codes = code_weight.sum().clamp_min(1.0)
        stats = {"policy_loss": policy_loss.detach(), "kl": kl.mean().detach(),
                 "clip_fraction": (((ratio - 1).abs() > clip_range).float() * code_weight).sum()
                 / n_codes,
                 "approx_kl": (0.5 * log_ratio.pow(2) * code_weight).sum() / n_codes,
                 "ratio_mean": (ratio * code_weight).sum() / n_codes,
                 "ratio_max": ratio.max(), "ratio_min": ratio.min(),
                 "log_ratio_min": log_ratio.min(), "log_ratio_max": log_ratio.max()}
    return loss, stats
