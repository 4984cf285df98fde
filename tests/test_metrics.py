"""Metrics against independent references (scipy), and the FID Inception network's plumbing.

The real Inception weights are not available here: the network tests check architecture
(parameter count, state-dict keys), loading and error reporting on randomly initialised
weights, at batch 1-2 because a 299 x 299 forward costs ~0.4 s an image on CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from numerics import assert_rounding_close
from scipy import linalg, ndimage, special
from scipy.spatial.distance import cdist, pdist

from latentforge import metrics
from latentforge.errors import DataError
from latentforge.inception import FIDInceptionV3, load_fid_inception

# torchvision's Inception-v3 has 27,161,264 parameters; minus its auxiliary head (3,326,696)
# and with a 1008-way instead of 1000-way classifier (+16,392) that is pytorch-fid's network.
FID_INCEPTION_PARAMS = 23_850_960


def _gaussian_features(n: int, f: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((f, f)) / math.sqrt(f) + np.eye(f)  # correlated, well-conditioned
    return rng.standard_normal((n, f)) @ mix + shift


def _reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------


def test_feature_statistics_match_numpy() -> None:
    x32 = torch.from_numpy(_gaussian_features(50, 6, seed=0)).float()
    x = x32.double().numpy()  # the float32 values are what the function sees
    mu, sigma = metrics.feature_statistics(x32)
    assert mu.dtype == np.float64 and mu.shape == (6,) and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.feature_statistics(x[:1])


def test_frechet_distance_matches_scipy_sqrtm_reference() -> None:
    a = _gaussian_features(400, 24, seed=1)
    b = _gaussian_features(300, 24, seed=2, shift=0.3)
    expected = _reference_fd(a, b)
    assert metrics.fd_from_features(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_identical_symmetric_and_shift() -> None:
    a = _gaussian_features(500, 32, seed=3)
    b = _gaussian_features(500, 32, seed=4)
    assert metrics.fd_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    assert metrics.fd_from_features(a, b) == pytest.approx(metrics.fd_from_features(b, a),
                                                           rel=1e-9)
    # Shifting a set leaves its covariance unchanged, so FD is exactly ||shift||^2.
    shift = np.linspace(-1.0, 2.0, 32)
    assert metrics.fd_from_features(a, a + shift) == pytest.approx(shift @ shift, rel=1e-7)


def test_frechet_distance_singular_covariance() -> None:
    # N < F: both covariances have rank <= 9 out of 64, where a general sqrtm struggles.
    a = _gaussian_features(10, 64, seed=5)
    b = _gaussian_features(10, 64, seed=6, shift=0.1)
    fd = metrics.fd_from_features(a, b)
    assert math.isfinite(fd) and fd >= 0.0
    _, sigma = metrics.feature_statistics(a)
    assert metrics.fd_from_features(a, a) < 1e-6 * np.trace(sigma)


def test_frechet_distance_rejects_mismatched_shapes() -> None:
    mu, sigma = metrics.feature_statistics(_gaussian_features(20, 4, seed=7))
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


# --------------------------------------------------------------------------------------------
# Precision / recall, diversity
# --------------------------------------------------------------------------------------------


def _reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    d_rr, d_ff, d_fr = cdist(real, real), cdist(fake, fake), cdist(fake, real)
    r_real = np.sort(d_rr, axis=1)[:, k]
    r_fake = np.sort(d_ff, axis=1)[:, k]
    precision = (d_fr <= r_real[None, :]).any(axis=1).mean()
    recall = (d_fr <= r_fake[:, None]).any(axis=0).mean()
    return float(precision), float(recall)


def test_precision_recall_identical_and_disjoint() -> None:
    real = _gaussian_features(120, 8, seed=8)
    assert metrics.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    far = _gaussian_features(100, 8, seed=9, shift=1e3)
    assert metrics.precision_recall(real, far, k=3) == (0.0, 0.0)


def test_precision_recall_subset_has_full_precision() -> None:
    real = _gaussian_features(200, 8, seed=10)
    precision, recall = metrics.precision_recall(real, real[:100], k=3)
    assert precision == 1.0
    assert recall < 1.0


def test_precision_recall_matches_brute_force_in_chunks() -> None:
    real = _gaussian_features(150, 5, seed=11)
    fake = _gaussian_features(130, 5, seed=12, shift=0.5)
    expected = _reference_precision_recall(real, fake, k=5)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # a non-trivial case
    assert metrics.precision_recall(real, fake, k=5, batch=17) == pytest.approx(expected)
    assert metrics.precision_recall(real, fake, k=5) == pytest.approx(expected)


def test_mean_pairwise_distance_matches_pdist() -> None:
    x = _gaussian_features(90, 7, seed=13)
    assert metrics.mean_pairwise_distance(x, batch=16) == pytest.approx(pdist(x).mean(),
                                                                        rel=1e-9)
    assert metrics.mean_pairwise_distance(np.ones((5, 3))) == 0.0


# --------------------------------------------------------------------------------------------
# Classifier metrics
# --------------------------------------------------------------------------------------------


def test_inception_score_uniform_and_confident() -> None:
    n, c = 60, 10
    uniform = np.full((n, c), -math.log(c))
    assert metrics.inception_score(uniform) == pytest.approx((1.0, 0.0))
    one_hot = np.full((n, c), -np.inf)
    one_hot[np.arange(n), np.arange(n) % c] = 0.0
    mean, std = metrics.inception_score(torch.from_numpy(one_hot), splits=3)
    assert mean == pytest.approx(c) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_matches_kl_reference() -> None:
    logits = np.random.default_rng(14).standard_normal((40, 6)) * 2
    p = special.softmax(logits, axis=1)
    kl = special.rel_entr(p, p.mean(0, keepdims=True)).sum(1)
    assert metrics.inception_score(logits)[0] == pytest.approx(math.exp(kl.mean()), rel=1e-10)


def test_accuracy() -> None:
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]).log()
    assert metrics.accuracy(scores, torch.tensor([1, 0, 0, 0])) == 0.75


# --------------------------------------------------------------------------------------------
# PSNR / SSIM
# --------------------------------------------------------------------------------------------


def test_psnr_by_hand() -> None:
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1  # mse 0.01
    y[1, 0, 0, 0] = 1.0  # mse 1 / 192
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 * 192)])
    torch.testing.assert_close(metrics.psnr(x, y), expected)
    assert metrics.psnr(x, x).isinf().all()


def _reference_ssim(x: np.ndarray, y: np.ndarray, radius: int, data_range: float = 2.0
                    ) -> np.ndarray:
    """Per-image SSIM of (B, C, H, W) arrays with scipy's Gaussian filter, valid region only."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = np.zeros(x.shape[0])
    for i in range(x.shape[0]):
        per_channel = []
        for ch in range(x.shape[1]):
            a, b = x[i, ch], y[i, ch]

            def blur(img: np.ndarray) -> np.ndarray:
                full = ndimage.gaussian_filter(img, sigma=1.5, radius=radius)
                return full[radius:img.shape[0] - radius, radius:img.shape[1] - radius]

            mu_a, mu_b = blur(a), blur(b)
            var_a = blur(a * a) - mu_a**2
            var_b = blur(b * b) - mu_b**2
            cov = blur(a * b) - mu_a * mu_b
            s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
                (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
            per_channel.append(s.mean())
        out[i] = np.mean(per_channel)
    return out


@pytest.mark.parametrize(("size", "radius"), [((20, 24), 5), ((8, 6), 2)])
def test_ssim_matches_scipy_reference(size: tuple[int, int], radius: int) -> None:
    # (8, 6) is smaller than the 11-tap window: it shrinks to 5 taps (radius 2).
    gen = torch.Generator().manual_seed(15)
    x = torch.rand(2, 3, *size, generator=gen, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(-1, 1)
    expected = _reference_ssim(x.numpy(), y.numpy(), radius)
    np.testing.assert_allclose(metrics.ssim(x, y).numpy(), expected, rtol=1e-10)


def test_ssim_identity_and_noise_order() -> None:
    gen = torch.Generator().manual_seed(16)
    x = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    torch.testing.assert_close(metrics.ssim(x, x), torch.ones(1))
    noise = torch.randn(x.shape, generator=gen)
    scores = [metrics.ssim(x, x + s * noise).item() for s in (0.05, 0.2, 0.5)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


# --------------------------------------------------------------------------------------------
# FID Inception network
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[FIDInceptionV3, Path]:
    torch.manual_seed(0)
    model = FIDInceptionV3()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_inception_architecture_matches_pytorch_fid(
        inception_file: tuple[FIDInceptionV3, Path]) -> None:
    model, _ = inception_file
    assert sum(p.numel() for p in model.parameters()) == FID_INCEPTION_PARAMS
    state = model.state_dict()
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert not any(k.startswith("AuxLogits") for k in state)


def test_load_fid_inception_round_trip_and_forward(
        inception_file: tuple[FIDInceptionV3, Path]) -> None:
    model, path = inception_file
    loaded = load_fid_inception(path)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    gray = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(17)) * 2 - 1
    with torch.inference_mode():
        features = loaded(gray)
        rgb = loaded(gray[:1].repeat(1, 3, 1, 1))
    assert features.shape == (2, 2048) and features.isfinite().all()
    assert_rounding_close(rgb, features[:1], what="gray repeated to RGB (batch 1) vs gray (batch 2)")


def test_load_fid_inception_safetensors_without_bn_counters(
        inception_file: tuple[FIDInceptionV3, Path], tmp_path: Path) -> None:
    # Files converted from older formats carry no BatchNorm num_batches_tracked buffers.
    from safetensors.torch import save_file

    model, _ = inception_file
    state = {k: v for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "inception.safetensors"
    save_file(state, str(path))
    loaded = load_fid_inception(path)
    assert torch.equal(loaded.fc.weight, model.fc.weight)


class _NotATensor:
    pass


def test_load_fid_inception_errors_name_the_file(
        inception_file: tuple[FIDInceptionV3, Path], tmp_path: Path) -> None:
    model, _ = inception_file
    missing = tmp_path / "absent.pth"
    with pytest.raises(DataError, match="absent.pth"):
        load_fid_inception(missing)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="garbage.pth"):
        load_fid_inception(garbage)

    # weights_only=True must refuse to unpickle arbitrary objects.
    pickled = tmp_path / "object.pth"
    torch.save({"fc.weight": _NotATensor()}, pickled)
    with pytest.raises(DataError, match="object.pth"):
        load_fid_inception(pickled)

    # Tiny stand-in tensors: keys are checked before shapes.
    tiny = {k: torch.zeros(1) for k in model.state_dict()}
    del tiny["fc.bias"]
    tiny["AuxLogits.fc.weight"] = torch.zeros(1)
    wrong_keys = tmp_path / "wrong_keys.pth"
    torch.save(tiny, wrong_keys)
    with pytest.raises(DataError, match=r"wrong_keys\.pth.*fc\.bias.*AuxLogits\.fc\.weight"):
        load_fid_inception(wrong_keys)

    tiny = {k: torch.zeros(1) for k in model.state_dict()}
    wrong_shapes = tmp_path / "wrong_shapes.pth"
    torch.save(tiny, wrong_shapes)
    with pytest.raises(DataError, match=r"wrong_shapes\.pth.*wrong shape"):
        load_fid_inception(wrong_shapes)


@pytest.mark.parametrize("n, m", [(5, 7), (12, 3), (40, 60)])
def test_low_rank_frechet_distance_matches_the_eigendecomposition(n, m):
    """fd_from_features takes an exact N x M SVD route when N * M <= F^2."""
    rng = np.random.default_rng(n * 100 + m)
    a = rng.normal(size=(n, 48)) * rng.uniform(0.5, 2.0, size=48)
    b = rng.normal(size=(m, 48)) + 0.3
    mu1, s1 = metrics.feature_statistics(a)
    mu2, s2 = metrics.feature_statistics(b)
    # 1e-7: the reference takes square roots of round-off eigenvalues (~1e-14 -> ~1e-7 each)
    # of the singular F x F product; the SVD route never forms it.
    assert metrics.fd_from_features(a, b) == pytest.approx(
        metrics.frechet_distance(mu1, s1, mu2, s2), rel=1e-7)


def test_kernel_distance_is_unbiased_matches_brute_force_and_sees_a_shift() -> None:
    from latentforge.metrics import kernel_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 5)), rng.normal(size=(40, 5))
    # Brute force on one subset holding every row of b and as many of a.
    mean, std = kernel_distance(a, b, subsets=1, subset_size=40, seed=3)
    rng3 = np.random.default_rng(3)
    xs, ys = a[rng3.choice(60, 40, replace=False)], b[rng3.choice(40, 40, replace=False)]

    def k(x, y):  # noqa: ANN001, ANN202
        return (x @ y / 5 + 1) ** 3

    n = 40
    kxx = sum(k(xs[i], xs[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(ys[i], ys[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(xs[i], ys[j]) for i in range(n) for j in range(n)) / n**2
    assert mean == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-9) and std == 0.0
    # Unbiased: over 300 independent pairs of 20-row samples of one distribution the mean
    # estimate is 0 within its standard error, while FD of the same pairs is clearly positive.
    pairs = [(rng.normal(size=(20, 5)), rng.normal(size=(20, 5))) for _ in range(300)]
    kid = np.array([kernel_distance(x, y, subsets=1)[0] for x, y in pairs])
    fd = np.array([metrics.fd_from_features(x, y) for x, y in pairs])
    assert abs(kid.mean()) < 4 * kid.std() / np.sqrt(len(kid))
    assert fd.mean() > 10 * fd.std() / np.sqrt(len(fd))
    shifted, shifted_std = kernel_distance(rng.normal(size=(400, 5)),
                                           rng.normal(size=(400, 5)) + 0.5, subsets=20, seed=1)
    assert shifted > 10 * shifted_std / np.sqrt(20) and shifted > 0.05
    with pytest.raises(ValueError, match="feature dims differ"):
        kernel_distance(a, rng.normal(size=(10, 4)))


@pytest.mark.parametrize("shape", [(3, 16, 16, 1), (2, 28, 28, 1), (2, 32, 32, 3), (2, 8, 8, 1),
                                   (2, 64, 48, 3)])
def test_pixel_features_are_torch_adaptive_average_pooling(shape) -> None:
    """FD-pixels' features: [0, 1] pixels, area-averaged as torch's adaptive pooling does, to
    the largest square with at most PIXEL_FEATURE_DIMS values (16 x 16 gray, 9 x 9 RGB)."""
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    n, h, w, c = shape
    side = min(h, w, 16 if c == 1 else 9)
    expected = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0, side)
    got = metrics.pixel_features(images)
    assert got.shape == (n, side * side * c) and got.shape[1] <= metrics.PIXEL_FEATURE_DIMS
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).reshape(n, -1).numpy(),
                               atol=1e-12)
    with pytest.raises(ValueError, match=r"expects \(N, H, W, C\) images"):
        metrics.pixel_features(images[0])
