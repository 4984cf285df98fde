"""A small CNN classifier whose penultimate features define the "FD-judge" distance.

Inception-v3 weights cannot be downloaded here, so LatentForge trains its own feature
network on the dataset's labels. GroupNorm instead of BatchNorm: eval features must not
depend on batch composition, and training must match under DDP without synced stats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.layers import Linear


@dataclass(kw_only=True)
class JudgeModelConfig:
    """Shape of a :class:`Judge`."""

    image_size: int
    """Height and width of the (square) input images; >= 8."""
    channels: int
    """Image channels."""
    num_classes: int
    """Number of classes of the logits."""
    width: int = 32
    """Channels of the first conv block; the next two blocks use 2x and 4x."""
    feature_dim: int = 128
    """Dimension of the penultimate features used for Frechet distances."""
    dropout: float = 0.1
    """Dropout between the features and the classifier (training only)."""

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        for name in ("channels", "width", "feature_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _num_groups(channels: int, max_groups: int = 8) -> int:
    """Largest group count <= max_groups that divides ``channels``."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class ConvBlock(nn.Module):
    """Conv3x3 (stride 2) -> GroupNorm -> SiLU -> Conv3x3 -> GroupNorm -> SiLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
            nn.GroupNorm(_num_groups(out_channels), out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.GroupNorm(_num_groups(out_channels), out_channels),
            nn.SiLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))."""
        return self.layers(x)


class Judge(nn.Module):
    """Three stride-2 conv blocks, global average pool, features, classifier."""

    def __init__(self, cfg: JudgeModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.backbone = nn.Sequential(
            ConvBlock(cfg.channels, w),
            ConvBlock(w, 2 * w),
            ConvBlock(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.to_features = Linear(4 * w, cfg.feature_dim)
        self.head = nn.Sequential(
            nn.SiLU(), nn.Dropout(cfg.dropout), Linear(cfg.feature_dim, cfg.num_classes)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] -> (B, feature_dim) penultimate features.

        Taken before the nonlinearity, so they are closer to Gaussian for a Frechet distance.
        """
        return self.to_features(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.features(x))

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> class log-probabilities (B, num_classes)."""
        return F.log_softmax(self(x), dim=-1)
