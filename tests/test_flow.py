"""Flow-matching math against a Gaussian case whose velocity, transport map and irreducible
loss are known in closed form.

Data x1 ~ N(m, s^2) independently per entry, noise eps ~ N(0, 1), x_t = (1 - t) eps + t x1:
x_t ~ N(t m, var_t) with var_t = (1 - t)^2 + t^2 s^2, and the target u = x1 - eps has mean m,
variance 1 + s^2 and Cov(u, x_t) = t s^2 - (1 - t). Gaussian conditioning gives

    v(x, t) = E[u | x_t = x] = m + (t s^2 - (1 - t)) / var_t * (x - t m),
    Var(u | x_t) = 1 + s^2 - (t s^2 - (1 - t))^2 / var_t = s^2 / var_t,

the latter being the loss no model can go below. In one dimension the ODE flow is monotone,
so it maps eps to exactly m + s * eps: the samplers are checked sample by sample.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Literal

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from latentforge.flow import (
    SDEStep,
    balanced_labels,
    flow_matching_loss,
    gaussian_kl_equal_std,
    ode_sample,
    sample_noise,
    sample_times,
    sde_sample,
    sde_std,
    sde_step,
)

M = torch.tensor([[1.5, -0.5], [0.0, 2.0]])  # (K, D) = (2, 2) per-entry data means
S = torch.tensor([[0.5, 1.0], [2.0, 0.3]])  # per-entry data standard deviations
N = 4000


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Closed-form E[x1 - eps | x_t = x] for the Gaussian data: x (B, K, D), t (B,)."""
    t = t.view(-1, 1, 1)
    var_t = (1 - t) ** 2 + t**2 * S**2
    return M + (t * S**2 - (1 - t)) / var_t * (x - t * M)


def irreducible_loss(t: torch.Tensor) -> torch.Tensor:
    """(T,) times -> (T,) mean over entries of Var(u | x_t) = s^2 / var_t."""
    t = t.view(-1, 1, 1)
    return (S**2 / ((1 - t) ** 2 + t**2 * S**2)).flatten(1).mean(1)


def _noise(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, 2, generator=torch.Generator().manual_seed(seed))


def _data(n: int = N, seed: int = 1) -> torch.Tensor:
    return M + S * _noise(n, seed)


# ------------------------------------------------------------------------------ times


def test_sample_times() -> None:
    gen = torch.Generator().manual_seed(0)
    uniform = sample_times(20000, "uniform", generator=gen)
    assert uniform.shape == (20000,) and uniform.min() >= 0 and uniform.max() < 1
    assert abs(uniform.mean().item() - 0.5) < 0.01
    logit = sample_times(20000, "logit_normal", generator=gen)
    assert logit.min() > 0 and logit.max() < 1
    # sigmoid(N(0, 1)) is symmetric about 0.5 and more concentrated than uniform.
    assert abs(logit.mean().item() - 0.5) < 0.01 and logit.std() < uniform.std()
    torch.testing.assert_close(torch.logit(logit).std(), torch.tensor(1.0), atol=0.03, rtol=0)
    a = sample_times(5, "uniform", generator=torch.Generator().manual_seed(3))
    b = sample_times(5, "uniform", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="time sampling"):
        sample_times(3, "cosine")  # type: ignore[arg-type]


# ------------------------------------------------------------------------- ODE sampling


def test_ode_maps_noise_to_data_distribution() -> None:
    eps = _noise()
    exact = M + S * eps  # the ODE's transport map for this data
    euler, nfe_euler = ode_sample(exact_velocity, eps, 200, "euler")
    heun, nfe_heun = ode_sample(exact_velocity, eps, 20, "heun")
    assert (nfe_euler, nfe_heun) == (200, 39)
    for x in (euler, heun):
        assert (x - exact).pow(2).mean().sqrt() < 0.02
        # Sampling error of the statistics of 4000 draws, plus slack for the integration.
        assert ((x.mean(0) - M).abs() < 4 * S / math.sqrt(N) + 0.01).all()
        assert ((x.std(0) / S - 1).abs() < 0.05).all()


@pytest.mark.parametrize("steps", [4, 8, 16])
def test_heun_beats_euler_at_equal_steps(steps: int) -> None:
    eps = _noise(500)
    exact = M + S * eps
    euler, nfe_euler = ode_sample(exact_velocity, eps, steps, "euler")
    heun, nfe_heun = ode_sample(exact_velocity, eps, steps, "heun")
    assert nfe_euler == steps and nfe_heun == 2 * steps - 1
    err_euler = (euler - exact).pow(2).mean().sqrt()
    err_heun = (heun - exact).pow(2).mean().sqrt()
    assert err_heun < 0.5 * err_euler


