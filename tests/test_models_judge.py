from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_rounding_close

from latentforge.models.judge import Judge, JudgeModelConfig

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _judge(**overrides) -> Judge:
    cfg = {"image_size": 8, "channels": 1, "num_classes": 4, "width": 8, "feature_dim": 16}
    return Judge(JudgeModelConfig(**{**cfg, **overrides}))


def _quadrant_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k has a bright square in quadrant k over a noisy dark background."""
    labels = torch.arange(n) % 4
    x = torch.full((n, 1, 8, 8), -0.8) + 0.1 * torch.randn(n, 1, 8, 8, generator=generator)
    for i, label in enumerate(labels.tolist()):
        r, c = divmod(label, 2)
        x[i, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.6
    return x, labels


@pytest.mark.parametrize("image_size,channels", [(8, 1), (16, 3), (12, 1)])
def test_shapes(image_size: int, channels: int) -> None:
    judge = _judge(image_size=image_size, channels=channels)
    x = torch.rand(3, channels, image_size, image_size) * 2 - 1
    assert judge.features(x).shape == (3, 16)
    assert judge(x).shape == (3, 4)
    assert judge.log_probs(x).shape == (3, 4)


def test_log_probs_normalised() -> None:
    judge = _judge()
    probs = judge.log_probs(torch.rand(5, 1, 8, 8) * 2 - 1).exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))


def test_eval_features_deterministic_and_batch_independent() -> None:
    torch.manual_seed(0)
    judge = _judge(dropout=0.5).eval()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        full = judge.features(x)
        torch.testing.assert_close(judge.features(x), full)
        # No BatchNorm: a sample's features do not depend on the rest of the batch.
        assert_rounding_close(judge.features(x[:1]), full[:1], what="features alone vs in a batch")


def test_trains_on_separable_set() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = _quadrant_images(32, gen)
    judge = _judge()
    opt = torch.optim.Adam(judge.parameters(), lr=3e-3)
    for _ in range(30):
        loss = F.cross_entropy(judge(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_test, y_test = _quadrant_images(32, gen)
    with torch.no_grad():
        accuracy = (judge.eval()(x_test).argmax(-1) == y_test).float().mean()
    assert accuracy > 0.9


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"image_size": 4}, "image_size"),
        ({"num_classes": 1}, "num_classes"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_validation(overrides: dict, match: str) -> None:
    cfg = {"image_size": 8, "channels": 1, "num_classes": 4, **overrides}
    with pytest.raises(ValueError, match=match):
        JudgeModelConfig(**cfg)
