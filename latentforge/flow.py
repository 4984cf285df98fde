"""Flow-matching math shared by the generator and RL stages: loss, ODE and SDE samplers.

Time convention (everything in this module and in ``models/generator.py``)::

    x_t = (1 - t) * noise + t * data,   t in [0, 1],   noise ~ N(0, I)

t = 0 is pure noise and t = 1 is data. The model regresses the velocity target
``data - noise`` (= dx_t/dt), whose conditional mean v(x, t) = E[data - noise | x_t = x] drives
the ODE dx/dt = v(x, t); sampling integrates it from t = 0 to t = 1. This is the SiT /
rectified-flow direction; diffusers (and the published Flow-GRPO formulas) run the other way,
with sigma = 1 - t falling from 1 to 0.

Velocity functions passed to the samplers take ``(x, t)`` with x (B, ...) and t a (B,) tensor
and return v with the shape of x; for a class-conditional model, bind the labels, e.g.
``lambda x, t: model.forward_with_cfg(x, t, y, scale)``. The samplers do not switch off
autograd: call them under ``torch.no_grad()`` unless you mean to differentiate through them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TimeSampling = Literal["uniform", "logit_normal"]
Sampler = Literal["euler", "heun"]
TIME_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun")
# Edges of the time buckets whose loss shares flow_matching_loss reports.
LOSS_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like`` (B, ...)."""
    return t.view(-1, *([1] * (like.ndim - 1)))