def test_ode_sample_time_grid_and_single_step() -> None:
    seen: list[float] = []

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],)
        seen.append(t[0].item())
        return torch.ones_like(x)

    x, nfe = ode_sample(velocity, torch.zeros(3, 2, 2), 4, "heun")
    # Heun: predictor at t_i, corrector at t_{i+1}; the last step has no corrector.
    assert seen == [0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75] and nfe == 7
    torch.testing.assert_close(x, torch.ones(3, 2, 2))  # constant velocity integrates exactly
    _, nfe = ode_sample(velocity, torch.zeros(1, 2, 2), 1, "heun")
    assert nfe == 1
    with pytest.raises(ValueError, match="sampler"):
        ode_sample(velocity, torch.zeros(1, 2, 2), 2, "rk4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        ode_sample(velocity, torch.zeros(1, 2, 2), 0)


# ------------------------------------------------------------------------------- loss


def _expected_loss(time_sampling: str) -> float:
    """E_t[s^2 / var_t] by quadrature over the time distribution."""
    if time_sampling == "uniform":
        t = torch.linspace(0, 1, 20001, dtype=torch.float64)
        return torch.trapezoid(irreducible_loss(t).double(), t).item()
    z = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    density = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    return torch.trapezoid(irreducible_loss(torch.sigmoid(z)).double() * density, z).item()


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_exact_velocity_reaches_irreducible_loss(
    time_sampling: Literal["uniform", "logit_normal"],
) -> None:
    data, labels = _data(20000), torch.zeros(20000, dtype=torch.long)

    def loss_of(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same noise and times for both models
            return flow_matching_loss(
                model, data, labels, class_dropout=0.1, time_sampling=time_sampling, null_class=1
            )

    loss, metrics = loss_of(lambda x, t, y: exact_velocity(x, t))
    perturbed, _ = loss_of(lambda x, t, y: exact_velocity(x, t) + 0.2)
    expected = _expected_loss(time_sampling)
    assert abs(loss.item() - expected) < 0.03 * expected
    # Any other function of (x, t) adds its squared distance to v: here 0.2^2.
    assert perturbed > loss and abs((perturbed - loss).item() - 0.04) < 0.01
    shares = sum(v for k, v in metrics.items() if k.startswith("loss_share_t"))
    torch.testing.assert_close(shares, loss)


def test_loss_draws_from_global_rng_and_calls_model_once() -> None:
    data, labels = _data(64), torch.arange(64) % 3
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape, t.shape, y.shape))
        return x * t.view(-1, 1, 1)

    with torch.random.fork_rng():
        torch.manual_seed(5)
        first, _ = flow_matching_loss(
            model, data, labels, class_dropout=0.2, time_sampling="logit_normal", null_class=3
        )
        torch.manual_seed(5)
        second, _ = flow_matching_loss(
            model, data, labels, class_dropout=0.2, time_sampling="logit_normal", null_class=3
        )
    assert calls == [((64, 2, 2), (64,), (64,))] * 2
    assert torch.equal(first, second)  # a resumed step redraws the same noise


@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_class_dropout_rate(rate: float) -> None:
    n = 20000
    data, labels = torch.zeros(n, 2, 2), torch.arange(n) % 4
    seen = {}

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen["y"] = y
        return torch.zeros_like(x)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        _, metrics = flow_matching_loss(
            model, data, labels, class_dropout=rate, time_sampling="uniform", null_class=4
        )
    dropped = seen["y"] == 4
    assert abs(dropped.float().mean().item() - rate) < 0.015
    assert metrics["class_dropped"].item() == dropped.float().mean().item()
    # Kept labels are untouched.
    assert torch.equal(seen["y"][~dropped], labels[~dropped])
    with pytest.raises(ValueError, match="class_dropout"):
        flow_matching_loss(
            model, data, labels, class_dropout=1.5, time_sampling="uniform", null_class=4
        )


# ------------------------------------------------------------------------- SDE sampling


@pytest.mark.parametrize("noise_level", [0.3, 0.7])
def test_sde_marginals_match_ode(noise_level: float) -> None:
    eps = _noise()
    x, trajectory = sde_sample(
        exact_velocity, eps, 100, noise_level, generator=torch.Generator().manual_seed(1)
    )
    assert len(trajectory) == 100 and x.shape == eps.shape
    assert ((x.mean(0) - M).abs() < 4 * S / math.sqrt(N) + 0.01).all()
    assert ((x.std(0) / S - 1).abs() < 0.05).all()
    # Same marginals, different paths: the SDE does not reproduce the ODE's transport map.
    assert (x - (M + S * eps)).pow(2).mean().sqrt() > 0.1
    for i, step in enumerate(trajectory):
        assert step.t.shape == (N,) and step.t[0].item() == pytest.approx(i / 100)
        assert step.log_prob.shape == (N,) and torch.isfinite(step.log_prob).all()
    assert torch.equal(trajectory[0].x_t, eps)
    assert all(torch.equal(a.x_next, b.x_t) for a, b in pairwise(trajectory))
    assert torch.equal(trajectory[-1].x_next, x)


