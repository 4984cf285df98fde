"""bench/jpeg_headroom.py: file and scan bytes as the reward saves images, and the per-class
headroom arithmetic."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from conftest import REPO

from latentforge.rewards import jpeg_kilobytes


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("jpeg_headroom", REPO / "bench" / "jpeg_headroom.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["jpeg_headroom"] = module
    spec.loader.exec_module(module)
    return module


def test_file_bytes_are_the_rewards_and_the_scan_is_what_the_image_adds(bench) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
    blank = np.zeros((16, 16, 1), np.uint8)
    for image in (noisy, blank):
        file_bytes, scan = bench.jpeg_sizes(image)
        assert file_bytes == round(1000 * jpeg_kilobytes(image[None])[0])
        assert 0 < scan < file_bytes
    # Headers do not depend on the pixels: the difference in file size is all scan.
    (noisy_file, noisy_scan), (blank_file, blank_scan) = (bench.jpeg_sizes(noisy),
                                                          bench.jpeg_sizes(blank))
    assert noisy_file - blank_file == noisy_scan - blank_scan and blank_scan < 10
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert bench.jpeg_sizes(rgb, upscale=4)[0] > bench.jpeg_sizes(rgb)[0]


def test_headroom_is_relative_to_the_class_means(bench) -> None:
    # class 0: 100 .. 109 (mean 104.5, smallest 20%: 100.5, smallest 100);
    # class 1: 200 .. 209 (mean 204.5, smallest 20%: 200.5, smallest 200).
    sizes = np.concatenate([np.arange(100, 110), np.arange(200, 210)]).astype(float)
    labels = np.repeat([0, 1], 10)
    mean, low20, smallest = bench.headroom(sizes, labels)
    assert mean == pytest.approx(154.5)
    assert low20 == pytest.approx(150.5 / 154.5 - 1)
    assert smallest == pytest.approx(150.0 / 154.5 - 1)