def _time_tensor(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float or 0-d / (B,) tensor time -> (B,) tensor on x's device, in x's dtype."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


# --------------------------------------------------------------------------- training


def sample_times(
    n: int,
    kind: Literal["uniform", "logit_normal"] = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    *,
    loc: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """(n,) training times in [0, 1]: uniform, or sigmoid(N(loc, scale^2)) (SD3's logit-normal,
    which spends more of the batch on mid-path times where the velocity is hardest)."""
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(loc + scale * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"time sampling must be one of {TIME_SAMPLINGS}, got {kind!r}")


def flow_matching_loss(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    labels: torch.Tensor,
    *,
    class_dropout: float,
    time_sampling: Literal["uniform", "logit_normal"],
    null_class: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Velocity-regression loss on a batch of latents data (B, K, D) with labels (B,).

    Noise, times and the label dropout come from the global torch RNG: the training harness
    seeds it before every step, so a resumed run draws the same values. Each label is
    replaced by ``null_class`` with probability ``class_dropout`` (trains the unconditional
    branch of classifier-free guidance). ``model(x_t, t, y)`` is called exactly once, as DDP
    requires.

    Returns the scalar mean squared error and detached metrics: ``class_dropped`` (fraction
    of null labels) and ``loss_share_t<lo>_<hi>``, the part of the loss from samples with t
    in that quarter of [0, 1]. The shares sum to the loss and stay finite when a bucket is
    empty, so the harness may average them over steps and ranks; each is the bucket's mean
    loss times its (fixed) frequency under ``time_sampling``, so trends read the same.
    """
    if not 0.0 <= class_dropout <= 1.0:
        raise ValueError(f"class_dropout must be in [0, 1], got {class_dropout}")
    b = data.shape[0]
    noise = torch.randn_like(data)  # (B, K, D)
    t = sample_times(b, time_sampling, device=data.device)  # (B,)
    drop = torch.rand(b, device=data.device) < class_dropout  # (B,)
    y = torch.where(drop, torch.full_like(labels, null_class), labels)

    t_b = _per_sample(t, data).to(data.dtype)
    x_t = (1 - t_b) * noise + t_b * data
    target = data - noise
    v = model(x_t, t, y)
    # float32 even under bf16 autocast: the squared error of small residuals underflows.
    per_sample = (v.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    loss = per_sample.mean()

    metrics = {"class_dropped": drop.float().mean()}
    with torch.no_grad():
        for lo, hi in zip(LOSS_BUCKETS[:-1], LOSS_BUCKETS[1:], strict=True):
            upper = t <= hi if hi == LOSS_BUCKETS[-1] else t < hi
            in_bucket = (t >= lo) & upper
            key = f"loss_share_t{round(100 * lo)}_{round(100 * hi)}"
            metrics[key] = (per_sample * in_bucket).sum() / b
    return loss, metrics


# ------------------------------------------------------------------------- ODE sampling


def ode_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    sampler: Literal["euler", "heun"] = "euler",
) -> tuple[torch.Tensor, int]:
    """Integrate dx/dt = v(x, t) from noise (B, ...) at t = 0 to t = 1 on a uniform grid.

    Returns (x at t = 1, number of velocity evaluations). Euler costs ``steps`` evaluations.
    Heun (2nd order, trapezoid) corrects every step but the last, costing ``2 * steps - 1``:
    its correction would evaluate the model at t = 1, where it is rarely trained (logit-normal
    times put almost no mass there); EDM's and SiT's Heun samplers skip it the same way.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    x = noise
    dt = 1.0 / steps
    nfe = 0
    for i in range(steps):
        # Grid points from the integer index: accumulating dt would drift off 1.0.
        t, t_next = _time_tensor(i / steps, x), _time_tensor((i + 1) / steps, x)
        v = velocity_fn(x, t)
        nfe += 1
        x_euler = x + dt * v
        if sampler == "heun" and i < steps - 1:
            v_next = velocity_fn(x_euler, t_next)
            nfe += 1
            x = x + 0.5 * dt * (v + v_next)
        else:
            x = x_euler
    return x, nfe


# ------------------------------------------------------------------------ sample seeding


def balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """(num_classes * per_class,) long labels in class-major order: 0, 0, ..., 1, 1, ..."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def _sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed from (seed, index) by splitmix64 mixing: nearby pairs such as (0, 1) and
    (1, 0) give unrelated generators, unlike seed * M + index schemes."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & mask
    for _ in range(2):
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
    return z >> 1


def sample_noise(
    n_or_indices: int | Sequence[int] | torch.Tensor,
    shape: Sequence[int],
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, *shape) standard normal noise where row i depends only on (seed, index i).

    An int n means indices 0 .. n-1. Every sample has its own CPU generator, so the noise of
    sample i is the same whatever the batch it lands in, the number of workers or the device
    (drawn on the CPU, then moved), which makes evaluation samples comparable across runs.
    """
    if isinstance(n_or_indices, int):
        indices: list[int] = list(range(n_or_indices))
    elif isinstance(n_or_indices, torch.Tensor):
        indices = [int(i) for i in n_or_indices.flatten().tolist()]
    else:
        indices = [int(i) for i in n_or_indices]
    gen = torch.Generator()
    rows = []
    for index in indices:
        gen.manual_seed(_sample_seed(seed, index))
        rows.append(torch.randn(tuple(shape), generator=gen, dtype=dtype))
    out = torch.stack(rows) if rows else torch.empty((0, *shape), dtype=dtype)
    return out.to(device) if device is not None else out


# ------------------------------------------------------------------ SDE sampling (Flow-GRPO)
#
# Derivation for x_t = (1 - t) eps + t x1 (Flow-GRPO publishes it for sigma = 1 - t).
#
# Score from velocity. Given x1, x_t ~ N(t x1, (1 - t)^2 I), so (Tweedie)
#     score(x, t) = grad log p_t(x) = -(x - t E[x1 | x]) / (1 - t)^2.
# With x1_hat = E[x1 | x], eps_hat = E[eps | x]: x = (1 - t) eps_hat + t x1_hat and
# v = x1_hat - eps_hat, hence x1_hat = x + (1 - t) v, eps_hat = x - t v, and
#     score(x, t) = -eps_hat / (1 - t) = (t v - x) / (1 - t).
#
# SDE with the ODE's marginals. For any diffusion g(t) >= 0, forward in t,
#     dx = [v + g^2 / 2 * score] dt + g dW
# has the Fokker-Planck equation of the ODE dx = v dt (the added g^2/2 score drift cancels the
# diffusion's g^2/2 Laplacian term), so p_t is the same for every t.
#
# Diffusion coefficient. Flow-GRPO takes sigma_s = a sqrt(sigma / (1 - sigma)) per unit of
# sigma; with sigma = 1 - t this is g(t)^2 = a^2 (1 - t) / t. The (1 - t) cancels the score's
# denominator, leaving a drift that is finite at t = 1:
#     drift(x, t) = v + a^2 / (2 t) * (t v - x)        (= v (1 + a^2/2) - a^2 x / (2 t))
# (check: mapping sigma = 1 - t, v_diffusers = -v, d sigma = -dt into Flow-GRPO's
# x + [v_d + sigma_s^2 / (2 sigma) (x + (1 - sigma) v_d)] d sigma gives exactly this).
#
# Euler-Maruyama step from t to t + dt, a Gaussian policy N(mean, std^2 I):
#     mean = x + drift(x, t) dt,    std = a sqrt((1 - t) / t * dt).
#
# Endpoints. At t = 0 both g^2 and the drift's a^2 x / (2t) blow up (the score, -x, is finite:
# the path is pure noise there). The step evaluates 1/t at max(t, dt), i.e. the first step
# from t = 0 uses the diffusion of the next grid point, g^2 = a^2 / dt: mean = (1 - a^2/2) x
# + v dt, std = a. This is Flow-GRPO's own guard (sigma_max = sigmas[1] at sigma = 1), it
# keeps every step stochastic (every step is a policy step for RL), and since the score is
# exact for any g, clamping g changes only the discretisation, not the marginals. At t -> 1
# g -> 0 and the drift is finite, so the last step needs no guard; its std a dt / sqrt(1 - dt)
# is the last noise the rollout adds. Starting the SDE at some t_min > 0 would not remove the
# error of the early steps either: with g^2 ~ a^2 / t the k-th step is a Langevin step of size
# ~a^2 / k at any dt. Measured on the Gaussian data of tests/test_flow.py with a = 0.7, the
# final std is off by ~6% at 10 steps and <1% at 100 (Euler ODE: 18% and 2%).
#
# Flow-GRPO's units. This module sums a step's log-probability and KL over the latent's n
# dimensions (n = K x token_dim; a sum is the density of the whole latent) and uses the step's
# true std sigma_t sqrt(dt), sigma_t = a sqrt((1 - t) / t). Flow-GRPO's reference code instead
# averages the log-probability over the dimensions, and its KL term is
# mean_d (mean - mean_ref)^2 / (2 sigma_t^2), without the dt. Hence
#     log ratio (Flow-GRPO) = log ratio (sum) / n
#     KL (Flow-GRPO)        = KL (sum) * dt / n
# (``per_dimension_log_ratio``, ``flow_grpo_kl``). Consequences for its hyper-parameters:
# - the clip range eps bounds the per-dimension ratio, i.e. the summed log-ratio at about
#   n eps: 1e-4 (the paper's, for SD3's n = 16 x 64 x 64 = 65536) is 6.6 nats there but only
#   0.0128 nats for this project's default n = 128;
# - the policy term carries the same 1/n as the KL term, so against it beta weights the
#   summed, true-variance step KL by beta dt: the paper's beta = 0.04 at dt = 0.1 is 0.004
#   (a weight of 0.1 on the summed KL is ~25x the paper's beta);
# - with Adam the common 1/n of both terms does not change the step, only what grad
#   clipping sees.


class SDEStep(NamedTuple):
    """One stochastic step: the next state and its Gaussian policy N(mean, std^2 I)."""

    prev_sample: torch.Tensor
    """(B, ...) state at t + dt (diffusers' name for a sampler step's output)."""
    log_prob: torch.Tensor
    """(B,) log N(prev_sample; mean, std^2 I), summed over all non-batch dimensions."""
    mean: torch.Tensor
    """(B, ...) mean of the step, x + drift dt; carries gradients through the velocity."""
    std: torch.Tensor
    """(B, 1, ..., 1) standard deviation of the step, independent of the model."""


class SDETransition(NamedTuple):
    """What an RL update needs from one rollout step; the step size is 1 / steps."""

    x_t: torch.Tensor
    """(B, ...) state at time t."""
    t: torch.Tensor
    """(B,) time of the step's start."""
    x_next: torch.Tensor
    """(B, ...) sampled state at t + dt."""
    log_prob: torch.Tensor
    """(B,) log-probability of x_next under the rollout policy."""


def sde_std(t: torch.Tensor, dt: float, noise_level: float, like: torch.Tensor) -> torch.Tensor:
    """(B,) times -> (B, 1, ..., 1) step std a sqrt((1 - t) / max(t, dt) * dt)."""
    t_safe = t.clamp_min(dt)
    return _per_sample(noise_level * torch.sqrt((1 - t) / t_safe * dt), like)


def sde_step(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    t: float | torch.Tensor,
    dt: float,
    noise_level: float,
    generator: torch.Generator | None = None,
    prev_sample: torch.Tensor | None = None,
) -> SDEStep:
    """One Euler-Maruyama step of the marginal-preserving SDE from t to t + dt.

    x: (B, ...) at time t, a float or (B,) in [0, 1); 0 < dt and t + dt <= 1; noise level a
    > 0 (Flow-GRPO uses 0.7). Samples the next state with ``generator`` (on x.device), or, when
    ``prev_sample`` is given, scores that state instead: with the velocity of updated
    parameters this is the new log-probability a PPO ratio needs. The log-probability is
    summed over all non-batch dimensions (a sum is the density of the whole latent, so ratios
    of it are the policy ratios; a per-dimension mean would need a rescaled clip range).
    """
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 (use ode_sample for a=0), got {noise_level}")
    if not 0 < dt <= 1:
        raise ValueError(f"dt must be in (0, 1], got {dt}")
    t = _time_tensor(t, x)  # (B,)
    v = velocity_fn(x, t)  # (B, ...)
    t_b = _per_sample(t, x)
    # a^2 / (2 t) * (t v - x) is g^2/2 * score with the (1 - t) cancelled; see the derivation.
    drift = v + noise_level**2 / (2 * t_b.clamp_min(dt)) * (t_b * v - x)
    mean = x + drift * dt
    std = sde_std(t, dt, noise_level, x)
    if prev_sample is None:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        prev_sample = mean + std * eps
    # In float32: bf16 residuals divided by a small std lose the log-prob's precision.
    z = (prev_sample.detach().float() - mean.float()) / std.float()
    log_prob = -0.5 * z.pow(2) - torch.log(std.float()) - 0.5 * math.log(2 * math.pi)
    return SDEStep(prev_sample, log_prob.flatten(1).sum(1), mean, std)


def sde_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    noise_level: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[SDETransition]]:
    """Roll out the SDE from noise (B, ...) at t = 0 to t = 1 in ``steps`` uniform steps.

    Returns (final state (B, ...), one :class:`SDETransition` per step). Every step is
    stochastic (see the endpoint notes above), so the trajectory is a chain of ``steps``
    Gaussian policy steps with step size 1 / steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = noise
    dt = 1.0 / steps
    trajectory = []
    for i in range(steps):
        t = _time_tensor(i / steps, x)
        step = sde_step(velocity_fn, x, t, dt, noise_level, generator=generator)
        trajectory.append(SDETransition(x, t, step.prev_sample, step.log_prob))
        x = step.prev_sample
    return x, trajectory


def per_dimension_log_ratio(log_ratio: torch.Tensor, dims: int) -> torch.Tensor:
    """A log-ratio of summed step log-probabilities in Flow-GRPO's per-dimension units."""
    return log_ratio / dims


def flow_grpo_kl(kl: torch.Tensor, dims: int, dt: float) -> torch.Tensor:
    """A summed, true-variance step KL (:func:`gaussian_kl_equal_std` with :attr:`SDEStep.std`)
    in Flow-GRPO's units: mean over dimensions of (mean - mean_ref)^2 / (2 sigma_t^2), where
    sigma_t^2 = std^2 / dt is the diffusion per unit time (see "Flow-GRPO's units" above)."""
    return kl * dt / dims


def gaussian_kl_equal_std(
    mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor | float
) -> torch.Tensor:
    """KL(N(mean_a, std^2 I) || N(mean_b, std^2 I)) = ||mean_a - mean_b||^2 / (2 std^2): (B,).

    Means (B, ...); std a float or broadcastable (e.g. :attr:`SDEStep.std`, (B, 1, ..., 1)).
    Summed over the non-batch dimensions, like the step log-probabilities.
    """
    diff = mean_a.float() - mean_b.float()
    std_t = torch.as_tensor(std, device=diff.device, dtype=torch.float32)
    return (diff.pow(2) / (2 * std_t.pow(2))).flatten(1).sum(1)