def test_sde_without_score_drift_misses_the_marginals() -> None:
    """The check above has teeth: the same noise without the g^2/2 score drift inflates the
    final spread far beyond its tolerance."""
    x, dt, gen = _noise(), 0.01, torch.Generator().manual_seed(1)
    for i in range(100):
        t = torch.full((N,), i * dt)
        noise = torch.randn(x.shape, generator=gen)
        x = x + exact_velocity(x, t) * dt + sde_std(t, dt, 0.7, x) * noise
    assert ((x.std(0) / S - 1).abs() > 0.3).any()


def test_sde_step_log_prob_matches_torch_normal() -> None:
    x = _noise(16)
    t = torch.linspace(0.0, 0.9, 16)  # per-sample times, including the guarded t = 0
    out = sde_step(exact_velocity, x, t, 0.1, 0.7, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, SDEStep)
    assert out.prev_sample.shape == x.shape and out.std.shape == (16, 1, 1)
    reference = Normal(out.mean, out.std).log_prob(out.prev_sample).flatten(1).sum(1)
    torch.testing.assert_close(out.log_prob, reference)
    # Rescoring the stored sample (as PPO does) reproduces the rollout's log-probability.
    again = sde_step(exact_velocity, x, t, 0.1, 0.7, prev_sample=out.prev_sample)
    assert torch.equal(again.prev_sample, out.prev_sample)
    torch.testing.assert_close(again.log_prob, out.log_prob)


def test_sde_step_coefficients() -> None:
    """Drift v + a^2/(2t) (t v - x), std a sqrt((1 - t)/t dt), with 1/t read at max(t, dt)."""
    x, a, dt = _noise(3), 0.7, 0.25
    t = torch.tensor([0.0, 0.25, 0.5])
    out = sde_step(exact_velocity, x, t, dt, a, generator=torch.Generator().manual_seed(0))
    v = exact_velocity(x, t)
    t_b, t_safe = t.view(-1, 1, 1), t.clamp_min(dt).view(-1, 1, 1)
    torch.testing.assert_close(out.mean, x + (v + a**2 / (2 * t_safe) * (t_b * v - x)) * dt)
    torch.testing.assert_close(out.std.flatten(), a * torch.sqrt((1 - t) / t.clamp_min(dt) * dt))
    # First step from pure noise: mean (1 - a^2/2) x + v dt and std a, finite.
    torch.testing.assert_close(out.mean[0], (1 - a**2 / 2) * x[0] + v[0] * dt)
    assert out.std.flatten()[0].item() == pytest.approx(a)
    # A new velocity moves the mean and so the log-probability of the stored sample.
    moved = sde_step(
        lambda x, t: exact_velocity(x, t) + 0.5, x, t, dt, a, prev_sample=out.prev_sample
    )
    assert (moved.log_prob != out.log_prob).all()
    with pytest.raises(ValueError, match="noise_level"):
        sde_step(exact_velocity, x, t, dt, 0.0)


def test_gaussian_kl_matches_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    mean_a, mean_b = torch.randn(5, 3, 4, generator=gen), torch.randn(5, 3, 4, generator=gen)
    std = torch.rand(5, 1, 1, generator=gen) + 0.1
    reference = kl_divergence(Normal(mean_a, std), Normal(mean_b, std)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl_equal_std(mean_a, mean_b, std), reference)
    scalar = kl_divergence(Normal(mean_a, 0.3), Normal(mean_b, 0.3)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl_equal_std(mean_a, mean_b, 0.3), scalar)
    assert torch.equal(gaussian_kl_equal_std(mean_a, mean_a, std), torch.zeros(5))


# ---------------------------------------------------------------------- sample seeding


def test_balanced_labels() -> None:
    labels = balanced_labels(3, 2)
    assert labels.dtype == torch.long and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(torch.bincount(balanced_labels(10, 7)), torch.full((10,), 7))


def test_sample_noise_is_independent_of_batching() -> None:
    whole = sample_noise(10, (4, 3), seed=7)
    assert whole.shape == (10, 4, 3)
    halves = torch.cat(
        [sample_noise(range(5), (4, 3), 7), sample_noise([5, 6, 7, 8, 9], (4, 3), 7)]
    )
    assert torch.equal(whole, halves)
    # Any subset, in any order (e.g. one worker's share), gives the same rows.
    assert torch.equal(sample_noise(torch.tensor([9, 2]), (4, 3), 7), whole[[9, 2]])
    assert not torch.equal(sample_noise(10, (4, 3), seed=8), whole)
    # Rows are distinct draws, and (seed, index) pairs do not alias: (0, 1) vs (1, 0).
    assert not torch.equal(whole[0], whole[1])
    assert not torch.equal(sample_noise([1], (4,), 0), sample_noise([0], (4,), 1))
    big = sample_noise(2000, (4,), seed=0)
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1) < 0.05
    assert sample_noise(0, (4, 3), 0).shape == (0, 4, 3)
